"""Glue between params.yaml, files and the library, called by the stage scripts: the params
schema (``params``), the limits check-params enforces before any work (``limits``), saved model
folders and forests (``io``), checkpoint files (``checkpoint``), training on an activation store
(``train_run``), and the experiment families run with ``dvc exp run`` (``experiments``: the
ablations, ``ablations``; the scale study, ``scale_study``; the seed study, ``seed_study``).
May import every other package; nothing else in hsae_core imports it.
"""
