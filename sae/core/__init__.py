"""The sparse autoencoder in pure torch: the model, the sparsity methods, the objective and the
whole-split metrics (no Lightning, no files)."""
