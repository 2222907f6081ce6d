"""TensorBoard as a researcher opens it: runs named by what they set, and curves first.

TensorBoard names a run by the folder its event files are in, and its Time Series page (the one it
opens on) orders cards by tag, grouped by the part before the first `/`: `test/`, `train/`,
`val/`, then the per-run figures under `visuals/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from omegaconf import DictConfig

from sae.config import DATA_EXECUTION_SETTINGS, command_overrides

# Logged values that are not curves: Lightning's epoch counter (a staircase that would lead the
# page) and the thresholds recorded with the test metrics (constants). metrics.json and the CSV
# logger keep them.
NOT_CURVES = ("epoch", "l0_threshold", "rare_density", "dense_density")

# Overrides that say where or how a run executes, not what it trains: left out of its name (a key,
# or the group of keys under it).
NOT_IN_RUN_NAME = (
    *DATA_EXECUTION_SETTINGS,
    "accelerator",
    "launcher",
    "hparams_search",
    "debug",
    "logger",
    "callbacks",
    "experiment",
    "trainer",
    "output_dir",
    "resume",
    "ckpt_path",
    "threads",
    "optimized_metric",
)
MAX_RUN_NAME = 200  # characters: a folder name holds at most 255 bytes


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoard logger without the values that are not curves (NOT_CURVES)."""

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        curves = {k: v for k, v in metrics.items() if k.rsplit("/", 1)[-1] not in NOT_CURVES}
        if curves:
            super().log_metrics(curves, step)


def run_events_folder(run: Path) -> Path | None:
    """The folder under <run>/tensorboard/ holding the run's event files (None if there is none)."""
    events = sorted((Path(run) / "tensorboard").rglob("events.out.tfevents.*"))
    return events[0].parent if events else None


def tensorboard_run_name(cfg: DictConfig, output_dir: Path) -> str:
    """The run's folder under <run>/tensorboard/: the knobs the command set, as Hydra records them
    (`beta=0.001,seed=1` for a sweep's job), so that TensorBoard's run list and HParams rows say
    what each run is; "" (the folder itself) when it set none. A resumed run keeps writing where
    its events are.
    """
    if cfg.get("resume") and (events := run_events_folder(output_dir)) is not None:
        folder = events.relative_to(output_dir / "tensorboard")
        return "" if folder == Path() else folder.as_posix()
    knobs = [o.lstrip("+") for o in command_overrides(cfg) or [] if "=" in o and not o.startswith("~")]
    name = ",".join(
        o
        for o in knobs
        if not any(o == k or o.startswith((k + "=", k + ".")) for k in NOT_IN_RUN_NAME)
        and "/" not in o  # a path is not a knob, and would nest folders
    )
    return name if len(name) <= MAX_RUN_NAME else name[: MAX_RUN_NAME - 1] + "…"
