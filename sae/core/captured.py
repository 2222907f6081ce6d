"""A training step recorded once as a CUDA graph and replayed for every batch of its shape.

On a GPU the default model's step is launch-bound: the host spends longer launching the step's few
dozen kernels than the GPU spends running them (docs/performance.md, "GPU check"). A replayed
graph is one launch for the whole forward, objective, backward and optimizer update.

PyTorch's whole-network capture recipe (the torch.cuda.graph documentation): a few steps first on a
side stream, so that what is made lazily (Adam's moments, the cuBLAS workspace) exists before the
recording; gradients set to None before recording, so that the recorded backward writes them
afresh on every replay; an optimizer built `capturable`, whose step count lives on the device.
The shape recorded is the first batch's (a full batch); a batch of another shape (an epoch's
ragged last batch) takes the same step eagerly, outside the graph, on the same weights and
optimizer state. Every step, warm-up and eager ones included, is
a real training step on a real batch.

With `capture=False` (a CPU) every step runs eagerly through the same control flow: what the CPU
test suite checks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

WARMUP_STEPS = 3


class CapturedStep:
    """`step(x)` takes one optimizer step on batch x and returns its terms (a detached tensor);
    this object takes the same steps, replaying a recording of `step` for batches of the shape it
    was recorded on. The terms it returns are the graph's own output tensor, overwritten by the
    next replay: copy them before the next step."""

    def __init__(
        self, step: Callable[[Tensor], Tensor], zero_grad: Callable[[], None], capture: bool
    ) -> None:
        self.step, self.zero_grad, self.capture = step, zero_grad, capture
        self.steps_before_recording = WARMUP_STEPS
        self.shape: torch.Size | None = None  # the batches recorded: the first batch's shape
        self.graph: torch.cuda.CUDAGraph | None = None
        self.side_stream: torch.cuda.Stream | None = None
        self.recorded_x: Tensor | None = None
        self.recorded_terms: Tensor | None = None
        self.eager_steps = self.replays = 0  # what the tests and the GPU check read

    def __call__(self, x: Tensor) -> Tensor:
        if self.shape is None:
            self.shape = x.shape
        if x.shape != self.shape:
            return self._eager(x)
        if self.recorded_x is None and self.steps_before_recording > 0:
            self.steps_before_recording -= 1
            return self._eager(x)
        if self.recorded_x is None:
            self._record(x)
        return self._replay(x)

    def _eager(self, x: Tensor) -> Tensor:
        self.eager_steps += 1
        self.zero_grad()
        if not self.capture or self.recorded_x is not None:
            return self.step(x)
        if self.side_stream is None:
            self.side_stream = torch.cuda.Stream()
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):  # warm-up steps, as the recipe runs them
            terms = self.step(x)
        torch.cuda.current_stream().wait_stream(self.side_stream)
        return terms

    def _record(self, x: Tensor) -> None:
        """Record the step on a copy of x; recording runs nothing (the replay that follows does)."""
        self.recorded_x = x.detach().clone()
        self.zero_grad()  # to None: the recorded backward makes the gradients in the graph's memory
        if not self.capture:
            return
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.recorded_terms = self.step(self.recorded_x)

    def _replay(self, x: Tensor) -> Tensor:
        self.replays += 1
        assert self.recorded_x is not None
        self.recorded_x.copy_(x)
        if self.graph is None:  # capture disabled: the same step, eagerly, on the recorded input
            self.zero_grad()
            return self.step(self.recorded_x)
        self.graph.replay()
        assert self.recorded_terms is not None
        return self.recorded_terms
