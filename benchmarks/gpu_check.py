"""One command for a short GPU loan: the GPU figures of docs/performance.md against their targets.

    python benchmarks/gpu_check.py --prepare                 here: fill .gpu/ for the GPU machine
    python benchmarks/gpu_check.py [--device cuda] [--data-root DIR] [--tiny]

Runs, each in a process of its own, and ends with one table (measured, target, met):

  1. benchmarks/epoch_time.py     (a)/(c), train.py's epoch against the notebook loop's: >= 30x
  2. python train.py              the default 10-epoch run's fit/seconds (training time): < 3 s
  3. benchmarks/sweep_time.py     16 jobs: vectorized <= 2x one job, and >= 8x the basic launcher
  4. pytest tests/test_cuda.py    the tests of the CUDA path: all pass

A GPU machine here has torch, Lightning, TensorBoard and seaborn, but no hydra-core, omegaconf or
antlr4, no network and no MNIST. `--prepare` (run here, where pip can download) puts their wheels
and the real MNIST (compressed) into .gpu/, which git ignores and the device tool carries; the
command it prints installs the wheels there and runs this script.

`--device cpu --tiny` is the dry path (tests/test_benchmarks.py): a few epochs of each and a 2-job
grid, on whatever data root it is given. Its targets are the GPU's: on a CPU they are not met.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRIED = ROOT / ".gpu"  # git-ignored
MISSING_THERE = ("hydra-core", "omegaconf", "antlr4-python3-runtime")  # pure Python: any platform
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
DEVICE_COMMAND = (
    "python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl"
    " && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --device cuda"
    " --data-root .gpu/data 2>&1 | tee $OUT/gpu_check.log"
)


def prepare(shared_mnist: Path) -> None:
    """Wheels that the GPU machine lacks, and the compressed MNIST, into .gpu/."""
    wheels = CARRIED / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pinned = [f"{name}=={version(name)}" for name in MISSING_THERE]  # the versions tested here
    # `pip wheel`: antlr4's runtime is published as source only; built here, it is a plain wheel.
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels)]
    subprocess.run([*pip_wheel, *pinned], check=True)
    raw = CARRIED / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        shutil.copyfile(shared_mnist / f"{name}.gz", raw / f"{name}.gz")
    print(f"ready: {CARRIED}; on the GPU machine (device tool, carry ['.gpu']):\n  {DEVICE_COMMAND}")


def unpack_mnist(root: Path) -> None:
    """MNIST/raw/*.gz -> the uncompressed files torchvision reads offline (when missing)."""
    raw = root / "MNIST" / "raw"
    for name in MNIST_FILES:
        if not (raw / name).is_file() and (raw / f"{name}.gz").is_file():
            with gzip.open(raw / f"{name}.gz") as src, open(raw / f"{name}.tmp", "wb") as dst:
                shutil.copyfileobj(src, dst)
            (raw / f"{name}.tmp").rename(raw / name)


def run(command: list[str], label: str, timeout: float) -> str:
    """Run a step, echo its output, and return it; a failed step is reported, not fatal."""
    print(f"\n== {label}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        failed = proc.returncode != 0
    except subprocess.TimeoutExpired as err:
        out, failed = f"{err.stdout or ''}{err.stderr or ''}\n(timed out after {timeout:.0f} s)", True
    print(out[-4000:], flush=True)
    print(f"== {label}: {'FAILED' if failed else 'done'} in {time.perf_counter() - start:.1f} s", flush=True)
    return out


def number(pattern: str, text: str) -> float | None:
    found = re.search(pattern, text)
    return float(found.group(1)) if found else None


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--prepare", action="store_true", help="fill .gpu/ (here), then stop")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--data-root", default=os.environ.get("SAE_DATA_DIR", "data"))
    parser.add_argument("--tiny", action="store_true", help="the dry path: few epochs, a 2-job grid")
    parser.add_argument("--shared-mnist", default=str(ROOT.parent / "shared" / "data" / "MNIST" / "raw"))
    args = parser.parse_args()
    if args.prepare:
        prepare(Path(args.shared_mnist))
        return
    unpack_mnist(Path(args.data_root))

    python = sys.executable
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    # The dry path: the test data holds 600 training images; no probe or figures after each run.
    lean = ["~callbacks.linear_probe", "~callbacks.run_figures", "~callbacks.epoch_visuals"]
    small = ["data.val_size=100", *lean] if args.tiny else []
    epochs = ["--epochs", "2", "--timing-only", "--overrides", *small] if args.tiny else []
    grid = (
        ["--betas", "1e-3,5e-3", "--rhos", "0.05", "--epochs", "1", "--overrides", *small]
        if args.tiny
        else []
    )
    data = ["--data-root", args.data_root]
    results: dict[str, float | None] = {}

    out = run(
        [python, "benchmarks/epoch_time.py", "--device", args.device, *data, *epochs], "epoch time", 300
    )
    results["(a)/(c) per epoch"] = number(r"\(a\)/\(c\) speed-up over the reference loop: ([\d.]+)x", out)

    with tempfile.TemporaryDirectory() as folder:
        fit = [python, "train.py", f"accelerator={accelerator}", f"data.root={args.data_root}"]
        fit += [f"hydra.run.dir={folder}", "+trainer.enable_progress_bar=false"] + (
            ["epochs=2", *small] if args.tiny else []
        )
        run(fit, "default run", 300)
        metrics = Path(folder) / "metrics.json"
        results["default run fit/seconds"] = (
            json.loads(metrics.read_text())["fit/seconds"] if metrics.is_file() else None
        )

    out = run([python, "benchmarks/sweep_time.py", "--device", args.device, *data, *grid], "sweep time", 400)
    results["vectorized / single"] = number(r"vectorized / single: ([\d.]+)x", out)
    results["basic / vectorized"] = number(r"basic / vectorized:\s+([\d.]+)x", out)
    results["test/mse, launchers apart"] = number(r"between the launchers' jobs: ([\d.e+-]+)", out)

    out = run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"], "CUDA tests", 300
    )
    ran = re.search(r"\d+ (passed|skipped|failed)", out)  # pytest's summary line (skipped: no GPU)
    failed = sum(float(n) for n in re.findall(r"(\d+) (?:failed|errors?)\b", out))
    results["CUDA tests failed"] = failed if ran else None

    targets = {
        "(a)/(c) per epoch": (">=", 30.0),
        "default run fit/seconds": ("<", 3.0),
        "vectorized / single": ("<=", 2.0),
        "basic / vectorized": (">=", 8.0),
        "test/mse, launchers apart": ("<=", 1e-3),
        "CUDA tests failed": ("==", 0.0),
    }
    compare = {">=": float.__ge__, "<=": float.__le__, "<": float.__lt__, "==": float.__eq__}
    where = f"{args.device}{' (tiny: the dry path)' if args.tiny else ''}"
    print(f"\nGPU check on {where}, {time.strftime('%Y-%m-%d')}\n")
    print("| figure | measured | target | met |")
    print("| --- | --- | --- | --- |")
    for name, (op, target) in targets.items():
        value = results[name]
        met = "n/a (failed)" if value is None else ("yes" if compare[op](float(value), target) else "no")
        shown = "-" if value is None else f"{value:.4g}"
        print(f"| {name} | {shown} | {op} {target:g} | {met} |")


if __name__ == "__main__":
    main()
