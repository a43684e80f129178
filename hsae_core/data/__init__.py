"""The activation data: language-model loading and the residual-stream hook, corpora and their
document split, the sharded Zarr store and its streaming extraction, train and eval readers,
and the constant input normalisation (Appendix A.1). Imports only ``hsae_core.common``.
"""
