"""What the benchmarks share: conf/train.yaml composed in-process, as train.py composes it."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]


def train_config(data_root: str, output_dir: str, *overrides: str) -> DictConfig:
    """The training config for this data and output folder, with the overrides applied in order."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"data.root={data_root}", f"output_dir={output_dir}", *overrides])
