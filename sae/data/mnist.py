"""MNIST as in-memory tensors, served as whole batches by index.

torchvision's MNIST + ToTensor + default collate converts every image through PIL and stacks
128 tensors per batch; that, not the model, dominates the reference notebook's epoch time. Here
the uint8 images are read once, scaled to float in [0, 1] once, and each batch is one indexing
operation on a resident tensor (on the training device when it is a GPU).
"""

from __future__ import annotations

import itertools
import math
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import MNIST

from sae.errors import UserError, one_line
from sae.internals import batches_trained_this_epoch

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
DOWNLOAD_TIMEOUT_S = 20
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
FIX = "copy it again, or delete it and let torchvision download it (data.download=true)"


class DataError(UserError, RuntimeError):
    """The data set is missing or unreadable; the message says which file and how to fix it."""


class BatchIndexSampler(Sampler[Tensor]):
    """Yields one index tensor per batch.

    Shuffled orders are drawn from a generator seeded by (seed, epoch), not from a running
    stream, so a run resumed at epoch k sees exactly the batches an uninterrupted run would.
    Lightning calls `set_epoch` on a loader's `sampler` each epoch. Under DDP each rank keeps
    every world_size-th index of the (shared) order.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_items = num_items
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _per_rank(self) -> int:
        return self.num_items // self.world_size if self.world_size > 1 else self.num_items

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_items, generator=generator)
        else:
            order = torch.arange(self.num_items)
        if self.world_size > 1:
            order = order[self.rank : self._per_rank() * self.world_size : self.world_size]
        order = order.to(self.device)  # one copy per epoch; batches below are device slices
        for i in range(len(self)):
            yield order[i * self.batch_size : (i + 1) * self.batch_size]


class TensorBatches:
    """An iterable of batches sliced from resident tensors: no workers, no collate.

    With `group` > 1 each item is a list of up to `group` consecutive (images, labels) batches of
    `batch_size`, sliced from one gather (the sampler yields group * batch_size indices): the
    module takes one optimizer step per batch, and Lightning's per-call hooks run once per group.

    Stateful, so a checkpoint written mid-epoch (on Ctrl+C or SIGTERM) resumes exactly: the state
    is the epoch and how many of its items were trained (`progress`, read from the Trainer at
    save time, not counted here, since Lightning fetches an item ahead), and the resumed epoch
    skips those items of the same (seed, epoch) order. The skip count is in items of `group`
    batches, so a resumed epoch must group its batches the same way.
    """

    batch_sampler = None  # as in a DataLoader with batch_size=None: Lightning reads `sampler`

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        sampler: BatchIndexSampler,
        progress: Callable[[], int] | None = None,
        group: int = 1,
        batch_size: int | None = None,
    ) -> None:
        self.images = images
        self.labels = labels
        self.sampler = sampler
        self.progress = progress
        self.group = group
        self.batch_size = batch_size
        self._resume_at: tuple[int, int] | None = None  # (epoch, items already trained)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        skip = 0
        if self._resume_at is not None and self._resume_at[0] == self.sampler.epoch:
            skip = self._resume_at[1]
        self._resume_at = None
        for idx in itertools.islice(self.sampler, skip, None):
            yield fetch(self.images, self.labels, idx, self.group, self.batch_size)

    def state_dict(self) -> dict[str, int]:
        if self.progress is None:
            return {}
        trained = self.progress()
        return {"epoch": self.sampler.epoch, "trained_batches": trained, "batches_per_call": self.group}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not state:
            return
        # "batches_per_step": the same setting in checkpoints written before it was renamed.
        saved = state.get("batches_per_call", state.get("batches_per_step", 1))
        counts = (state.get("epoch"), state.get("trained_batches"), saved)
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise DataError(
                f"the checkpoint's place in its epoch ({state}) is not three counts (epoch, trained_batches, "
                "batches_per_call); refused (not a checkpoint this project wrote, or altered)"
            )
        if saved != self.group:
            raise DataError(
                f"this checkpoint stopped mid-epoch with data.batches_per_call={saved}; "
                f"resume with data.batches_per_call={saved} (the config has {self.group})"
            )
        self._resume_at = (state["epoch"], state["trained_batches"])


def fetch(images: Tensor, labels: Tensor, idx: Tensor, group: int = 1, batch_size: int | None = None):
    """(images, labels) at idx, or with group > 1 the list of its consecutive batch_size slices."""
    x, y = images[idx], labels[idx]
    if group == 1:
        return x, y
    return list(zip(x.split(batch_size), y.split(batch_size), strict=True))


class _IndexedTensors(Dataset):
    """Lets worker processes serve the same index batches (fetching a whole item per index tensor)."""

    def __init__(self, images: Tensor, labels: Tensor, group: int = 1, batch_size: int | None = None) -> None:
        self.images, self.labels = images, labels
        self.group, self.batch_size = group, batch_size

    def __getitem__(self, idx: Tensor):
        return fetch(self.images, self.labels, idx, self.group, self.batch_size)

    def __len__(self) -> int:
        return len(self.images)


# The splits read last in this process, by file and the files' size and time: the jobs of a sweep
# run in one process read the same files, once. Callers index or copy them, never change them.
_read: dict[tuple, tuple[Tensor, Tensor]] = {}


def load_mnist_split(root: str | Path, train: bool) -> tuple[Tensor, Tensor]:
    """Read one MNIST split as (float images in [0, 1] flattened to 784, int64 labels)."""
    raw = Path(root) / "MNIST" / "raw"
    prefix = "train" if train else "t10k"
    images_file, labels_file = (raw / f"{prefix}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1"))
    count = check_split_files(images_file, labels_file, root)
    files = (images_file, labels_file)
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _read:
        stale = [k for k in _read if k[0][0] == key[0][0]]  # an earlier version of these files
        for k in stale:
            del _read[k]
        _read[key] = _read_mnist_split(root, train, raw, labels_file, count)
    return _read[key]


class TrainValSplit(NamedTuple):
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    train_indices: Tensor  # into the 60k training images, sorted


# The last split made in this process, with the images it was made from: a sweep's jobs share it
# (and a job handing its probe to sae.run.handoff sends the same tensors again, not a copy).
_last_split: tuple[Tensor, int, int, TrainValSplit] | None = None


def train_val_split(images: Tensor, labels: Tensor, val_size: int, split_seed: int) -> TrainValSplit:
    """The training images split into train and val by a permutation seeded with split_seed; each
    part keeps the images' order. Callers index or copy the parts, never change them."""
    global _last_split
    if _last_split is not None and _last_split[0] is images and _last_split[1:3] == (val_size, split_seed):
        return _last_split[3]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = order[:val_size].sort().values, order[val_size:].sort().values
    train, val = (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])
    split = TrainValSplit(train, val, train_idx)
    _last_split = (images, val_size, split_seed, split)
    return split


