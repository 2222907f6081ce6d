"""Each sweep job's tail, this checkout against a baseline commit, in one invocation.

    python benchmarks/sweep_tail.py --baseline REF [--betas ...] [--rhos ...] [--epochs 2]

Runs the same grid (default 16 jobs: 4 beta x 4 rho, 2 epochs, the basic launcher, CPU) with the
baseline's code (`git archive REF`, into a temporary folder) and with this checkout's, one after
the other, as a user would:

    python train.py -m beta=... rho=... epochs=2 accelerator=cpu

and prints, for each: the sweep's wall time (process start to exit, figures and summary
included), the jobs' training time (sum of fit/seconds), and what each job costs beyond its
training: (wall - sum of fit/seconds) / jobs, which holds the process start once, and each job's
set-up, test pass, probe, figures and summary. It also checks that both wrote every job's nine
figures and metrics, and gives the largest difference of each probe accuracy between the two
(the same runs, so the same trained models up to float rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import timed_run  # noqa: E402

PROBES = ("test/probe_accuracy", "test/probe_accuracy_pixels", "test/probe_accuracy_reconstructions")


def sweep(code: Path, out: Path, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        "train.py",
        "-m",
        f"beta={args.betas}",
        f"rho={args.rhos}",
        f"epochs={args.epochs}",
        f"data.root={args.data_root}",
        "accelerator=cpu",
        "+trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={out}",
    ]
    wall = timed_run(command, f"the sweep in {code}", cwd=code)
    jobs = sorted((p for p in out.iterdir() if (p / "metrics.json").is_file()), key=lambda p: int(p.name))
    metrics = {p.name: json.loads((p / "metrics.json").read_text()) for p in jobs}
    figures = {p.name: len(list((p / "plots").glob("*.png"))) for p in jobs}
    fit = sum(m["fit/seconds"] for m in metrics.values())
    return {"wall": wall, "fit": fit, "jobs": len(jobs), "metrics": metrics, "figures": figures}


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--baseline", required=True, help="the commit to compare with (e.g. HEAD~3)")
    parser.add_argument("--betas", default="1e-3,5e-3,2e-2,5e-2")
    parser.add_argument("--rhos", default="0.02,0.05,0.1,0.2")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--data-root", default=os.environ.get("SAE_DATA_DIR", "data"))
    args = parser.parse_args()
    args.data_root = str(Path(args.data_root).resolve())
    baseline = subprocess.run(
        ["git", "rev-parse", "--short", args.baseline], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    current = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old_code = tmp / "baseline"
        old_code.mkdir()
        archive = subprocess.run(["git", "archive", baseline], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(old_code)], input=archive.stdout, check=True)
        results = {
            f"baseline {baseline}": sweep(old_code, tmp / "before", args),
            f"this checkout {current}{' (modified)' if dirty else ''}": sweep(ROOT, tmp / "after", args),
        }

    before, after = results.values()
    print(
        f"\n{before['jobs']}-job sweep (beta {args.betas} x rho {args.rhos}), {args.epochs} epochs each, "
        f"basic launcher, CPU ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}\n"
    )
    header = f"{'code':<28} {'wall s':>8} {'fit s':>8} {'beyond training, s/job':>23} {'figures':>8}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        per_job = (r["wall"] - r["fit"]) / r["jobs"]
        figures = f"{sum(r['figures'].values())}/{9 * r['jobs']}"
        print(f"{name:<28} {r['wall']:>8.1f} {r['fit']:>8.1f} {per_job:>23.2f} {figures:>8}")
    print(f"\nwall time, baseline / this checkout: {before['wall'] / after['wall']:.2f}x")
    for key in PROBES:
        diffs = [abs(after["metrics"][j][key] - m[key]) for j, m in before["metrics"].items()]
        print(f"{key}: largest difference between the two, over {len(diffs)} jobs: {max(diffs):.4f}")
    mse = max(
        abs(after["metrics"][j]["test/mse"] - m["test/mse"]) / m["test/mse"]
        for j, m in before["metrics"].items()
    )
    print(f"test/mse: largest relative difference: {mse:.1e} (the same runs)")


if __name__ == "__main__":
    main()
