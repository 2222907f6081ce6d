"""Files written whole or not at all: metrics, summaries, figures and checkpoints.

Every result file goes through a temporary file beside its target and a rename, so a crash, a
full disk or a kill at any moment leaves the previous file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from sae.errors import UserError


def write_atomic(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call write(file) on a temporary file beside path, then rename it over path.

    The rename is atomic on one file system, so readers and crashes see the old file or the new
    one; the temporary file is removed if anything fails.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise CannotWrite(cannot_write_message(path, err)) from err
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 -> what open() would create
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if disk_full(err, path.parent) or isinstance(err, PermissionError):
            raise CannotWrite(cannot_write_message(path, err)) from err
        raise


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only
    be read by setting it, which would briefly loosen what other threads create)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


class CannotWrite(UserError, OSError):
    """A result file could not be written: full disk, read-only folder, no permission."""


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Strict JSON: a NaN or infinite number is written as null (JSON has no NaN)."""
    write_text_atomic(path, json.dumps(_finite(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def disk_full(err: BaseException, folder: Path) -> bool:
    """ENOSPC itself, or a writer's own error (torch.save's 'file write failed') on a full disk."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return isinstance(err, RuntimeError) and shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def cannot_write_message(path: Path, err: BaseException) -> str:
    if disk_full(err, path.parent if path.parent.exists() else Path("/")):
        try:
            free = f" ({shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free)"
        except OSError:
            free = ""
        return f"cannot write {path}: the disk is full{free}; free some space, or write elsewhere"
    code = getattr(err, "errno", None)
    reason = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}.get(code)
    reason = reason or getattr(err, "strerror", None) or str(err)
    return f"cannot write {path}: {reason}; write elsewhere (another run folder) or fix its permissions"
