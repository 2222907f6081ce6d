"""Files are replaced whole or not at all: metrics, summaries and checkpoints."""

import pytest

from sae.atomic import write_atomic


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
