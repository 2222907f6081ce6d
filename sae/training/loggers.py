"""TensorBoard as a researcher opens it: runs named by what they set, and the curves first.

TensorBoard names a run by the folder its event files are in. Its Time Series page (the one it
opens on) groups cards by the part of the tag before the first `/`, orders them by tag, and opens
only the first two groups: `train/` and `val/`, the curves a researcher watches, lead and are open;
the per-run figures (`visuals/`) and a finished run's test metrics (single points, written under
TEST_GROUP) follow, closed. The test metrics are read by name (`test/mse`) in the HParams tab and
in the run's text summary (`test/summary` in the Text tab).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from sae.config import DATA_EXECUTION_SETTINGS, command_overrides
from sae.names import COMPARED_FIRST, label, metric_text

# Logged values that are not curves: Lightning's epoch counter (a staircase that would lead the
# page) and the thresholds recorded with the test metrics (constants). metrics.json and the CSV
# logger keep them.
NOT_CURVES = ("epoch", "l0_threshold", "rare_density", "dense_density")
# The tag group of the test metrics: after `train`, `val` and `visuals` in TensorBoard's order of
# tags, so closed when it opens (tensorboard_tag).
TEST_GROUP = "zz_test"
TEXT_SUMMARY = "test/summary"  # the Text tab's table of a run's test metrics, by name
TARGET_TAG = "zz_target/rho"  # the mean activation KL pulls each unit to: a constant, closed too

# TensorBoard's Custom Scalars tab: related curves on one chart (tags as regular expressions). The
# same for every method and run, so that TensorBoard, which merges the layouts of all runs it
# shows, draws each chart once.
LAYOUT = {
    "loss": {
        "train: loss = reconstruction + penalty": ["Multiline", [r"^train/(loss|mse|bce|penalty)$"]],
        "val: loss = reconstruction + penalty": ["Multiline", [r"^val/(loss|mse|bce|penalty)$"]],
    },
    "sparsity": {
        "val: rho_hat min, mean, max and the target rho": [
            "Multiline",
            [r"^val/rho_hat_(min|mean|max)$", f"^{TARGET_TAG}$"],
        ],
        "val: L0 (units active per input)": ["Multiline", [r"^val/l0(@.*)?$"]],
        "val: dead, rare and dense units (fraction)": ["Multiline", [r"^val/(dead|rare|dense)_fraction$"]],
    },
}

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


def tensorboard_tag(name: str) -> str:
    """The tag a metric is written under: its name, but `test/x` under TEST_GROUP (`zz_test/x`)."""
    split, _, rest = name.partition("/")
    return f"{TEST_GROUP}/{rest}" if split == "test" and rest else name


def is_curve(name: str) -> bool:
    return name.rsplit("/", 1)[-1] not in NOT_CURVES


def results_table(values: Mapping[str, float]) -> str:
    """A run's test metrics as a Markdown table (the Text tab renders it): the metrics a reader
    compares first in their order (sae.names.COMPARED_FIRST), then the rest by name; each with
    the digits the console shows and what it is."""
    order = {name: i for i, name in enumerate(COMPARED_FIRST)}
    names = sorted(values, key=lambda n: (order.get(n, len(order)), n))
    rows = [f"| {n} | {metric_text(float(values[n]))} | {label(n) if label(n) != n else ''} |" for n in names]
    return "\n".join(["| metric | value | what it is |", "|---|---|---|", *rows])


def write_results(writer, values: Mapping[str, Any], step: int | None, title: str = TEXT_SUMMARY) -> None:
    """Metrics to a SummaryWriter at `step`: curves as scalars under their tensorboard_tag, and the
    test metrics among them (constants too) as a table under the text tag `title`."""
    for name, value in values.items():
        if is_curve(name):
            writer.add_scalar(tensorboard_tag(name), float(value), step)
    tested = {k: float(v) for k, v in values.items() if k.startswith("test/")}
    if tested:
        writer.add_text(title, results_table(tested), step)


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoard logger, writing as `write_results` does: no values that are not
    curves (NOT_CURVES), test metrics under TEST_GROUP and in the Text tab's table."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        write_results(self.experiment, metrics, step)


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
