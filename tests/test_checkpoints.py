"""Checkpoints: written atomically, read weights-only, refused in one line when foreign or broken."""

import numpy as np
import pytest
import torch

from sae.data.mnist import DataError
from sae.training.checkpoints import CheckpointError, SafeCheckpointIO, load_checkpoint
from sae.training.evaluate import evaluate
from sae.training.fit import build_trainer, train
from tests.conftest import (
    LEAN,
    compose_config,
    compose_train,
    synthetic_digits,
    write_idx_images,
    write_idx_labels,
)


def test_trainer_writes_checkpoints_through_the_atomic_writer(mnist_root, tmp_path):
    trainer = build_trainer(compose_train([], tmp_path, mnist_root))
    assert isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO)


BROKEN = [
    ("missing.ckpt", None, "checkpoint not found: .*missing.ckpt"),
    (
        "junk.ckpt",
        b"not a checkpoint",
        "junk.ckpt as a PyTorch checkpoint: it is not a file torch.save writes",
    ),
    (
        "random.ckpt",
        bytes(range(256)) * 8,
        "random.ckpt as a PyTorch checkpoint: it is not a file torch.save",
    ),
    (
        "run",
        "folder",
        "run is a folder, not a checkpoint file: pass one of its .ckpt files \\(it holds last.ckpt\\)",
    ),
    ("other.ckpt", {"weights": torch.zeros(2)}, "other.ckpt is not a sae training checkpoint"),
]


@pytest.mark.parametrize("name, content, message", BROKEN, ids=[b[0] for b in BROKEN])
def test_a_path_that_is_not_a_checkpoint_is_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "folder":
        (path / "checkpoints").mkdir(parents=True)
        torch.save({}, path / "checkpoints" / "last.ckpt")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


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
    with pytest.raises(CheckpointError, match="evil.ckpt as a PyTorch checkpoint: it holds Python objects"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: loading it unsafely does run the code
    assert marker.exists()


def test_evaluate_checks_the_checkpoints_data_settings_before_testing(mnist_root, tmp_path):
    """The checkpoint's val_size (100) leaves no training images in a data set of 80: said before
    the test pass, naming the file."""
    metrics = train(compose_train([*LEAN, "debug=limit", "epochs=1"], tmp_path / "run", mnist_root))
    small = tmp_path / "small"
    raw = small / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 80), ("t10k", 20)):
        images, labels = synthetic_digits(n, rng)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    cfg = compose_config("evaluate", [f"ckpt_path={metrics['ckpt_path']}", f"data.root={small}"])
    cfg.output_dir, cfg.trainer.accelerator = str(tmp_path / "eval"), "cpu"
    with pytest.raises(DataError, match=r"data.val_size=100 must be in \[0, 80\): .*train-images-idx3-ubyte"):
        evaluate(cfg)
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_last_ckpt_holds_the_last_epoch_also_when_it_was_not_the_best(mnist_root, tmp_path):
    # mode=max: the first epoch stays "best" (the loss falls), so no later epoch writes a best
    # checkpoint; Lightning's own save_last would then leave last.ckpt at the first epoch.
    cfg = compose_train(
        [*LEAN, "debug=limit", "epochs=3", "callbacks.model_checkpoint.mode=max"], tmp_path, mnist_root
    )
    train(cfg)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["best-epoch000.ckpt", "last.ckpt"]
    last = torch.load(folder / "last.ckpt", weights_only=True)
    best = torch.load(folder / "best-epoch000.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 3 * best["global_step"]
    [state] = [v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert state["last_model_path"] == str(folder / "last.ckpt")
    assert state["best_model_path"] == str(folder / "best-epoch000.ckpt")
