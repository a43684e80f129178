"""Interoperability with the field's tools: every level as a SAELens JumpReLU folder
(``saelens``) and as an SAEBench custom SAE (``saebench``). Imports ``hsae_core.model`` and
``hsae_core.common``.
"""
