"""How a job's time grows on the CPU: its epoch and its after-training tail against latent_dim,
and the vectorized launcher's stacked epoch against the number of stacked jobs.

    python benchmarks/scaling.py [--latent-dims 32 128 512 1024 4096] [--jobs 1 2 4 8 16 32 64]
                                 [--data-root DIR] [--figure docs/figures/scaling_cpu.png]

Part 1, for each latent_dim: the default run (784-128-latent-128-784, KL) for one epoch, in this
process, as train.py builds it (no logger); then its test as train.py runs it, with each tail
callback's hook timed: the test pass (metrics over the 10k test images), the probe
(`LinearProbe`: a classifier fitted on the 55k training codes, and the pixel classifier scored on
reconstructions) and the figures (`RunFigures`: nine PNGs); then the same test as a job of a
sweep run in one process takes it: the seconds on the job's path ("sweep job tail": the test
pass, and the probes and figures handed to the worker process) and the worker's seconds for
them ("worker", on its one thread; the first width's includes loading the pixel classifier).
Part 2: one epoch of N default jobs (differing in beta and seed) stacked into one model, as the
vectorized launcher trains them, against N times one job's stacked epoch.
Prints both tables and draws both curves.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import train_config  # noqa: E402
from sae.run.console import quiet_library_noise  # noqa: E402
from sae.sweep.stacked import StackedTraining  # noqa: E402
from sae.training.callbacks import LinearProbe, RunFigures  # noqa: E402
from sae.training.fit import build_data_and_module, build_trainer, fit_timer, run_test  # noqa: E402

QUICK = ["accelerator=cpu", "epochs=1", "logger=none", "+trainer.enable_progress_bar=false"]


def timed(hook, spent: dict, name: str):
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return hook(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

    return run


def one_job(data_root: str, overrides: list[str], latent_dim: int) -> dict[str, float]:
    """Seconds of one epoch and of the tail's parts, for the default run at this latent_dim."""
    with tempfile.TemporaryDirectory() as out:
        cfg = train_config(data_root, out, *QUICK, *overrides, f"latent_dim={latent_dim}")
        datamodule, module = build_data_and_module(cfg)
        trainer = build_trainer(cfg)
        trainer.fit(module, datamodule=datamodule)
        epoch = fit_timer(trainer).time_elapsed("train")
        spent: dict[str, float] = {}
        for callback in trainer.callbacks:
            if isinstance(callback, LinearProbe):
                callback.on_test_epoch_end = timed(callback.on_test_epoch_end, spent, "probe")
            if isinstance(callback, RunFigures):
                callback.on_test_end = timed(callback.on_test_end, spent, "figures")
        best = trainer.checkpoint_callback.best_model_path
        start = time.perf_counter()
        run_test(trainer, module, datamodule, ckpt_path=best)
        tail = time.perf_counter() - start
        times = {
            "epoch": epoch,
            "test pass": tail - spent["probe"] - spent["figures"],
            "probe": spent["probe"],
            "figures": spent["figures"],
            "tail": tail,
        }
        times["sweep job tail"], times["worker"] = sweep_job_tail(trainer, module, datamodule, best)
    return times


def sweep_job_tail(trainer, module, datamodule, ckpt_path: str) -> tuple[float, float]:
    """The same test as a job of a sweep run in one process would run it: the seconds on the
    job's path (probes and figures handed to the worker), then the worker's seconds for them."""
    from sae.run import handoff

    Path(trainer.default_root_dir, "metrics.json").write_text("{}")  # where the probes' numbers go
    with in_a_sweep():
        start = time.perf_counter()
        run_test(trainer, module, datamodule, ckpt_path=ckpt_path)
        on_path = time.perf_counter() - start
        start = time.perf_counter()
        failed = handoff.wait_for_hand_offs()
        worker = time.perf_counter() - start
    if failed:
        raise RuntimeError(f"the hand-off failed: {failed}")
    return on_path, worker


