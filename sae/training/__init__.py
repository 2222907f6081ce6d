"""Training and testing with Lightning: the LightningModule, its callbacks and loggers, checkpoints,
resume, train(cfg) and evaluate(cfg)."""
