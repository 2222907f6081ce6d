"""Shared fixtures: tiny synthetic MNIST IDX files, composed configs, the real MNIST when present."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Small enough to train in a second, large enough for a val split and several batches.
N_TRAIN, N_TEST = 600, 200


def write_idx_images(path: Path, images: np.ndarray) -> None:
    """IDX3 as published by LeCun et al.: magic 0x803, count, rows, cols, then uint8 pixels."""
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">IIII", 0x803, n, rows, cols) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes())


def synthetic_digits(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class c lights a 6x6 block at a class-specific place, plus noise: learnable, not trivial."""
    labels = rng.integers(0, 10, size=n)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for i, c in enumerate(labels):
        r, col = 2 + 5 * (c // 4), 2 + 6 * (c % 4)
        images[i, r : r + 6, col : col + 6] = 255
    return images.astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A data root holding MNIST/raw/* in the real IDX format, read by torchvision offline."""
    root = tmp_path_factory.mktemp("mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        images, labels = synthetic_digits(n, rng)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="session", autouse=True)
def probe_cache(tmp_path_factory) -> Path:
    """Keep the pixel-probe cache of test runs (and their subprocesses) out of the user's home."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["SAE_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def real_mnist_root() -> Path:
    """The real MNIST under SAE_DATA_DIR (CI unpacks it there); skipped where it is absent."""
    root = os.environ.get("SAE_DATA_DIR")
    if not root or not (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip("real MNIST not found: set SAE_DATA_DIR to a folder holding MNIST/raw")
    return Path(root)


# Quiet, quick settings for every run on the synthetic data, in-process or as a subprocess.
QUICK_RUN = [
    "accelerator=cpu",
    "+trainer.enable_progress_bar=false",
    "data.val_size=100",
    "data.eval_batch_size=64",
    "batch_size=50",
]


# For tests about training and checkpoints only: no loggers, probe, figures or TensorBoard views.
LEAN = [
    "logger=none",
    "~callbacks.linear_probe",
    "~callbacks.run_figures",
    "~callbacks.epoch_visuals",
    "~callbacks.hparams_summary",
]


def compose_config(name: str, overrides: list[str], **kwargs) -> DictConfig:
    """conf/<name>.yaml as Hydra composes it for the command line with these overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides, **kwargs)


def compose_train(overrides: list[str], output_dir: Path, data_root: Path) -> DictConfig:
    """conf/train.yaml with the quick settings and this test's folders."""
    return compose_config(
        "train", [*QUICK_RUN, f"data.root={data_root}", f"output_dir={output_dir}", *overrides]
    )


def train_command(data_root: Path, *overrides: str) -> list[str]:
    """`python train.py` with the quick settings, as a subprocess runs it."""
    return [sys.executable, str(ROOT / "train.py"), *QUICK_RUN, f"data.root={data_root}", *overrides]


def run_script(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python <script> args...` from the repository root, its output captured (not checked)."""
    command = [sys.executable, str(ROOT / script), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def tensorboard_run(folder: Path) -> Path:
    """The one folder under <folder>/tensorboard that holds the run's event files."""
    holders = {p.parent for p in (folder / "tensorboard").rglob("events.out.tfevents.*")}
    assert len(holders) == 1, holders
    return holders.pop()


def hparams_end_status(folder: Path) -> str | None:
    """How the run's TensorBoard HParams session ended (e.g. STATUS_SUCCESS); None if not recorded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.api_pb2 import Status
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    events = EventAccumulator(str(tensorboard_run(folder)), size_guidance={"tensors": 0})
    events.Reload()
    content = events.PluginTagToContent("hparams")
    if "_hparams_/session_end_info" not in content:
        return None
    return Status.Name(
        HParamsPluginData.FromString(content["_hparams_/session_end_info"]).session_end_info.status
    )


def idx_test_split(data_root: Path):
    """The test images (float64 in [0, 1], a row each) and labels, read from the IDX bytes here,
    apart from the project's reader: for independent recomputations."""
    import torch

    raw = Path(data_root) / "MNIST" / "raw"
    images = torch.frombuffer(
        bytearray((raw / "t10k-images-idx3-ubyte").read_bytes()[16:]), dtype=torch.uint8
    )
    labels = torch.frombuffer(bytearray((raw / "t10k-labels-idx1-ubyte").read_bytes()[8:]), dtype=torch.uint8)
    return images.reshape(-1, 784).double() / 255, labels.long()


def checkpoint_weights(path) -> dict:
    """A checkpoint's network weights in float64, by layer (encoder.0.0.weight, ...)."""
    import torch

    state = torch.load(path, weights_only=True)["state_dict"]
    return {k.removeprefix("net."): v.double() for k, v in state.items() if k.startswith("net.")}


def evaluate_config(ckpt_path, data_root: Path, output_dir: Path, *overrides: str) -> DictConfig:
    """conf/evaluate.yaml for a checkpoint, quiet and on the CPU."""
    base = [f"ckpt_path={ckpt_path}", f"data.root={data_root}", f"output_dir={output_dir}", "accelerator=cpu"]
    return compose_config("evaluate", [*base, "+trainer.enable_progress_bar=false", *overrides])


def read_metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())
