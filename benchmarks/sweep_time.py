"""Wall time of a 16-job grid: Hydra's basic launcher (one job after another) against the vectorized one.

    python benchmarks/sweep_time.py [--device cpu|cuda] [--epochs 2] [--data-root DIR]

Runs, as a user would from the command line, on the real MNIST:

  single      python train.py                        one job of the grid, for scale
  basic       python train.py -m beta=4 values rho=4 values          16 jobs, one after another
  vectorized  the same with hydra/launcher=vectorized                16 jobs as one stacked model

and prints the wall time of each (process start to exit, summaries included), the ratio
basic/vectorized, vectorized/single, and the largest relative difference in test/mse between
the two launchers' jobs (the vectorized jobs must be the same runs).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import BETAS, RHOS, timed_run  # noqa: E402


def test_mse(sweep: Path) -> dict[tuple[str, str], float]:
    with open(sweep / "summary.csv") as f:
        return {(r["beta"], r["rho"]): float(r["test/mse"]) for r in csv.DictReader(f)}


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--data-root", default=os.environ.get("SAE_DATA_DIR", "data"))
    parser.add_argument("--betas", default=BETAS, help="the grid's beta values (default: 4)")
    parser.add_argument("--rhos", default=RHOS, help="the grid's rho values (default: 4)")
    parser.add_argument("--overrides", nargs="*", default=[], help="more train.py overrides for every run")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")

    common = [
        f"data.root={args.data_root}",
        f"epochs={args.epochs}",
        f"accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        "+trainer.enable_progress_bar=false",
        *args.overrides,
    ]
    train = [sys.executable, str(ROOT / "train.py")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        grid = [f"beta={args.betas}", f"rho={args.rhos}"]
        seconds = {
            "single": timed_run([*train, *common, f"hydra.run.dir={tmp / 'single'}"], "single"),
            "basic": timed_run([*train, *common, *grid, f"hydra.sweep.dir={tmp / 'basic'}", "-m"], "basic"),
            "vectorized": timed_run(
                [*train, *common, *grid, "hydra/launcher=vectorized", f"hydra.sweep.dir={tmp / 'vec'}", "-m"],
                "vectorized",
            ),
        }
        basic, vectorized = test_mse(tmp / "basic"), test_mse(tmp / "vec")
    jobs = len(args.betas.split(",")) * len(args.rhos.split(","))
    if basic.keys() != vectorized.keys() or len(basic) != jobs:
        raise SystemExit(f"the sweeps differ: {sorted(basic)} vs {sorted(vectorized)}")
    worst = max(abs(vectorized[k] - basic[k]) / basic[k] for k in basic)

    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{os.cpu_count()} CPU cores"
    grid = f"beta {args.betas} x rho {args.rhos}"
    print(f"\n{jobs}-job grid ({grid}), {args.epochs} epochs each, {args.device} ({where})\n")
    print(f"{'launcher':<22} {'wall s':>8}")
    print("-" * 31)
    print(f"{'single job':<22} {seconds['single']:>8.1f}")
    print(f"{f'basic ({jobs} jobs)':<22} {seconds['basic']:>8.1f}")
    print(f"{f'vectorized ({jobs} jobs)':<22} {seconds['vectorized']:>8.1f}")
    print()
    speedup = seconds["basic"] / seconds["vectorized"]
    print(f"basic / vectorized:  {speedup:.2f}x  (GPU target >= 8x; CPU: >= 1x)")
    print(f"vectorized / single: {seconds['vectorized'] / seconds['single']:.2f}x  (GPU target <= 2x)")
    print(f"largest relative test/mse difference between the launchers' jobs: {worst:.2e}")


if __name__ == "__main__":
    main()
