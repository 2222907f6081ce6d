"""Seconds per training epoch: the reference notebook's loop, the hardware floor, and train.py.

    python benchmarks/epoch_time.py [--device cpu|cuda] [--epochs N] [--data-root DIR]

On the real MNIST, default model (784-128-32-128-784), loss (MSE + beta * KL) and batch size 128:

  (a) reference  torchvision MNIST + ToTensor + DataLoader(batch 128, shuffle) + a plain PyTorch
                 loop that reads the loss every step, as the notebook does
  (b) floor      the same model and loss over the training images as one tensor on the device,
                 batches by index: no DataLoader, no logging, no validation
  (c) train.py   this project's training as `python train.py` runs it: the same config, DataModule,
                 LightningModule, Trainer and callbacks (progress bar, TensorBoard, checkpoints,
                 per-epoch validation and visuals); its epoch time includes all of them
  (d) real run   the user's own command, `python train.py accelerator=cpu|gpu` with the defaults
                 (10 epochs, probes and figures), in its own process: s/epoch is its
                 `fit/seconds / fit/epochs` from metrics.json, and its whole wall time is
                 reported against the floor's 10 epochs

Timing: the three run interleaved in one process, an epoch of (a) and one of (b) after each epoch
of (c), so that a machine whose speed drifts (shared virtual machines do, by a third and more
within a minute) slows all three alike; the ratios are medians of per-epoch ratios. The first
epoch is reported apart as warm-up. (d) cannot be interleaved (it is its own process): it runs
--real-rounds times after (c), each run followed by epochs of the floor in this process, and its
ratio to the floor is the median over those pairs. Peak memory comes from a separate process per
variant ((d): the peak RSS of its process). (a) and (b) train on the same 55k training images as
(c). Last, the time from `python train.py` starting to its first training step (interpreter,
imports, config, data setup).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import sync, train_config  # noqa: E402
from sae.core.model import SparseAutoencoder  # noqa: E402
from sae.core.sparsity import kl_sparsity  # noqa: E402
from sae.data.mnist import load_mnist_split  # noqa: E402
from sae.training.fit import build_data_and_module, build_trainer  # noqa: E402

BATCH, RHO, BETA, LR = 128, 0.05, 5e-3, 1e-3
NAMES = {"a": "reference loop", "b": "floor", "c": "train.py"}
REAL = "d"


class PlainLoop:
    """(a) and (b): Adam on MSE + beta * KL of the latent's batch means, one epoch per call."""

    def __init__(self, batches, device: torch.device, seed: int, read_loss: bool) -> None:
        torch.manual_seed(seed)
        self.net = SparseAutoencoder().to(device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=LR)
        self.batches, self.device, self.read_loss = batches, device, read_loss
        self.times: list[float] = []

    def epoch(self) -> None:
        self.net.train()
        sync(self.device)
        start = time.perf_counter()
        running = 0.0
        for x in self.batches():
            out = self.net(x)
            loss = F.mse_loss(out.recon, x) + BETA * kl_sparsity(RHO, out.code.mean(dim=0))
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            if self.read_loss:
                running += loss.item()  # the notebook's running loss: a host sync per step
        sync(self.device)
        self.times.append(time.perf_counter() - start)


def reference_loop(root: str, train_indices: torch.Tensor, device: torch.device) -> PlainLoop:
    dataset = datasets.MNIST(root, train=True, download=False, transform=transforms.ToTensor())
    loader = DataLoader(Subset(dataset, train_indices.tolist()), batch_size=BATCH, shuffle=True)

    def batches():
        for images, _ in loader:
            yield images.view(images.shape[0], -1).to(device)

    return PlainLoop(batches, device, seed=1, read_loss=True)


def floor_loop(images: torch.Tensor, device: torch.device) -> PlainLoop:
    images = images.to(device)
    generator = torch.Generator().manual_seed(0)

    def batches():
        order = torch.randperm(len(images), generator=generator).to(device)
        yield from (images[idx] for idx in order.split(BATCH))

    return PlainLoop(batches, device, seed=2, read_loss=False)


def project_config(args, output_dir: str):
    accelerator = f"accelerator={'gpu' if args.device == 'cuda' else 'cpu'}"
    return train_config(args.data_root, output_dir, f"epochs={args.epochs}", accelerator, *args.overrides)


class Interleave(L.Callback):
    """Times each epoch of (c), then runs one epoch of every plain loop before the next one."""

    def __init__(self, device: torch.device, loops: list[PlainLoop]) -> None:
        self.device, self.loops = device, loops
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        sync(self.device)
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # after validation and checkpoints
        sync(self.device)
        self.times.append(time.perf_counter() - self.start)
        for loop in self.loops:
            loop.epoch()


