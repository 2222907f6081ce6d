"""Milliseconds per optimizer step of the default model and loss, by how the step is launched.

    python benchmarks/step_time.py [--device cpu|cuda] [--steps N] [--batch 128] [--compile]

On a GPU the default model (784-128-32-128-784, batch 128) is far too small to fill the chip: a
step costs what the host spends launching its few dozen kernels, not arithmetic. This measures
what each lever on that cost buys, on the same images resident on the device, with the project's
model, objective (MSE + beta * KL) and Adam at its defaults:

  eager        forward, objective, backward, Adam's default (multi-tensor) update: the floor's step
  fused Adam   the same with Adam(fused=True), the update as one kernel: the step train.py takes
  CUDA graph   forward, objective, backward and a capturable fused Adam recorded once and
               replayed: one launch per step (CUDA only)
  compiled     (--compile) torch.compile of the forward and objective (backward through
               AOTAutograd) and of Adam's step: fused kernels, on the CPU C++ from Inductor

The first steps of each variant are timed apart ("warm-up s": capture, or compilation, which
Inductor caches on disk: a second invocation compiles from its cache). Last, the arithmetic: the
floating-point operations of one step (torch's FlopCounterMode) against what this device's
matrix multiply reaches in the same invocation, i.e. the fastest a step could be.

Each variant trains its own copy of the same initial weights on the same batches; the table
gives ms per step (median of rounds), the epoch this is for 430 steps (55k images), and how far
the variant's loss is from eager's, after the first round and the last (a lever that changes the
training is no lever).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import sync  # noqa: E402
from sae.core.loss import objective  # noqa: E402
from sae.training.module import SparseAutoencoderModule  # noqa: E402

STEPS_PER_EPOCH = 430  # 55000 training images in batches of 128


def eager_step(module: SparseAutoencoderModule, fused: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    optimizer = torch.optim.Adam(module.parameters(), lr=module.hparams.lr, fused=fused)

    def step(x: torch.Tensor) -> torch.Tensor:
        loss = objective("mse", module.method, module.net(x), x)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def compiled_step(module: SparseAutoencoderModule) -> Callable[[torch.Tensor], torch.Tensor]:
    optimizer = torch.optim.Adam(module.parameters(), lr=module.hparams.lr)
    loss_of = torch.compile(lambda x: objective("mse", module.method, module.net(x), x)["loss"])
    update = torch.compile(optimizer.step)

    def step(x: torch.Tensor) -> torch.Tensor:
        loss = loss_of(x)
        optimizer.zero_grad(set_to_none=False)  # the compiled update keeps its gradient buffers
        loss.backward()
        update()
        return loss.detach()

    return step


def step_flops(module: SparseAutoencoderModule, x: torch.Tensor) -> int:
    """Floating-point operations of one training step's forward and backward (the matrix
    products; Adam's and the objective's elementwise work are a few per parameter or value)."""
    from torch.utils.flop_counter import FlopCounterMode

    module = copy.deepcopy(module)
    with FlopCounterMode(display=False) as counter:
        objective("mse", module.method, module.net(x), x)["loss"].backward()
    return counter.get_total_flops()


def matmul_rate(device: torch.device, size: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of a float32 square matrix product on this device: the arithmetic it can reach."""
    a, b = torch.rand(size, size, device=device), torch.rand(size, size, device=device)
    best = math.inf
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeats / best


def graphed_step(
    module: SparseAutoencoderModule, example: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The whole step as one CUDA graph (PyTorch's whole-network capture recipe)."""
    optimizer = torch.optim.Adam(module.parameters(), lr=module.hparams.lr, fused=True, capturable=True)
    static_x = example.clone()

    def body() -> torch.Tensor:
        loss = objective("mse", module.method, module.net(static_x), static_x)["loss"]
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
        return loss.detach()

    # Warm-up on a side stream (allocates grads and Adam's state), then rewind to the same start.
    start_state = copy.deepcopy(module.state_dict())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(side)
    module.load_state_dict(start_state)
    for state in optimizer.state.values():
        for value in state.values():
            value.zero_()  # step counts and moments back to a fresh Adam
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_loss = body()

    def step(x: torch.Tensor) -> torch.Tensor:
        static_x.copy_(x)
        graph.replay()
        return static_loss.clone()

    return step


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=400, help="steps per round (5 rounds)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="add the torch.compile variant")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    device = torch.device(args.device)

    torch.manual_seed(0)
    initial = SparseAutoencoderModule().to(device)
    images = torch.rand(args.steps * args.batch, 784, device=device)  # pixel-like values in [0, 1)
    batches = list(images.split(args.batch))

    variants: dict[str, Callable[[SparseAutoencoderModule], Callable]] = {
        "eager": lambda m: eager_step(m, fused=False),
        "fused Adam": lambda m: eager_step(m, fused=True),
    }
    if device.type == "cuda":
        variants["CUDA graph"] = lambda m: graphed_step(m, batches[0])
    if args.compile:
        variants["compiled"] = compiled_step
    steps = {name: make(copy.deepcopy(initial)) for name, make in variants.items()}
    warm_up: dict[str, float] = {}
    for name, step in steps.items():  # the first steps: capture, compilation (every variant takes them)
        sync(device)
        start = time.perf_counter()
        for x in batches[:3]:
            step(x)
        sync(device)
        warm_up[name] = time.perf_counter() - start

    rounds: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, list[float]] = {name: [] for name in steps}  # the loss after each round
    for _ in range(5):  # rounds alternate the variants, so drift slows all alike
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            for x in batches:
                loss = step(x)
            sync(device)
            rounds[name].append((time.perf_counter() - start) / len(batches))
            losses[name].append(float(loss))

    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    )
    print(
        f"\nstep time on {args.device} ({where}, torch {torch.__version__}), batch {args.batch}, "
        f"5 rounds of {len(batches)} steps\n"
    )
    header = (
        f"{'variant':<12} {'warm-up s':>9} {'ms/step':>8} {'s/epoch':>8} {'vs eager':>9} "
        f"{'loss, round 1':>14} {'round 5':>10}"
    )
    print(header)
    print("-" * len(header))
    eager = statistics.median(rounds["eager"])
    for name, times in rounds.items():
        median = statistics.median(times)
        first, last = losses[name][0], losses[name][-1]
        print(
            f"{name:<12} {warm_up[name]:>9.2f} {1e3 * median:>8.3f} {STEPS_PER_EPOCH * median:>8.3f} "
            f"{eager / median:>8.2f}x "
            f"{first:>14.7g} {last:>10.7g}"
        )
    for name, values in losses.items():  # where a loss stops being finite, if one does
        print(f"{name:<12} loss after each round: {', '.join(f'{v:.6g}' for v in values)}")
    spread = max(abs(v[-1] - losses["eager"][-1]) for v in losses.values())
    print(f"\nlargest difference from eager's final loss: {spread:.2e}")
    if not all(math.isfinite(v) for values in losses.values() for v in values):
        print("warning: a loss is not finite (see the rounds above)")
    flops, rate = step_flops(initial, batches[0]), matmul_rate(device)
    fastest = min(statistics.median(times) for times in rounds.values())
    print(
        f"\narithmetic: {flops / 1e6:.0f} MFLOP a step; a {1024}x{1024} matrix product here reaches "
        f"{rate / 1e9:.1f} GFLOP/s, so a step could take {1e3 * flops / rate:.3f} ms; the fastest "
        f"variant reaches {flops / fastest / 1e9:.1f} GFLOP/s ({flops / fastest / rate:.0%} of it)"
    )


if __name__ == "__main__":
    main()
