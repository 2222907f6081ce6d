"""The DataModule through torchvision's real IDX reading path, on synthetic files and on the real MNIST."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sae.data.mnist import BatchIndexSampler, DataError, MNISTDataModule, load_mnist_split
from tests.conftest import N_TEST, N_TRAIN, write_idx_images, write_idx_labels


def make(root, **kw) -> MNISTDataModule:
    dm = MNISTDataModule(root=str(root), download=False, **{"val_size": 100, "batch_size": 64, **kw})
    dm.prepare_data()
    dm.setup()
    return dm


def raw_images(root, prefix):
    data = (root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte").read_bytes()[16:]
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()).reshape(-1, 784)


def test_splits_sizes_dtype_and_scaling(mnist_root):
    dm = make(mnist_root)
    (xtr, ytr), (xva, _), (xte, _) = dm.split("train"), dm.split("val"), dm.split("test")
    assert (len(xtr), len(xva), len(xte)) == (N_TRAIN - 100, 100, N_TEST)
    assert xtr.dtype == torch.float32 and xtr.shape[1] == 784 and ytr.dtype == torch.int64
    assert 0.0 <= float(xtr.min()) and float(xtr.max()) == 1.0
    # Pixels are exactly the file's bytes / 255, and train + val is a partition of the 60k file.
    everything = raw_images(mnist_root, "train").float() / 255
    rows = {tuple(r.tolist()) for r in everything}
    assert {tuple(r.tolist()) for r in torch.cat([xtr, xva])} <= rows
    torch.testing.assert_close(xte, raw_images(mnist_root, "t10k").float() / 255)
    assert len(torch.cat([xtr, xva]).unique(dim=0)) == len(everything.unique(dim=0))


def test_test_stage_reads_only_the_test_set(mnist_root):
    dm = MNISTDataModule(root=str(mnist_root), download=False, val_size=5000)  # too big for 600: unused
    dm.setup("test")
    assert set(dm.splits) == {"test"}


def test_split_is_fixed_by_split_seed_not_seed(mnist_root):
    a, b = make(mnist_root, seed=1), make(mnist_root, seed=2)
    assert torch.equal(a.split("val")[0], b.split("val")[0])
    c = make(mnist_root, split_seed=5)
    assert not torch.equal(a.split("val")[0], c.split("val")[0])


def epoch_batches(dm, epoch):
    """The epoch's training batches in order, whether the loader groups them or not."""
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)  # what Lightning calls each epoch
    items = list(loader)
    return [b for item in items for b in (item if isinstance(item, list) else [item])]