def _read_mnist_split(
    root: str | Path, train: bool, raw: Path, labels_file: Path, count: int
) -> tuple[Tensor, Tensor]:
    try:
        ds = MNIST(str(root), train=train, download=False)
    except (RuntimeError, AssertionError, ValueError, OSError) as err:
        raise DataError(f"cannot read MNIST from {raw}: {one_line(err)}") from err
    labels = ds.targets.to(torch.int64)
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < NUM_CLASSES:
        raise DataError(
            f"{labels_file} holds labels {int(labels.min())}..{int(labels.max())}; MNIST's are 0..9 "
            f"({count} labels); {FIX}"
        )
    return ds.data.reshape(len(ds.data), -1).to(torch.float32).div_(255.0), labels


def check_mnist_files(root: str | Path, val_size: int) -> None:
    """Check the four files from their headers and labels, and that the validation split leaves
    training images: cheap, so done before training (and before evaluate.py's test pass)."""
    raw = Path(root) / "MNIST" / "raw"
    for prefix in ("train", "t10k"):
        images_file, labels_file = (raw / f"{prefix}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1"))
        count = check_split_files(images_file, labels_file, root)
        labels = np.frombuffer(labels_file.read_bytes(), dtype=np.uint8, offset=8)
        if len(labels) and labels.max() >= NUM_CLASSES:
            raise DataError(f"{labels_file} holds labels up to {labels.max()}; MNIST's are 0..9; {FIX}")
        if prefix == "train" and not 0 <= val_size < count:
            raise DataError(
                f"data.val_size={val_size} must be in [0, {count}): {images_file} holds {count} images, "
                "and training needs at least one"
            )


