"""The activation data: language-model loading and the residual-stream hook, corpora, their
seeded document order and document split, the sharded Zarr store (every chunk checksummed,
``integrity`` names a corrupt one) and its streaming extraction, train and eval readers, and the
constant input normalisation (Appendix A.1). Imports only ``hsae_core.common``.
"""
