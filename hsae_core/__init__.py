"""hsae_core: Hierarchical Sparse Autoencoders (Luo et al., arXiv 2602.11881) in plain PyTorch."""