def check_split_files(images_file: Path, labels_file: Path, root: str | Path) -> int:
    """Check one split's image and label files from their headers alone; return the image count."""
    missing = [p.name for p in (images_file, labels_file) if not p.is_file()]
    if missing:
        raise DataError(missing_data_message(root, missing))
    shape, labels_shape = check_idx_file(images_file), check_idx_file(labels_file)
    if len(shape) != 3 or shape[1:] != list(IMAGE_SHAPE):
        dims = "x".join(map(str, shape[1:])) or "no"
        raise DataError(f"{images_file} holds {dims} images; MNIST's are 28x28; {FIX}")
    if len(labels_shape) != 1 or labels_shape[0] != shape[0]:
        prefix = images_file.name.split("-")[0]
        raise DataError(
            f"MNIST files in {images_file.parent} do not match: {shape[0]} {prefix} images, "
            f"{labels_shape[0]} labels"
        )
    return shape[0]


def check_idx_file(path: Path) -> list[int]:
    """Check an MNIST IDX file's header against its size; return its shape (count first).

    torchvision reads a truncated or corrupt file into an assertion or reshape error that names
    no file; this names the file and says what to do.
    """
    try:
        with open(path, "rb") as f:
            header = f.read(16)
        size = path.stat().st_size
    except OSError as err:  # e.g. no read permission
        raise DataError(f"cannot read {path}: {err.strerror or err}; check its permissions") from err
    dims = {0x801: 1, 0x803: 3}.get(int.from_bytes(header[:4], "big")) if len(header) >= 8 else None
    if dims is None:
        raise DataError(f"{path} is not an MNIST IDX file (unknown header); {FIX}")
    shape = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    expected = 4 + 4 * dims + math.prod(shape)
    if size != expected:
        raise DataError(
            f"{path} is truncated or corrupt: its header promises {'x'.join(map(str, shape))} bytes of data "
            f"({expected} bytes in all), the file has {size}; {FIX}"
        )
    return shape


def missing_data_message(root: str | Path, missing: list[str] | None = None) -> str:
    raw = Path(root) / "MNIST" / "raw"
    missing = missing or [name for name in MNIST_FILES if not (raw / name).is_file()] or list(MNIST_FILES)
    return (
        f"MNIST not found under data root {str(root)!r}: {', '.join(missing)} missing in {raw}; "
        "put the files there, or point data.root=... (or SAE_DATA_DIR) at a folder holding MNIST/raw"
    )