def test_training_batches_reshuffle_each_epoch_and_reproduce_with_seed(mnist_root):
    dm = make(mnist_root, seed=3, batches_per_call=1)
    e0, e1 = epoch_batches(dm, 0), epoch_batches(dm, 1)
    n = N_TRAIN - 100
    assert [len(x) for x, _ in e0] == [64] * (n // 64) + [n % 64]
    assert len(dm.train_dataloader()) == len(e0)
    # Every training image exactly once per epoch, in a new order.
    for batches in (e0, e1):
        seen = torch.cat([x for x, _ in batches])
        torch.testing.assert_close(seen.sum(0), dm.split("train")[0].sum(0))
    assert not torch.equal(e0[0][0], e1[0][0])
    again = epoch_batches(make(mnist_root, seed=3), 1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e1, again, strict=True))
    other_seed = epoch_batches(make(mnist_root, seed=4), 1)
    assert not torch.equal(e1[0][0], other_seed[0][0])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_grouped_batches_are_the_batches_one_by_one(mnist_root, num_workers):
    """batches_per_call only groups the epoch's batches: same batches, same order, last group short."""
    one = make(mnist_root, seed=2, batch_size=64, batches_per_call=1)
    three = make(mnist_root, seed=2, batch_size=64, batches_per_call=3, num_workers=num_workers)
    loader = three.train_dataloader()
    loader.sampler.set_epoch(1)
    groups = list(loader)
    n_batches = -(-(N_TRAIN - 100) // 64)  # 8
    assert [len(g) for g in groups] == [3, 3, 2] and len(loader) == 3 == -(-n_batches // 3)
    for a, b in zip(epoch_batches(one, 1), [b for g in groups for b in g], strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mid_epoch_state_resumes_only_with_the_same_grouping(mnist_root):
    three = make(mnist_root, batches_per_call=3).train_dataloader()
    three.progress = lambda: 1  # one call of the epoch trained
    state = three.state_dict()
    assert state == {"epoch": 0, "trained_batches": 1, "batches_per_call": 3}
    again = make(mnist_root, batches_per_call=3).train_dataloader()
    again.load_state_dict(state)
    assert [len(g) for g in again] == [3, 2]  # the rest of the epoch's 8 batches
    with pytest.raises(DataError, match=r"stopped mid-epoch with data.batches_per_call=3; resume with data"):
        make(mnist_root, batches_per_call=2).train_dataloader().load_state_dict(state)


def test_eval_batches_are_in_order(mnist_root):
    dm = make(mnist_root, eval_batch_size=30)
    x = torch.cat([b[0] for b in dm.test_dataloader()])
    assert torch.equal(x, dm.split("test")[0])


def test_sampler_shards_across_ranks():
    shards = [list(BatchIndexSampler(10, 2, shuffle=True, seed=0, rank=r, world_size=3)) for r in range(3)]
    flat = [torch.cat(s) for s in shards]
    assert all(len(f) == 3 for f in flat)
    assert len(torch.cat(flat).unique()) == 9  # disjoint, equal-sized shards of one order


def test_worker_processes_serve_the_same_batches(mnist_root):
    in_process = epoch_batches(make(mnist_root, seed=1), 2)
    with_workers = epoch_batches(make(mnist_root, seed=1, num_workers=1), 2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(in_process, with_workers, strict=True))


def test_missing_data_names_root_files_and_fix(tmp_path):
    dm = MNISTDataModule(root=str(tmp_path), download=False)
    with pytest.raises(DataError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte" in msg and "data.root=" in msg
    assert "\n" not in msg


def test_a_failed_download_says_so_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """As torchvision does offline: it makes MNIST/raw, starts a file, then fails."""

    def offline_mnist(root, train, download):
        raw = Path(root) / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b partial")
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("sae.data.mnist.MNIST", offline_mnist)
    kept = tmp_path / "data"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    for root, left in ((kept, ["notes.txt"]), (tmp_path / "new", None)):
        with pytest.raises(DataError, match="download failed: .*name resolution"):
            MNISTDataModule(root=str(root), download=True).prepare_data()
        assert (sorted(p.name for p in root.iterdir()) if root.exists() else None) == left


def copy_of(mnist_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(mnist_root / "MNIST" / "raw", raw)
    return raw


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) // 2], "is truncated or corrupt: its header promises 600x28x28 bytes"),
        (lambda b: b + b"\0" * 10, "is truncated or corrupt"),
        (lambda b: b"\x89PNG" + b[4:], "is not an MNIST IDX file"),
        (lambda b: b"", "is not an MNIST IDX file"),
    ],
    ids=["truncated", "extended", "wrong-magic", "empty"],
)
def test_corrupt_file_is_named(mnist_root, tmp_path, damage, message):
    raw = copy_of(mnist_root, tmp_path)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError) as err:
        make(tmp_path)
    assert str(path) in str(err.value) and message in str(err.value)
    assert "delete it" in str(err.value)


def test_images_and_labels_must_agree(mnist_root, tmp_path):
    raw = copy_of(mnist_root, tmp_path)
    write_idx_labels(raw / "t10k-labels-idx1-ubyte", np.zeros(N_TEST - 1))
    with pytest.raises(DataError, match=f"{N_TEST} t10k images, {N_TEST - 1} labels"):
        make(tmp_path)


def test_val_size_that_leaves_no_training_images_is_named_before_reading(mnist_root):
    dm = MNISTDataModule(root=str(mnist_root), download=False, val_size=N_TRAIN)
    with pytest.raises(
        DataError, match=f"data.val_size={N_TRAIN} must be in \\[0, {N_TRAIN}\\): .* holds {N_TRAIN}"
    ):
        dm.prepare_data()  # from the file's header, before any split is read or pass runs


@pytest.mark.parametrize(
    "prefix, damage, message",
    [
        ("train", "images", "holds 32x32 images; MNIST's are 28x28"),
        ("train", "labels", "holds labels up to 10; MNIST's are 0..9"),
        ("t10k", "labels", "holds labels up to 255; MNIST's are 0..9"),
    ],
    ids=["image-size", "train-label-10", "test-label-255"],
)
def test_valid_idx_files_with_other_content_are_named(mnist_root, tmp_path, prefix, damage, message):
    raw = copy_of(mnist_root, tmp_path)
    n = N_TRAIN if prefix == "train" else N_TEST
    if damage == "images":
        path = raw / f"{prefix}-images-idx3-ubyte"
        write_idx_images(path, np.zeros((n, 32, 32)))
    else:
        path = raw / f"{prefix}-labels-idx1-ubyte"
        write_idx_labels(path, np.full(n, 10 if prefix == "train" else 255))
    dm = MNISTDataModule(root=str(tmp_path), download=False, val_size=100)
    with pytest.raises(DataError) as err:
        dm.prepare_data()
    assert str(path) in str(err.value) and message in str(err.value)


def test_an_unreadable_or_missing_file_is_named(mnist_root, tmp_path, monkeypatch):
    raw = copy_of(mnist_root, tmp_path)
    locked = raw / "t10k-images-idx3-ubyte"
    real_open = open

    def no_permission(path, *args, **kwargs):
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_permission)  # as root, chmod would not stop us
    dm = MNISTDataModule(root=str(tmp_path), download=False, val_size=100)
    with pytest.raises(DataError, match=f"cannot read {locked}: Permission denied; check its permissions"):
        dm.prepare_data()
    monkeypatch.undo()
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte missing in"):
        dm.prepare_data()


@pytest.mark.slow
def test_real_mnist(real_mnist_root):
    dm = make(real_mnist_root, val_size=5000)
    sizes = {k: len(dm.split(k)[0]) for k in ("train", "val", "test")}
    assert sizes == {"train": 55000, "val": 5000, "test": 10000}
    x = dm.split("train")[0]
    assert x.shape[1] == 784 and float(x.min()) == 0.0 and float(x.max()) == 1.0
    # MNIST's published mean pixel intensity is about 0.1307.
    assert float(x.mean()) == pytest.approx(0.1307, abs=2e-3)
    assert torch.bincount(dm.split("test")[1]).tolist()[:2] == [980, 1135]


def test_a_split_is_read_once_per_process_until_its_files_change(mnist_root, tmp_path):
    """A sweep's jobs in one process share the read; a file rewritten since is read again."""
    root = tmp_path / "copy"
    shutil.copytree(mnist_root, root)
    first = load_mnist_split(root, train=False)
    again = load_mnist_split(root, train=False)
    assert again[0] is first[0] and again[1] is first[1]
    labels_file = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    raw = bytearray(labels_file.read_bytes())
    raw[8] = (raw[8] + 1) % 10  # the first test label, changed
    labels_file.write_bytes(bytes(raw))
    changed = load_mnist_split(root, train=False)
    assert changed[1] is not first[1] and int(changed[1][0]) == (int(first[1][0]) + 1) % 10
    assert torch.equal(changed[0], first[0])
