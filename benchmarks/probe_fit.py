"""The code probe's cost and its noise: converged to a gradient tolerance against the old 100-step stop.

    python benchmarks/probe_fit.py CHECKPOINT [CHECKPOINT ...] [--tolerance 1e-5] [--threads N]

For each checkpoint, its 55k training codes and 10k test codes are encoded once; the probe
(`sae.report.probe.fit_linear_classifier`) is fitted on the codes scaled by 1 - 1e-7, 1 and 1 + 1e-7
(a change the float32 codes' last bits can make) with 100 L-BFGS steps and to the tolerance, in
this one process, and scored on the test codes scaled alike. The table gives the three accuracies
of each fit (their spread is the probe's arithmetic noise), the seconds per fit, and the ratio of
the converged fit's time to the 100-step fit's (the baseline, measured in the same invocation).
docs/probe.md quotes it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sae.data.mnist import MNISTDataModule  # noqa: E402
from sae.report.probe import CODE_PROBE_MAX_ITER, fit_linear_classifier  # noqa: E402
from sae.training.checkpoints import load_checkpoint  # noqa: E402

SCALES = (1 - 1e-7, 1.0, 1 + 1e-7)


def fits(train_codes, train_y, test_codes, test_y, **settings) -> tuple[list[float], float]:
    """The accuracies under each scaling, and the mean seconds per fit."""
    accuracies, start = [], time.perf_counter()
    for scale in SCALES:
        classifier = fit_linear_classifier(train_codes * scale, train_y, **settings)
        accuracies.append(classifier.accuracy(test_codes * scale, test_y))
    return accuracies, (time.perf_counter() - start) / len(SCALES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data", default=os.environ.get("SAE_DATA_DIR", "data"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = MNISTDataModule(root=args.data, download=False)
    (train_x, train_y), (test_x, test_y) = data.split("train"), data.split("test")
    print(f"| checkpoint | 100 steps | tolerance {args.tolerance:g} | s per fit (100 / tol) | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for path in args.checkpoints:
        module, _ = load_checkpoint(path)
        with torch.no_grad():
            train_codes, test_codes = module.net.encode_all(train_x), module.net.encode_all(test_x)
        early, early_s = fits(train_codes, train_y, test_codes, test_y, max_iter=100)
        converged, converged_s = fits(
            train_codes, train_y, test_codes, test_y, max_iter=CODE_PROBE_MAX_ITER, tolerance=args.tolerance
        )
        shown = [", ".join(f"{a:.4f}" for a in accs) for accs in (early, converged)]
        print(
            f"| {path} | {shown[0]} | {shown[1]} | {early_s:.2f} / {converged_s:.2f} | "
            f"{converged_s / early_s:.2f}x |"
        )


if __name__ == "__main__":
    main()