def stacked_epoch(data_root: str, overrides: list[str], jobs: int) -> float:
    """Seconds of one epoch of `jobs` default jobs stacked into one model."""
    with tempfile.TemporaryDirectory() as out:
        configs = [
            train_config(data_root, f"{out}/{i}", *QUICK, *overrides, f"seed={i}", f"beta={1e-3 * (1 + i)}")
            for i in range(jobs)
        ]
        built = [build_data_and_module(cfg) for cfg in configs]
        datamodule = built[0][0]
        datamodule.setup("fit")
        stacked = StackedTraining([module for _, module in built])
        seeds = [cfg.seed for cfg in configs]
        start = time.perf_counter()
        for _ in stacked.fit(datamodule.split("train")[0], configs[0].batch_size, seeds, 1):
            pass
        return time.perf_counter() - start


@contextlib.contextmanager
def in_a_sweep() -> Iterator[None]:
    """As if more jobs of a sweep followed in this process: work is handed to the worker."""
    from sae.run import handoff

    asked = handoff.more_jobs_follow
    handoff.more_jobs_follow = lambda: True
    try:
        yield
    finally:
        handoff.more_jobs_follow = asked


def warm_up_worker() -> None:
    """Start the sweep's worker process before anything is timed (a sweep starts it once)."""
    from sae.run import handoff

    with in_a_sweep():
        handoff.run_or_hand_off("warm-up", time.sleep, 0)
        handoff.wait_for_hand_offs()


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--latent-dims", type=int, nargs="+", default=[32, 128, 512, 1024, 4096])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--data-root", default=os.environ.get("SAE_DATA_DIR", "data"))
    parser.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "scaling_cpu.png"))
    parser.add_argument(
        "--overrides", nargs="*", default=[], help="more train.py overrides (e.g. small data)"
    )
    args = parser.parse_args()
    quiet_library_noise()
    warm_up_worker()

    print(f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    by_width = {}
    for width in args.latent_dims:
        by_width[width] = one_job(args.data_root, args.overrides, width)
        print(
            f"latent_dim {width}: " + ", ".join(f"{k} {v:.2f} s" for k, v in by_width[width].items()),
            flush=True,
        )
    by_jobs = {}
    for n in args.jobs:
        by_jobs[n] = stacked_epoch(args.data_root, args.overrides, n)
        print(f"{n} stacked jobs: {by_jobs[n]:.2f} s an epoch", flush=True)

    parts = ["epoch", "test pass", "probe", "figures", "tail", "sweep job tail", "worker"]
    print("\n| latent_dim | " + " | ".join(f"{p} s" for p in parts) + " |")
    print("| --- |" + " --- |" * len(parts))
    for width, row in by_width.items():
        print(f"| {width} | " + " | ".join(f"{row[p]:.2f}" for p in parts) + " |")
    one = by_jobs.get(1)
    print("\n| stacked jobs | s an epoch | per job | against one job alone |")
    print("| --- | --- | --- | --- |")
    for n, seconds in by_jobs.items():
        against = f"{seconds / one:.2f}x" if one else "-"
        print(f"| {n} | {seconds:.2f} | {seconds / n:.2f} | {against} |")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    widths = list(by_width)
    for part in parts:
        left.plot(widths, [by_width[w][part] for w in widths], marker="o", label=part)
    left.set(
        xscale="log", yscale="log", xlabel="latent_dim", ylabel="seconds", title="one job: epoch and tail"
    )
    left.set_xticks(widths, [str(w) for w in widths])
    left.legend()
    counts = list(by_jobs)
    right.plot(counts, [by_jobs[n] for n in counts], marker="o", label="stacked epoch")
    if one:
        right.plot(counts, [one * n for n in counts], linestyle="--", color="grey", label="N x one job")
    right.set(xscale="log", yscale="log", xlabel="stacked jobs", ylabel="seconds", title="stacked epoch")
    right.set_xticks(counts, [str(n) for n in counts])
    right.legend()
    fig.suptitle(f"CPU ({os.cpu_count()} cores), default model, real MNIST, {time.strftime('%Y-%m-%d')}")
    fig.tight_layout()
    fig.savefig(args.figure, dpi=100)
    print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()
