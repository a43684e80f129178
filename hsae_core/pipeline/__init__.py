"""Glue between params.yaml, files and the library, called by the stage scripts: the params
schema (``params``), saved model folders and forests (``io``), checkpoint files (``checkpoint``),
training on an activation store (``train_run``), the ablation family (``ablations``) and the
scale study's runs and trend (``scale_study``).
May import every other package; nothing else in hsae_core imports it.
"""