class MNISTDataModule(L.LightningDataModule):
    """MNIST train/val from the 60k training images (split fixed by split_seed), test = the 10k test set.

    Each training item is a list of `batches_per_call` consecutive batches (the last one of an
    epoch may hold fewer), and the module takes one optimizer step per batch: the batches, their
    order and the trained weights are the same for any value; larger values pay Lightning's
    per-call hooks less often.

    What callbacks and other code read: `split(name)`, the (images, labels) tensors of "train",
    "val" or "test", loaded on first use.
    """

    def __init__(
        self,
        root: str = "data",
        val_size: int = 5000,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        num_workers: int = 0,
        download: bool = True,
        seed: int = 0,
        split_seed: int = 0,
        on_device: bool | None = None,
        batches_per_call: int = 16,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}
        self.train_indices: Tensor | None = None

    def prepare_data(self) -> None:
        """Have the four files (downloading them if allowed), and check them before any pass runs."""
        root = self.hparams.root
        if not all((Path(root) / "MNIST" / "raw" / name).is_file() for name in MNIST_FILES):
            self._download()
        check_mnist_files(root, self.hparams.val_size)

    def _download(self) -> None:
        root = self.hparams.root
        if not self.hparams.download:
            raise DataError(f"{missing_data_message(root)} (data.download=false)")
        # The outermost of root/MNIST/raw that the download creates: removed again if it fails, so a
        # failed download leaves nothing behind (everything in it would be the download's).
        created = next((p for p in (Path(root), Path(root) / "MNIST", Path(root) / "MNIST" / "raw")
                        if not p.exists()), None)  # fmt: skip
        previous_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # fail in seconds, not minutes, when offline
        try:
            MNIST(str(root), train=True, download=True)
            MNIST(str(root), train=False, download=True)
        except Exception as err:  # no network, mirror down, disk full...
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            raise DataError(f"{missing_data_message(root)} (download failed: {one_line(err)})") from err
        finally:
            socket.setdefaulttimeout(previous_timeout)

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """The (images, labels) of split "train", "val" or "test", loaded on first use."""
        if name not in self.splits:
            self.setup("test" if name == "test" else "fit")
        return self.splits[name]

    def setup(self, stage: str | None = None) -> None:
        """Load what the stage needs, once: train/val for fit and validate, the test set for test."""
        hp = self.hparams
        wanted = {"fit": ["train"], "validate": ["train"], "test": ["test"]}.get(stage, ["train", "test"])
        if "train" in wanted and "train" not in self.splits:
            images, labels = load_mnist_split(hp.root, train=True)
            if not 0 <= hp.val_size < len(images):
                raise DataError(
                    f"data.val_size={hp.val_size} must be in [0, {len(images)}) for {len(images)} images"
                )
            split = train_val_split(images, labels, hp.val_size, hp.split_seed)
            self.train_indices = split.train_indices  # into the 60k training images, e.g. for comparisons
            self._keep("train", *split.train)
            self._keep("val", *split.val)
        if "test" in wanted and "test" not in self.splits:
            self._keep("test", *load_mnist_split(hp.root, train=False))

    def _keep(self, split: str, images: Tensor, labels: Tensor) -> None:
        device = self._device()
        self.splits[split] = (images.to(device), labels.to(device))

    def _device(self) -> torch.device:
        """Where the resident tensors live: the training device when it is a GPU (on_device=None)."""
        trainer = self.trainer
        root_device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        on_device = self.hparams.on_device
        if on_device is None:
            on_device = root_device.type == "cuda" and self.hparams.num_workers == 0
        return root_device if on_device else torch.device("cpu")

    def _loader(
        self,
        split: str,
        batch_size: int,
        shuffle: bool,
        drop_last: bool = False,
        progress: Callable[[], int] | None = None,
        group: int = 1,
    ):
        images, labels = self.splits[split]
        trainer = self.trainer
        sampler = BatchIndexSampler(
            len(images),
            batch_size * group,  # consecutive batches of the same order, `group` per item
            shuffle=shuffle,
            seed=self.hparams.seed,
            drop_last=drop_last,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            device=images.device,
        )
        if self.hparams.num_workers > 0:
            return DataLoader(
                _IndexedTensors(images, labels, group, batch_size),
                sampler=sampler,
                batch_size=None,
                num_workers=self.hparams.num_workers,
                persistent_workers=True,
            )
        return TensorBatches(images, labels, sampler, progress, group, batch_size)

    def train_dataloader(self):
        trainer = self.trainer
        overfit = trainer is not None and trainer.overfit_batches > 0
        hp = self.hparams
        progress = (lambda: batches_trained_this_epoch(trainer)) if trainer is not None else None
        return self._loader("train", hp.batch_size, not overfit, progress=progress, group=hp.batches_per_call)

    def val_dataloader(self):
        return self._loader("val", self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self):
        return self._loader("test", self.hparams.eval_batch_size, shuffle=False)
