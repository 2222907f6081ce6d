"""Files are replaced whole or not at all: metrics, summaries and checkpoints."""

import pytest

from sae.io import write_atomic
from sae.pipeline import AtomicCheckpointIO, build_trainer
from tests.conftest import compose_train


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


def test_trainer_writes_checkpoints_through_the_atomic_writer(mnist_root, tmp_path):
    trainer = build_trainer(compose_train([], tmp_path, mnist_root))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
