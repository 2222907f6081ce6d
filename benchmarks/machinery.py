"""What each piece of speed machinery buys today: the default run and a 16-job sweep, each with the
piece on (as shipped) and off, in one invocation.

    python benchmarks/machinery.py [--rounds 1] [--epochs 10] [--sweep-epochs 2] [--data-root DIR]
                                   [--only default|sweep]

Every workload runs as a user runs it (`python train.py ...`, a process of its own, CPU), through
this file's `--child` mode, which turns one piece off in that process and then runs train.py as
its `__main__`. The pieces still shipped (docs/performance.md, "What the speed machinery buys",
lists those measured and deleted on 2026-12-03):

  default run (python train.py, 10 epochs):
    shipped              everything on
    batches_per_call=1   one batch per Lightning training call, instead of 16

  16-job sweep (4 beta x 4 rho, python train.py -m, 2 epochs each):
    shipped              Hydra's basic launcher, each job's probes and figures handed to a worker
                         process that runs beside the next job (sae.run.handoff)
    no hand-off          the same, each job's probes and figures done before the next job starts
    vectorized           hydra/launcher=vectorized: the jobs trained as one stacked model, each
                         replayed through train(cfg) (sae.sweep.vectorized, sae.sweep.stacked)

A warm-up run comes first, untimed (the pixel probe's cache, the page cache). Rounds alternate
the variants (round-robin), so that a change in the machine's load falls on all of them; the
table gives each variant's median wall time and its ratio to `shipped` of the same workload
(above 1: the piece saves that much). Compare ratios, not seconds, across machines.
"""

from __future__ import annotations

import argparse
import os
import runpy
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_RUN = {
    "shipped": ([], None),
    "batches_per_call=1": (["data.batches_per_call=1"], None),
}
SWEEP = {
    "shipped": ([], None),
    "no hand-off": ([], "no_hand_off"),
    "vectorized": (["hydra/launcher=vectorized"], None),
}


def turn_off(piece: str) -> None:
    """In the child process, before train.py runs: turn one piece of machinery off."""
    if piece == "no_hand_off":
        from sae.run import handoff

        handoff.more_jobs_follow = lambda: False
    else:
        raise SystemExit(f"unknown piece {piece!r}")


def child(piece: str, arguments: list[str]) -> None:
    """Run train.py as `python train.py ARGUMENTS` would, with `piece` off ("-": none)."""
    from sae.cli import start_process

    start_process()  # what train.py does first, before torch loads
    if piece != "-":
        turn_off(piece)
    sys.argv = [str(ROOT / "train.py"), *arguments]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


def measure(
    variants: dict, common: list[str], rounds: int, folder: Path, multirun: bool
) -> dict[str, list[float]]:
    from benchmarks.common import timed_run

    seconds: dict[str, list[float]] = {name: [] for name in variants}
    # Untimed, first: what the first run of a machine pays once (the pixel probe fitted into its
    # cache, the data files into the page cache) falls on no variant.
    out = (
        [f"hydra.sweep.dir={folder / 'warm-up'}", "-m"]
        if multirun
        else [f"hydra.run.dir={folder / 'warm-up'}"]
    )
    timed_run([sys.executable, __file__, "--child", "-", "--", *common, *out], "warm-up (untimed)")
    for r in range(rounds):
        for i, (name, (overrides, piece)) in enumerate(variants.items()):
            where = folder / f"{r}-{i}"
            out = [f"hydra.sweep.dir={where}", "-m"] if multirun else [f"hydra.run.dir={where}"]
            command = [sys.executable, __file__, "--child", piece or "-", "--", *common, *overrides, *out]
            seconds[name].append(timed_run(command, f"round {r + 1} {name}"))
    return seconds


def table(title: str, seconds: dict[str, list[float]]) -> None:
    base = statistics.median(seconds["shipped"])
    print(f"\n{title}\n")
    print(f"{'variant':<22} {'wall s (median)':>16} {'/ shipped':>10}")
    print("-" * 50)
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:<22} {median:>16.1f} {median / base:>10.2f}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[sys.argv.index("--") + 1 :])
        return
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=10, help="the default run's epochs")
    parser.add_argument("--sweep-epochs", type=int, default=2)
    parser.add_argument("--data-root", default=os.environ.get("SAE_DATA_DIR", "data"))
    parser.add_argument("--only", choices=["default", "sweep"])
    args = parser.parse_args()
    from benchmarks.common import BETAS, RHOS

    common = [f"data.root={args.data_root}", "accelerator=cpu", "+trainer.enable_progress_bar=false"]
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        if args.only != "sweep":
            run = [*common, f"epochs={args.epochs}"]
            results["default"] = measure(DEFAULT_RUN, run, args.rounds, Path(tmp) / "run", multirun=False)
        if args.only != "default":
            grid = [*common, f"epochs={args.sweep_epochs}", f"beta={BETAS}", f"rho={RHOS}"]
            results["sweep"] = measure(SWEEP, grid, args.rounds, Path(tmp) / "sweep", multirun=True)
    where = f"{os.cpu_count()} CPU cores, {args.rounds} round(s)"
    if "default" in results:
        table(f"Default run (python train.py, {args.epochs} epochs), {where}", results["default"])
    if "sweep" in results:
        table(f"16-job sweep (4 beta x 4 rho, {args.sweep_epochs} epochs each), {where}", results["sweep"])


if __name__ == "__main__":
    main()
