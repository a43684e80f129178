"""hsae_core: Hierarchical Sparse Autoencoders (Luo et al., arXiv 2602.11881) in plain PyTorch.

Packages by concern; each may import only the packages listed beside it (``tests/
test_architecture.py`` checks this, and that every pipeline stage's DVC deps cover every module
it reaches)::

    common/      errors, torch.distributed ranks, files at paths or URLs    (nothing)
    model/       the paper's method: levels, kernels, coupling, forest,     common
                 hierarchy updates, sparsity control, trainer, post-hoc
                 forest of the baseline. No file I/O, no zarr, no transformers
    data/        LM loading, corpora, the Zarr store, extraction, readers,  common
                 normalisation
    evaluation/  hierarchy metrics, streaming evaluation, spliced LM loss,  model, data, common
                 evidence contexts, the compute-metrics driver
    judge/       the LLM judge of parent-child pairs (Appendix C)           evaluation, model,
                                                                            data, common
    interop/     SAELens export, SAEBench adapter                           model, common
    site/        the static forest browser and the paper's figures          evaluation, model,
                                                                            common
    pipeline/    glue the stages call: params.yaml schema, model folders,   every package above
                 training on a store with checkpoints, ablations

This file holds no code: importing any module runs it, so it must not change a result.
"""