def test_mse(net: torch.nn.Module, images: torch.Tensor, device: torch.device) -> float:
    """Mean squared error per pixel over the 10k test images, the same function for every variant."""
    net.to(device).eval()  # Lightning hands a fitted module back on the CPU
    total = 0.0
    with torch.no_grad():
        for chunk in images.split(2000):
            chunk = chunk.to(device)
            total += float(((net(chunk).recon - chunk) ** 2).sum())
    return total / images.numel()


def project_run(args, device: torch.device, interleave: bool) -> dict:
    """(c) as train.py runs it; with interleave, (a) and (b) train between its epochs."""
    with tempfile.TemporaryDirectory() as out:
        cfg = project_config(args, out)
        datamodule, module = build_data_and_module(cfg)
        trainer = build_trainer(cfg)
        loops = {}
        if interleave:
            train_images = datamodule.split("train")[0]  # the same training images for (a) and (b)
            loops = {
                "a": reference_loop(args.data_root, datamodule.train_indices, device),
                "b": floor_loop(train_images, device),
            }
        clock = Interleave(device, list(loops.values()))
        trainer.callbacks.append(clock)
        trainer.fit(module, datamodule=datamodule)
    test_images = load_mnist_split(args.data_root, train=False)[0]
    results = {"c": {"times": clock.times, "test_mse": test_mse(module.net, test_images, device)}}
    for name, loop in loops.items():
        results[name] = {"times": loop.times, "test_mse": test_mse(loop.net, test_images, device)}
    return results


def peak_memory(args, variant: str) -> float:
    """Peak memory of one variant alone, two epochs, in a fresh process (MiB: RSS, or CUDA allocated)."""
    command = [sys.executable, __file__, "--memory-of", variant, "--device", args.device]
    command += ["--data-root", args.data_root, "--overrides", *args.overrides]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    mark = re.search(r"PEAK_MIB (\S+)", proc.stdout)
    if proc.returncode != 0 or mark is None:
        raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
    return float(mark.group(1))


def memory_child(args) -> None:
    device = torch.device(args.device)
    args.epochs = 2
    if args.memory_of == "c":
        project_run(args, device, interleave=False)
    else:
        images, _ = load_mnist_split(args.data_root, train=True)
        indices = torch.arange(min(55000, len(images)))
        loop = (
            reference_loop(args.data_root, indices, device)
            if args.memory_of == "a"
            else floor_loop(images[indices], device)
        )
        loop.epoch()
        loop.epoch()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"PEAK_MIB {peak:.1f}")


def train_command(args, out: str, *overrides: str) -> list[str]:
    """`python train.py` on this data and device, writing into out."""
    accelerator = f"accelerator={'gpu' if args.device == 'cuda' else 'cpu'}"
    run = [f"data.root={args.data_root}", f"hydra.run.dir={out}", accelerator, *overrides]
    return [sys.executable, str(ROOT / "train.py"), *run]


def real_run(args) -> dict:
    """(d): `python train.py` with the defaults in its own process (the environment as the user's,
    so the entry point's own thread settings apply): its s/epoch, wall time, peak RSS, test MSE."""
    with tempfile.TemporaryDirectory() as out:
        command = train_command(args, out, *args.overrides)
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, stderr = proc.communicate()
        wall = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(f"python train.py failed:\n{stderr.decode()[-3000:]}")
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    return {
        "epoch": metrics["fit/seconds"] / metrics["fit/epochs"],
        "epochs": metrics["fit/epochs"],
        "wall": wall,
        "peak_mib": usage.ru_maxrss / 1024,  # the largest child so far: run (d) before the memory children
        "test_mse": metrics["test/mse"],
    }


def real_rounds(args, device: torch.device, images: torch.Tensor) -> dict:
    """(d) --real-rounds times, each followed by 1 + 3 epochs of the floor (the first warm-up)."""
    runs, floors = [], []
    for r in range(args.real_rounds):
        print(f"(d) python train.py, round {r + 1} of {args.real_rounds} ...", file=sys.stderr, flush=True)
        runs.append(real_run(args))
        floor = floor_loop(images, device)
        for _ in range(4):
            floor.epoch()
        floors.append(statistics.median(floor.times[1:]))
    return {
        "runs": runs,
        "floor": floors,
        "epoch_ratio": statistics.median(r["epoch"] / f for r, f in zip(runs, floors, strict=True)),
        "wall_ratio": statistics.median(
            r["wall"] / (f * r["epochs"]) for r, f in zip(runs, floors, strict=True)
        ),
    }


