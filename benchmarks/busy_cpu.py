"""Seconds per training epoch of the default run, on an idle CPU and beside a competing load.

    python benchmarks/busy_cpu.py [--epochs 2] [--rounds 2] [--load 2] [--settings NAME ...]

Each setting is `python train.py accelerator=cpu epochs=N` (the default model, data, callbacks and
loggers; the probe and the figures, which come after the fit, are left out to save time) in a
process of its own, so that environment variables reach OpenMP before torch loads it. s/epoch
is the run's own `fit/seconds / fit/epochs` (the training loop with its validation).

Conditions: `idle`, then `loaded`: --load busy processes (pure Python loops, each ending by itself
after --load-seconds, and stopped at the end in any case) hold the cores while the settings run,
as other jobs on a shared workstation, a login node or a parallel sweep do. Within a condition
the settings run in rounds, each round every setting once in a rotated order, so that the
machine's drift reaches them alike; the table gives the median over the rounds and the ratio to
the best setting of that condition.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (train.py overrides, environment variables). "default" is train.py as shipped
# (sae.cli.choose_openmp_spin: libgomp's spin when the cores are idle as the run starts,
# GOMP_SPINCOUNT=1000 when other processes keep one busy); the others set a policy, which stands.
SETTINGS: dict[str, tuple[list[str], dict[str, str]]] = {
    "default": ([], {}),
    "libgomp's default (GOMP_SPINCOUNT=300000)": ([], {"GOMP_SPINCOUNT": "300000"}),
    "short spin (GOMP_SPINCOUNT=1000)": ([], {"GOMP_SPINCOUNT": "1000"}),
    "threads=1": (["threads=1"], {}),
    "OMP_WAIT_POLICY=passive": ([], {"OMP_WAIT_POLICY": "PASSIVE"}),
    "threads=1, passive": (["threads=1"], {"OMP_WAIT_POLICY": "PASSIVE"}),
    "GOMP_SPINCOUNT=10000": ([], {"GOMP_SPINCOUNT": "10000"}),
    "OMP_WAIT_POLICY=active": ([], {"OMP_WAIT_POLICY": "ACTIVE"}),
}
OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")
BUSY_LOOP = """
import sys, time
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
"""


def seconds_per_epoch(name: str, epochs: int, data_root: str, folder: Path) -> float:
    overrides, env = SETTINGS[name]
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "accelerator=cpu",
        f"epochs={epochs}",
        f"data.root={data_root}",
        f"hydra.run.dir={folder}",
        "~callbacks.linear_probe",
        "~callbacks.run_figures",
        *overrides,
    ]
    environment = {k: v for k, v in os.environ.items() if k not in OPENMP_VARIABLES}
    proc = subprocess.run(command, cwd=ROOT, env=environment | env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: train.py failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((folder / "metrics.json").read_text())
    return metrics["fit/seconds"] / metrics["fit/epochs"]


def measure(names: list[str], rounds: int, epochs: int, data_root: str, tmp: Path, tag: str) -> dict:
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            folder = tmp / f"{tag}-{r}-{names.index(name)}"
            times[name].append(seconds_per_epoch(name, epochs, data_root, folder))
            print(f"  {tag:<6} round {r + 1}: {name:<42} {times[name][-1]:7.2f} s/epoch", flush=True)
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--load", type=int, default=2, help="busy processes in the loaded condition")
    parser.add_argument("--load-seconds", type=float, default=1800, help="each busy process ends by then")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS)[:4])
    parser.add_argument("--data-root", default=os.environ.get("SAE_DATA_DIR", "data"))
    args = parser.parse_args()

    print(f"{platform.node()}: {os.cpu_count()} cores; {args.epochs} epochs per run, {args.rounds} rounds")
    medians = {}
    with tempfile.TemporaryDirectory() as tmp:
        medians["idle"] = measure(args.settings, args.rounds, args.epochs, args.data_root, Path(tmp), "idle")
        busy = [sys.executable, "-c", BUSY_LOOP, str(args.load_seconds)]
        load = [subprocess.Popen(busy) for _ in range(args.load)]
        try:
            time.sleep(1)
            tag = "loaded"
            medians[tag] = measure(args.settings, args.rounds, args.epochs, args.data_root, Path(tmp), tag)
        finally:
            for proc in load:
                proc.kill()
                proc.wait()

    print(f"\ns/epoch, median of {args.rounds} (ratio to the best setting of the condition)")
    print(f"| setting | idle | with {args.load} busy processes |")
    print("| --- | --- | --- |")
    best = {c: min(m.values()) for c, m in medians.items()}
    for name in args.settings:
        cells = [f"{medians[c][name]:.2f} ({medians[c][name] / best[c]:.2f}x)" for c in ("idle", "loaded")]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    default = "default"
    if default in args.settings:
        print(
            f"\ndefault / best: idle {medians['idle'][default] / best['idle']:.2f}x (target <= 1.1x), "
            f"loaded {medians['loaded'][default] / best['loaded']:.2f}x (target <= 1.5x)"
        )


if __name__ == "__main__":
    main()
