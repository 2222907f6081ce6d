"""A run folder's record: `metrics.json` (what the run measured) and `status.json` (how it ended).

`RunRecord` is the only code that writes either file. Callers report to it (the run as it ends,
a hand-off whose result came back, a failure, an interrupt); it decides what the files say, in one
order: results into metrics.json first, then status.json. "ok" means every result the run
promises is on disk; until then the run is "incomplete", naming what is missing and the command
that completes it. Both files are written atomically (sae.run.atomic).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sae.errors import UserError, one_line
from sae.run.atomic import write_atomic, write_json_atomic

METRICS_FILE = "metrics.json"
DICTIONARY_FILE = "dictionary.npy"  # what each latent unit writes in pixel space (sae.report.consistency)
# How a run ended, written by the run (or, for a SLURM job that died, by its sweep): "ok" (every
# result it promises is on disk), "incomplete" (some are still being computed, or failed: `missing`
# names them), "failed" or "interrupted" (it saved last.ckpt and can be resumed), and the line saying why.
STATUS_FILE = "status.json"
COMPLETE_WITH = "python evaluate.py sweep_dir=<the sweep folder>"


FLOAT32_MAX = 3.4028234663852886e38


def without_float32_noise(value: Any) -> Any:
    """A float that is exactly a float32 (a metric computed in float32, a setting logged through
    one) as the shortest decimal that reads back as that float32: 0.1, not 0.10000000149011612.
    Nothing is lost (float32 held no more); any other value is returned as it is."""
    if not isinstance(value, float) or not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        return value

    def single(x: float) -> float:
        return struct.unpack("f", struct.pack("f", x))[0]

    if single(value) != value:
        return value  # not a float32: a float64 metric keeps its digits
    for digits in range(1, 10):  # 9 significant digits always identify a float32
        shortest = float(f"{value:.{digits}g}")
        if single(shortest) == value:
            return shortest
    return value


def plain_numbers(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k: without_float32_noise(v) for k, v in metrics.items()}


class RunRecord:
    """The record files of the run in `folder`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.metrics_file = self.folder / METRICS_FILE
        self.status_file = self.folder / STATUS_FILE
        self.dictionary_file = self.folder / DICTIONARY_FILE

    # What the files say (read as input: a file of the wrong shape is said, never trusted).

    def status(self) -> dict[str, Any]:
        """status.json ({} if there is none, or it cannot be read)."""
        try:
            status = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {}
        return status if isinstance(status, dict) else {}

    def metrics(self) -> dict[str, Any]:
        """metrics.json as a mapping, or a one-line UserError naming the file."""
        try:
            metrics = json.loads(self.metrics_file.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {self.metrics_file}: {one_line(err)}") from err
        if not isinstance(metrics, dict):
            raise UserError(f"{self.metrics_file} is not a mapping of metrics")
        return metrics

    def dictionary(self):
        """dictionary.npy as a float array (units x pixels), or None where there is none or it is
        not one (read as data: no pickles, a finite 2-D float array or nothing)."""
        import numpy as np

        try:
            units = np.load(self.dictionary_file, allow_pickle=False)
        except (OSError, ValueError):
            return None
        ok = units.ndim == 2 and units.dtype.kind == "f" and min(units.shape) > 0 and np.isfinite(units).all()
        return units if ok else None

    # What the run reports.

    def save_dictionary(self, units) -> None:
        """What each latent unit of the tested model writes (units x pixels, float32)."""
        import numpy as np

        write_atomic(self.dictionary_file, lambda f: np.save(f, np.asarray(units, dtype=np.float32)))

    def finished(
        self, metrics: Mapping[str, Any], pending: Sequence[str] = (), complete_with: str = ""
    ) -> None:
        """The run ended: its metrics, then "ok" when nothing it promises is `pending`; else
        "incomplete", naming the results still being computed (a sweep job's probes and figures,
        beside the next job) and the command that completes them if the sweep stops first."""
        write_json_atomic(self.metrics_file, plain_numbers(metrics))
        self._incomplete_or_ok(list(pending), complete_with or COMPLETE_WITH)

    def evaluated(self, metrics: Mapping[str, Any]) -> None:
        """evaluate.py's test of a checkpoint: its metrics (it promises nothing further)."""
        write_json_atomic(self.metrics_file, plain_numbers(metrics))

    def add_metrics(self, values: Mapping[str, Any]) -> None:
        """Metrics computed after the run wrote its metrics.json (a sweep job's probes) join it."""
        write_json_atomic(self.metrics_file, self.metrics() | plain_numbers(values))

    def result_done(self, name: str, error: str | None = None) -> None:
        """A result an incomplete run was waiting for is on disk (error None), or could not be made.
        The run becomes "ok" once none is missing; a failed one stays missing, with its error and
        the command that completes it. A run that is not "incomplete" (interrupted, failed) stays so."""
        status = self.status()
        if status.get("status") != "incomplete":
            return
        missing = [m for m in status.get("missing", []) if m != name or error is not None]
        complete_with = str(status.get("complete_with", COMPLETE_WITH))
        if error is not None and missing:
            said = f"{name} failed ({error}); complete {', '.join(missing)} with: {complete_with}"
            self._write_status("incomplete", said, missing=missing, complete_with=complete_with)
        else:
            self._incomplete_or_ok(missing, complete_with)

    def failed(self, line: str) -> None:
        """The run stopped on an error: the line that says it."""
        self._write_status("failed", line)

    def interrupted(self, line: str) -> None:
        """The run was stopped (SIGTERM, Ctrl+C) after saving last.ckpt: the line says how to resume."""
        self._write_status("interrupted", line)

    def _incomplete_or_ok(self, missing: list[str], complete_with: str) -> None:
        if not missing:
            self._write_status("ok")
            return
        said = (
            f"{', '.join(missing)} not yet on disk (computed beside the next job); if the sweep stopped "
            f"before, complete them with: {complete_with}"
        )
        self._write_status("incomplete", said, missing=missing, complete_with=complete_with)

    def _write_status(self, status: str, error: str = "", **extra: Any) -> None:
        write_json_atomic(self.status_file, {"status": status, "error": error, **extra})
