"""Small file helpers shared by train.py, evaluate.py and the sweep tools."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves half a file."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def format_metrics(metrics: dict[str, Any]) -> str:
    """A two-column text table of metric name and value."""
    width = max(map(len, metrics), default=0)
    rows = []
    for name, value in metrics.items():
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        rows.append(f"{name:<{width}}  {shown}")
    return "\n".join(rows)


def one_line(err: BaseException, limit: int = 200) -> str:
    """An exception's message folded onto one line, for errors reported without a traceback."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text through a temporary file and a rename."""
    write_atomic(path, lambda f: f.write(text.encode()))


def write_atomic(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call write(file) on a temporary file beside path, then rename it over path.

    The rename is atomic on one file system, so readers and crashes see the old file or the new
    one, never half of one; the temporary file is removed if anything fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
