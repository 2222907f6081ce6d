"""Checkpoints: written atomically, read weights-only, refused in one line when foreign or broken."""

import pytest
import torch

from sae.checkpoints import CheckpointError, SafeCheckpointIO, load_checkpoint
from sae.training import build_trainer
from tests.conftest import compose_train


def test_trainer_writes_checkpoints_through_the_atomic_writer(mnist_root, tmp_path):
    trainer = build_trainer(compose_train([], tmp_path, mnist_root))
    assert isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO)


def test_load_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot load .* as a PyTorch checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a sae training checkpoint"):
        load_checkpoint(other)


class _RunsCodeOnLoad:
    """Unpickling this calls Path.touch(marker): what a malicious checkpoint would do."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_a_crafted_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": _RunsCodeOnLoad(marker), "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="cannot load .*evil.ckpt as a PyTorch checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: loading it unsafely does run the code
    assert marker.exists()
