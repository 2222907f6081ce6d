"""What a researcher reads: the linear probe, every figure, the sparsity/error frontier and the
sweep summary (from tensors and run folders; no training)."""
