"""The paper's method (§3, Appendix A): JumpReLU levels and their sparse kernels, the
parent-child coupling (PC loss, perturbation), the partial forest and its similarity-based
updates, adaptive sparsity, the trainer, and the post-hoc forest of the independent baseline;
and the Matryoshka BatchTopK SAE of the third arm (Bussmann et al. 2025; ``matryoshka.py``).

Pure PyTorch on CPU or CUDA: imports only ``hsae_core.common`` (errors, distributed
collectives); no file I/O, no zarr, no transformers. Saving, loading and checkpoint files live
in ``hsae_core.pipeline``.
"""
