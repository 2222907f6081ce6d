"""Each sweep job's tail, this checkout against a baseline commit, in one invocation.

    python benchmarks/sweep_tail.py --baseline REF [--betas ...] [--rhos ...] [--epochs 2]

Runs the same grid (default 16 jobs: 4 beta x 4 rho, 2 epochs, the basic launcher, CPU) with the
baseline's code (`git archive REF`, into a temporary folder) and with this checkout's, one after
the other, as a user would:

    python train.py -m beta=... rho=... epochs=2 accelerator=cpu

and prints, for each: the sweep's wall time (process start to exit, figures and summary
included), the jobs' training time (sum of fit/seconds), and what each job costs beyond its
training: (wall - sum of fit/seconds) / jobs, which holds the process start once, and each job's
set-up, test pass, probe, figures and summary; and that split in two, read off the times each
job's files were written: its set-up (before its training loop) and its tail (from the end of
its training to the start of the next job). It also checks that both wrote every job's nine
figures and metrics, and gives the largest difference of each probe accuracy between the two
(the same runs, so the same trained models up to float rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import BETAS, RHOS, timed_run  # noqa: E402

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
    phases = job_phases(jobs, [m["fit/seconds"] for m in metrics.values()])
    return {"wall": wall, "fit": fit, "jobs": len(jobs), "metrics": metrics, "figures": figures, **phases}


def job_end(job: Path) -> float:
    """When train() logged the job's closing lines (`run folder: ...`), from its log's time stamp."""
    from datetime import datetime

    for line in (job / "train.log").read_text().splitlines():
        if "] - run folder: " in line:
            return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise ValueError(f"{job / 'train.log'} has no closing lines: the job did not finish")


def job_phases(jobs: list[Path], fit_seconds: list[float]) -> dict[str, list[float]]:
    """Each job's set-up and tail in seconds, read off the times its files were written.

    A job starts when Hydra writes its .hydra/config.yaml, and its training ends when the last
    epoch's checkpoints/last.ckpt is written; its set-up is the time before the training loop
    (start to training end, less fit/seconds), its tail the time from its training's end to the
    next job's start. The tail in two: the job's own (to the closing lines train() logs last:
    test pass, probes and figures or their hand-off, metrics.json, status.json; status.json and
    metrics.json are written again when a hand-off is recorded, so their times do not say it) and
    the switch to the next job (the summary tables, Hydra composing the next job's config). The
    last job has no next one: its tail is not counted (the sweep's end waits for its hand-offs).
    """
    starts = [(job / ".hydra" / "config.yaml").stat().st_mtime for job in jobs]
    trained = [(job / "checkpoints" / "last.ckpt").stat().st_mtime for job in jobs]
    ended = [job_end(job) for job in jobs]
    return {
        "setup": [end - fit - start for start, end, fit in zip(starts, trained, fit_seconds, strict=True)],
        "tail": [next_start - end for end, next_start in zip(trained[:-1], starts[1:], strict=True)],
        "own": [end - done for done, end in zip(trained[:-1], ended[:-1], strict=True)],
        "switch": [next_start - end for end, next_start in zip(ended[:-1], starts[1:], strict=True)],
    }


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--baseline", required=True, help="the commit to compare with (e.g. HEAD~3)")
    parser.add_argument("--betas", default=BETAS)
    parser.add_argument("--rhos", default=RHOS)
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
    header = (
        f"{'code':<28} {'wall s':>8} {'fit s':>8} {'beyond training, s/job':>23} "
        f"{'set-up s/job':>13} {'tail s/job':>11} {'own':>6} {'switch':>7} {'tail max':>9} {'figures':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        per_job = (r["wall"] - r["fit"]) / r["jobs"]
        setup, tail, own, switch = (statistics.median(r[k]) for k in ("setup", "tail", "own", "switch"))
        figures = f"{sum(r['figures'].values())}/{9 * r['jobs']}"
        print(
            f"{name:<28} {r['wall']:>8.1f} {r['fit']:>8.1f} {per_job:>23.2f} "
            f"{setup:>13.2f} {tail:>11.2f} {own:>6.2f} {switch:>7.2f} {max(r['tail']):>9.2f} {figures:>8}"
        )
    print(
        "(set-up and tail: medians over the jobs, the last job's tail not counted; the tail = the job's "
        "own (test pass, probes, figures or their hand-off, metrics.json) + the switch to the next job "
        "(summary tables, Hydra composing its config))"
    )
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
