"""Files are replaced whole or not at all: metrics, summaries and checkpoints."""

import errno
import json
import os
import shutil
import tempfile
from types import SimpleNamespace

import pytest

from sae.run.atomic import CannotWrite, current_umask, write_atomic, write_json_atomic, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_debris(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"the previous checkpoint")

    def crash_halfway(f) -> None:
        f.write(b"half of a new one")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, crash_halfway)
    assert path.read_bytes() == b"the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]

    write_atomic(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and len(list(tmp_path.iterdir())) == 1


def test_a_full_disk_is_said_in_one_line_and_the_old_file_stays(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("{}")

    def disk_full(f) -> None:
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(
        CannotWrite, match=f"cannot write {path}: the disk is full .*; free some space"
    ) as err:
        write_atomic(path, disk_full)
    assert "\n" not in str(err.value) and path.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize(
    "code, reason", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")]
)
def test_a_folder_that_cannot_be_written_is_said_in_one_line(tmp_path, monkeypatch, code, reason):
    def refused(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "mkstemp", refused)  # as root, chmod would not stop us
    with pytest.raises(
        CannotWrite, match=f"cannot write {tmp_path / 'summary.md'}: {reason}; write elsewhere"
    ):
        write_text_atomic(tmp_path / "summary.md", "x")


def test_json_results_are_strict_json(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"test/bce": float("nan"), "x": [1.0, float("inf")], "ok": 0.5})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"test/bce": None, "x": [1.0, None], "ok": 0.5}


def test_torch_saves_error_on_a_full_disk_is_said_as_a_full_disk(tmp_path, monkeypatch):
    """torch.save reports a full disk as its own RuntimeError; the free space tells what it was."""

    def torch_on_a_full_disk(f) -> None:
        raise RuntimeError(
            "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file"
        )

    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=4096))
    with pytest.raises(CannotWrite, match="last.ckpt: the disk is full \\(0.0 MiB free\\)"):
        write_atomic(tmp_path / "last.ckpt", torch_on_a_full_disk)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="PytorchStreamWriter"):  # with space left, the error as it is
        write_atomic(tmp_path / "last.ckpt", torch_on_a_full_disk)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_written_files_follow_the_umask_as_open_would(tmp_path, umask):
    previous = os.umask(umask)
    try:
        assert current_umask() == umask
        write_text_atomic(tmp_path / "atomic.txt", "x")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    mode = (tmp_path / "atomic.txt").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask == (tmp_path / "plain.txt").stat().st_mode & 0o777
