"""Evaluation of trained models on the eval split (§4.2, Appendix C-D): hierarchy consistency
metrics, streaming per-level evaluation (L0, FVE, dead fraction), the next-token loss with a
level spliced in, evidence contexts per feature, and the compute-metrics driver.
Imports ``hsae_core.model``, ``hsae_core.data`` and ``hsae_core.common``.
"""
