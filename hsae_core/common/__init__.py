"""Foundations every package may use: the configuration error, the stages' console,
torch.distributed ranks and collectives, and files at local paths or fsspec URLs. Imports
nothing from hsae_core."""
