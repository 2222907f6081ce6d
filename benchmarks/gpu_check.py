"""One command for a short GPU loan: the GPU figures of docs/performance.md against their targets.

    python benchmarks/gpu_check.py --prepare                 here: fill .gpu/ for the GPU machine
    python benchmarks/gpu_check.py [--device cuda] [--data-root DIR] [--tiny]

Runs, each in a process of its own, and ends with one table (measured, target, met):

  1. benchmarks/epoch_time.py     (a)/(c), train.py's epoch against the notebook loop's: >= 30x
                                  (4 epochs, timing only)
  2. python train.py              the default 10-epoch run's fit/seconds (training time): < 3 s,
                                  each step one replayed CUDA graph; and with cuda_graph=false
  3. benchmarks/sweep_time.py     16 jobs: vectorized <= 2x one job, and >= 8x the basic launcher
  4. pytest tests/test_cuda.py    the tests of the CUDA path (the recorded step against the eager
                                  one, fresh and resumed): all pass
  5. benchmarks/step_time.py      ms per optimizer step: eager, fused Adam, one CUDA graph (no
                                  target; each variant's loss per round, to find where a NaN starts)

The steps share one time budget (--budget seconds, for a device loan's single command): each gets
at most what is left of it, and the table is printed whatever happened. With --log-dir, each
step's whole output is kept there too (one file per step).

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
    " --data-root .gpu/data --log-dir $OUT 2>&1 | tee $OUT/gpu_check.log"
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


class Steps:
    """Runs the check's steps against one shared deadline, keeping each step's output."""

    def __init__(self, budget: float, log_dir: Path | None) -> None:
        self.deadline = time.monotonic() + budget
        self.log_dir = log_dir

    def run(self, command: list[str], label: str, limit: float) -> str:
        """Run a step, echo its output's end, and return it; a failed step is reported, not fatal."""
        timeout = min(limit, self.deadline - time.monotonic())
        print(f"\n== {label}: {' '.join(command[1:])}", flush=True)
        if timeout < 10:
            print(f"== {label}: SKIPPED (the budget is spent)", flush=True)
            return ""
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            out = proc.stdout + proc.stderr
            failed = proc.returncode != 0
        except subprocess.TimeoutExpired as err:
            captured = [
                part.decode() if isinstance(part, bytes) else part or "" for part in (err.stdout, err.stderr)
            ]
            out, failed = f"{''.join(captured)}\n(timed out after {timeout:.0f} s)", True
        if self.log_dir is not None:
            (self.log_dir / f"{re.sub(r'[^a-z0-9]+', '_', label.lower())}.log").write_text(out)
        print(out[-4000:], flush=True)
        print(
            f"== {label}: {'FAILED' if failed else 'done'} in {time.perf_counter() - start:.1f} s", flush=True
        )
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
    parser.add_argument("--budget", type=float, default=460, help="seconds for all steps together")
    parser.add_argument("--log-dir", type=Path, help="keep each step's whole output here")
    parser.add_argument("--shared-mnist", default=str(ROOT.parent / "shared" / "data" / "MNIST" / "raw"))
    args = parser.parse_args()
    if args.prepare:
        prepare(Path(args.shared_mnist))
        return
    data_root = str(Path(args.data_root).resolve())
    unpack_mnist(Path(data_root))
    steps = Steps(args.budget, args.log_dir)

    python = sys.executable
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    # The dry path: the test data holds 600 training images; no probe or figures after each run.
    lean = ["~callbacks.linear_probe", "~callbacks.run_figures", "~callbacks.epoch_visuals"]
    small = ["data.val_size=100", *lean] if args.tiny else []
    # Timing only: the peak-memory and start-up processes would cost a minute of the loan.
    epochs = (
        ["--epochs", "2", "--timing-only", "--real-rounds", "0", "--overrides", *small]
        if args.tiny
        else ["--epochs", "4", "--timing-only", "--real-rounds", "0"]  # step 2 is the real run
    )
    grid = (
        ["--betas", "1e-3,5e-3", "--rhos", "0.05", "--epochs", "1", "--overrides", *small]
        if args.tiny
        else []
    )
    data = ["--data-root", data_root]
    results: dict[str, float | None] = {}

    # Cheapest and most telling first: a step cut off by the budget should be the long sweep.
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]  # one process
    out = steps.run([*pytest, "tests/test_cuda.py"], "CUDA tests", 240)
    ran = re.search(r"\d+ (passed|skipped|failed)", out)  # pytest's summary line (skipped: no GPU)
    failed = sum(float(n) for n in re.findall(r"(\d+) (?:failed|errors?)\b", out))
    results["CUDA tests failed"] = failed if ran else None

    out = steps.run(
        [python, "benchmarks/epoch_time.py", "--device", args.device, *data, *epochs], "epoch time", 200
    )
    results["(a)/(c) per epoch"] = number(r"\(a\)/\(c\) speed-up over the reference loop: ([\d.]+)x", out)

    eager = "default run fit/seconds, cuda_graph=false"
    for graph, label, name in (
        ("true", "default run", "default run fit/seconds"),
        ("false", "default run, eager", eager),
    ):
        with tempfile.TemporaryDirectory() as folder:
            fit = [python, "train.py", f"accelerator={accelerator}", f"data.root={data_root}"]
            fit += [f"hydra.run.dir={folder}", "+trainer.enable_progress_bar=false", f"cuda_graph={graph}"]
            fit += ["epochs=2", *small] if args.tiny else []
            steps.run(fit, label, 120)
            metrics = Path(folder) / "metrics.json"
            results[name] = json.loads(metrics.read_text())["fit/seconds"] if metrics.is_file() else None

    step_args = ["--steps", "20"] if args.tiny else []
    out = steps.run([python, "benchmarks/step_time.py", "--device", args.device, *step_args], "step time", 90)
    columns = r"\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)x"  # warm-up s, ms/step, s/epoch, vs eager
    results["step: fused Adam / eager"] = number(r"fused Adam" + columns, out)
    results["step: CUDA graph / eager"] = number(r"CUDA graph" + columns, out)

    out = steps.run(
        [python, "benchmarks/sweep_time.py", "--device", args.device, *data, *grid], "sweep time", 400
    )
    results["vectorized / single"] = number(r"vectorized / single: ([\d.]+)x", out)
    results["basic / vectorized"] = number(r"basic / vectorized:\s+([\d.]+)x", out)
    results["test/mse, launchers apart"] = number(r"between the launchers' jobs: ([\d.e+-]+)", out)

    targets = {
        "(a)/(c) per epoch": (">=", 30.0),
        "default run fit/seconds": ("<", 3.0),
        "default run fit/seconds, cuda_graph=false": None,  # what the graph buys: no target
        "vectorized / single": ("<=", 2.0),
        "basic / vectorized": (">=", 8.0),
        "test/mse, launchers apart": ("<=", 1e-3),
        "CUDA tests failed": ("==", 0.0),
        "step: fused Adam / eager": None,  # measured for the next lever: no target
        "step: CUDA graph / eager": None,
    }
    compare = {">=": float.__ge__, "<=": float.__le__, "<": float.__lt__, "==": float.__eq__}
    where = torch_device_name(args.device) + (" (tiny: the dry path)" if args.tiny else "")
    print(f"\nGPU check on {where}, {time.strftime('%Y-%m-%d')}\n")
    print("| figure | measured | target | met |")
    print("| --- | --- | --- | --- |")
    for name, target in targets.items():
        value = results.get(name)
        shown = "-" if value is None else f"{value:.4g}"
        if target is None:
            print(f"| {name} | {shown} | - | - |")
            continue
        op, bound = target
        met = "n/a (failed)" if value is None else ("yes" if compare[op](float(value), bound) else "no")
        print(f"| {name} | {shown} | {op} {bound:g} | {met} |")


def torch_device_name(device: str) -> str:
    """The device and the releases that ran on it (the GPU machine has its own torch)."""
    probe = "import torch, lightning; print(torch.__version__, lightning.__version__, "
    probe += "torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    torch_version, lightning_version, name = (proc.stdout.split(maxsplit=2) + ["?"] * 3)[:3]
    return f"{device} ({name.strip()}; torch {torch_version}, lightning {lightning_version})"


if __name__ == "__main__":
    main()
