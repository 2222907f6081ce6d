"""MNIST as tensors, batched by index (resumable mid-epoch): the LightningDataModule."""
