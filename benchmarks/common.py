"""What the benchmarks share: conf/train.yaml composed in-process, as train.py composes it; the
16-job sweep grid; a timed command; waiting for the GPU before a clock is read."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]


# The sweep benchmarks' grid (sweep_time, sweep_tail): 4 beta x 4 rho, 16 jobs.
BETAS = "1e-3,5e-3,2e-2,5e-2"
RHOS = "0.02,0.05,0.1,0.2"


def train_config(data_root: str, output_dir: str, *overrides: str) -> DictConfig:
    """The training config for this data and output folder, with the overrides applied in order."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"data.root={data_root}", f"output_dir={output_dir}", *overrides])


def timed_run(command: list[str], label: str, cwd: Path = ROOT) -> float:
    """Run a command as a user would, say so on stderr, and return its wall time in seconds; a
    failure stops the benchmark with the end of the command's stderr."""
    print(f"{label}: {' '.join(command[2:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
    return seconds


def sync(device: torch.device) -> None:
    """Wait for the work queued on a GPU, so that a clock read next includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