def first_step_seconds(args) -> float:
    """From launching `python train.py` to its first training step."""
    with tempfile.TemporaryDirectory() as out:
        clock = "+callbacks.first_step._target_=benchmarks.first_step.FirstStepClock"
        command = train_command(args, out, clock, *args.overrides)
        start = time.time()
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        mark = re.search(r"FIRST_STEP (\d+\.\d+)", proc.stdout)  # the progress bar shares stdout
        if mark is None:
            raise RuntimeError(f"train.py never reached a training step:\n{proc.stderr[-2000:]}")
        return float(mark.group(1)) - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of each variant; the first is warm-up")
    parser.add_argument(
        "--data-root",
        default=os.environ.get("SAE_DATA_DIR", "data"),
        help="folder holding MNIST/raw (default: $SAE_DATA_DIR, else ./data)",
    )
    parser.add_argument(
        "--overrides", nargs="*", default=[], help="train.py overrides for (c) (and its split)"
    )
    parser.add_argument(
        "--real-rounds", type=int, default=2, help="runs of (d), each followed by the floor (0: none)"
    )
    parser.add_argument("--timing-only", action="store_true", help="no peak memory, no start-up time")
    parser.add_argument("--memory-of", choices=sorted(NAMES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        memory_child(args)
        return
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first one is warm-up)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")

    device = torch.device(args.device)
    print(f"timing (a), (b), (c) interleaved, {args.epochs} epochs each ...", file=sys.stderr, flush=True)
    results = project_run(args, device, interleave=True)
    real = None
    if args.real_rounds > 0:  # before the memory children: its peak is the largest child's so far
        images, _ = load_mnist_split(args.data_root, train=True)
        real = real_rounds(args, device, images[:55000])  # as many images as the training split
    startup = float("nan")
    for name in NAMES:
        results[name]["peak_mib"] = float("nan")
        if not args.timing_only:
            print(f"peak memory of ({name}) alone ...", file=sys.stderr, flush=True)
            results[name]["peak_mib"] = peak_memory(args, name)
    if not args.timing_only:
        print("time to the first training step of python train.py ...", file=sys.stderr, flush=True)
        startup = first_step_seconds(args)

    def ratio(num: str, den: str) -> float:
        pairs = zip(results[num]["times"][1:], results[den]["times"][1:], strict=True)
        return statistics.median(x / y for x, y in pairs)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(
        f"\nepoch time on {args.device} ({where}, {torch.get_num_threads()} CPU threads, torch "
        f"{torch.__version__}), {args.epochs} epochs of 55000 images, batch {BATCH}\n"
    )
    header = f"{'variant':<20} {'warm-up s':>10} {'median s/epoch':>15} {'peak MiB':>9} {'test MSE':>9}"
    print(header)
    print("-" * len(header))
    for name, label in NAMES.items():
        r = results[name]
        median = statistics.median(r["times"][1:])
        print(
            f"({name}) {label:<16} {r['times'][0]:>10.3f} {median:>15.3f} {r['peak_mib']:>9.0f} "
            f"{r['test_mse']:>9.5f}"
        )
    if real is not None:
        runs = real["runs"]
        median = statistics.median(r["epoch"] for r in runs)
        print(
            f"({REAL}) {'real run':<16} {'':>10} {median:>15.3f} {runs[0]['peak_mib']:>9.0f} "
            f"{runs[0]['test_mse']:>9.5f}  ({runs[0]['epochs']} epochs)"
        )
    print()
    print(f"(a)/(c) speed-up over the reference loop: {ratio('a', 'c'):.2f}x  (target >= 3x)")
    print(f"(c)/(b) overhead over the floor:          {ratio('c', 'b'):.2f}x  (target <= 1.15x)")
    if real is not None:
        walls = ", ".join(f"{r['wall']:.1f}" for r in real["runs"])
        floors = ", ".join(f"{f:.3f}" for f in real["floor"])
        print(
            f"({REAL})/(b) real epoch over the floor:       {real['epoch_ratio']:.2f}x  (target <= 1.15x; "
            f"floor after each run: {floors} s/epoch)"
        )
        print(
            f"({REAL}) whole run over the floor's epochs:   {real['wall_ratio']:.2f}x  (target <= 1.8x; "
            f"wall {walls} s)"
        )
    print(f"python train.py, process start to first training step: {startup:.2f} s")
    print(json.dumps({n: r["times"] for n, r in results.items()}), file=sys.stderr)


if __name__ == "__main__":
    main()
