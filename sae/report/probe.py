"""A linear probe: how much class information a representation keeps, read off by logistic regression."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae.errors import one_line
from sae.run.atomic import write_atomic
from sae.run.console import report


class LinearClassifier(NamedTuple):
    """Multinomial logistic regression on features standardized with the training statistics,
    in float64 (fit_linear_classifier says why)."""

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        with torch.no_grad():
            logits = ((x.to(self.weight.dtype) - self.mean) / self.std) @ self.weight + self.bias
        return (logits.argmax(dim=1) == y).float().mean().item()


# The code probe's cap on L-BFGS steps: it stops at its gradient tolerance well before (docs/probe.md).
CODE_PROBE_MAX_ITER = 2000
# Part of the pixel classifier's cache key: a classifier cached by another solver is refitted.
PROBE_SOLVER = "lbfgs-written-gradient-float64"


def probe_loss_and_grad(
    features_t: Tensor, one_hot_t: Tensor, weight: Tensor, bias: Tensor, weight_decay: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy + weight_decay / 2 * ||weight||^2, and its gradients, written out.

    Class-major layout (features_t: features x samples, one_hot_t: classes x samples): the
    softmax then runs along the samples, where a CPU vectorizes well; over 10 classes per row it
    costs more than the two matrix products. autograd is not needed for a loss this simple.
    """
    n = features_t.shape[1]
    logits = torch.addmm(bias[:, None], weight.T, features_t)  # classes x samples
    top = logits.amax(dim=0)
    exp = (logits - top).exp_()
    total = exp.sum(dim=0)
    loss = (
        (total.log() + top).mean() - (logits * one_hot_t).sum() / n + 0.5 * weight_decay * weight.pow(2).sum()
    )
    residual = exp.div_(total).sub_(one_hot_t).div_(n)  # d loss / d logits
    return loss, features_t @ residual.T + weight_decay * weight, residual.sum(dim=1)


def fit_linear_classifier(
    train_x: Tensor,
    train_y: Tensor,
    num_classes: int = 10,
    weight_decay: float = 1e-4,
    max_iter: int = 100,
    tolerance: float | None = None,
) -> LinearClassifier:
    """Full-batch L-BFGS from zero weights: deterministic for given inputs (no seed, no batch order).

    `max_iter` steps, or with `tolerance` until no gradient entry exceeds it (max_iter the cap).
    In float64: an early stop leaves the accuracy where float32's rounding (which changes with the
    thread count) moved it by up to 0.003; in float64 the same codes give the same accuracy on 1
    thread or 2, here or in a sweep's worker process (docs/probe.md).
    """
    with torch.no_grad():  # the gradient is written out (probe_loss_and_grad); fine under inference mode too
        x = train_x.detach().double()
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        features_t = ((x - mean) / std).T.contiguous()
        one_hot_t = F.one_hot(train_y.detach().to(x.device), num_classes).T.to(x.dtype).contiguous()
        weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device)
        bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device)
        stop = {} if tolerance is None else dict(tolerance_grad=tolerance, tolerance_change=0.0)
        optimizer = torch.optim.LBFGS(
            [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe", **stop
        )

        def closure() -> Tensor:
            loss, weight.grad, bias.grad = probe_loss_and_grad(
                features_t, one_hot_t, weight, bias, weight_decay
            )
            return loss

        optimizer.step(closure)
    return LinearClassifier(mean, std, weight, bias)


def linear_probe_accuracy(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int = 10,
    weight_decay: float = 1e-4,
    max_iter: int = 100,
) -> float:
    """Test accuracy of a logistic regression fitted on (train_x, train_y)."""
    classifier = fit_linear_classifier(train_x, train_y, num_classes, weight_decay, max_iter)
    return classifier.accuracy(test_x, test_y)


class ProbeData(NamedTuple):
    """The images and labels a probe is fitted on (the training split) and scored on (test)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


# The probe's settings (conf/callbacks/linear_probe.yaml), as the LinearProbe callback holds them
# and as a run's recorded config holds them (evaluate.py completing a killed sweep's job).
PROBE_SETTINGS = ("weight_decay", "max_iter", "cache_dir", "tolerance")


def probe_settings(source: Any) -> dict[str, Any]:
    """The probe's settings read off anything that holds them as attributes."""
    return {name: getattr(source, name) for name in PROBE_SETTINGS}


def probe_accuracies(
    autoencoder: nn.Module,
    data: ProbeData,
    weight_decay: float = 1e-4,
    max_iter: int = 100,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    val: tuple[Tensor, Tensor] | None = None,
    tolerance: float = 1e-5,
) -> dict[str, float]:
    """What logistic regression reads off an autoencoder's codes and reconstructions, against the
    pixels (sae.training.callbacks.LinearProbe says what each number means), by metric name: test/...,
    and with `val` (images, labels) the code probe scored on them too (val/probe_accuracy, what
    a sweeper may select on).

    The code classifier is fitted to convergence: L-BFGS until no gradient entry exceeds
    `tolerance` (at most CODE_PROBE_MAX_ITER steps), so that the accuracy is its objective's, not
    where an early stop left it (docs/probe.md). The pixel classifier takes `max_iter` steps: its
    early stop is part of what `probe_accuracy_reconstructions` measures (docs/probe.md).

    `autoencoder` is an sae.core.model.SparseAutoencoder (`encode_all`, and `forward(x).recon`), on
    any device. Called in the run's process, or in a sweep's worker process with a copy of the
    model (sae.run.handoff) and `threads` the run's torch thread count: on a CPU, a float32 code
    depends on the thread count in its last bits (a matrix product's sums are split differently),
    and the early-stopped probe can read that (docs/probe.md), so the worker encodes as the run
    would. The fits are in float64, the same on any thread count. So the same inputs give the
    same numbers in both places.
    """
    with torch.no_grad():
        with _torch_threads(threads):
            train_codes = autoencoder.encode_all(data.train_x)
            test_codes = autoencoder.encode_all(data.test_x)
            recon = autoencoder(data.test_x.to(next(autoencoder.parameters()).device)).recon
            val_codes = autoencoder.encode_all(val[0]) if val is not None else None
        codes = fit_linear_classifier(
            train_codes,
            data.train_y,
            weight_decay=weight_decay,
            max_iter=CODE_PROBE_MAX_ITER,
            tolerance=tolerance,
        )
        code_accuracy = codes.accuracy(test_codes, data.test_y.to(codes.weight.device))
        pixels, pixel_accuracy = pixel_classifier(data, weight_decay, max_iter, cache_dir)
        test_y = data.test_y.to(pixels.weight.device)
        values = {
            "test/probe_accuracy": code_accuracy,
            "test/probe_accuracy_pixels": pixel_accuracy,
            "test/probe_accuracy_reconstructions": pixels.accuracy(recon.to(pixels.weight.device), test_y),
        }
        if val is not None:
            values["val/probe_accuracy"] = codes.accuracy(val_codes, val[1].to(codes.weight.device))
        return values


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU thread count set to `threads` (None: left as it is) inside the block."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _PixelClassifierMemo(NamedTuple):
    """The last pixel classifier of this process, the data it was fitted for and its test accuracy:
    the jobs of a sweep share their data, and comparing it costs less than hashing it."""

    settings: str
    data: tuple[Tensor, ...]
    classifier: LinearClassifier
    test_accuracy: float

    def fits(self, settings: str, data: tuple[Tensor, ...]) -> bool:
        return settings == self.settings and all(
            _same_values(a, b) for a, b in zip(data, self.data, strict=True)
        )


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors hold the same values: at once when they view the same memory the same
    way (the same split sent again, here or through shared memory to a worker; the memo holds b,
    so its memory cannot have been reused), else by comparing them."""
    if (a.device, a.dtype, a.shape) != (b.device, b.dtype, b.shape):
        return False
    return (a.stride(), a.data_ptr()) == (b.stride(), b.data_ptr()) or torch.equal(a, b)


_last_pixel_classifier: _PixelClassifierMemo | None = None


def pixel_classifier(
    data: ProbeData, weight_decay: float = 1e-4, max_iter: int = 100, cache_dir: str | Path | None = None
) -> tuple[LinearClassifier, float]:
    """The classifier fitted on the training pixels, and its accuracy on the test pixels.

    It depends only on the data, so it is fitted once per data set: kept for the next call in this
    process, and cached in `cache_dir` by a hash of the data and the settings.
    """
    global _last_pixel_classifier
    settings = f"{PROBE_SOLVER}|{max_iter}|{weight_decay}"
    last = _last_pixel_classifier
    if last is not None and last.fits(settings, data):
        return last.classifier, last.test_accuracy
    classifier = _cached_pixel_classifier(settings, data, weight_decay, max_iter, cache_dir)
    device = classifier.weight.device
    accuracy = classifier.accuracy(data.test_x.to(device), data.test_y.to(device))
    _last_pixel_classifier = _PixelClassifierMemo(settings, data, classifier, accuracy)
    return classifier, accuracy


def _cached_pixel_classifier(
    settings: str, data: tuple[Tensor, ...], weight_decay: float, max_iter: int, cache_dir: str | Path | None
) -> LinearClassifier:
    train_x, train_y = data[:2]
    digest = hashlib.sha256(settings.encode())
    for t in data:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    path = Path(cache_dir) / f"pixel_probe-{digest.hexdigest()[:32]}.pt" if cache_dir else None
    if path is not None and path.is_file():
        cached = _read_cached_classifier(path, train_x, train_y)
        if cached is not None:
            return cached
    classifier = fit_linear_classifier(train_x, train_y, weight_decay=weight_decay, max_iter=max_iter)
    if path is not None:
        record = classifier._asdict() | {"train_accuracy": classifier.accuracy(train_x, train_y)}
        try:
            write_atomic(path, lambda f: torch.save(record, f))
        except OSError:
            pass  # a read-only cache folder only costs the refit
    return classifier


def _read_cached_classifier(path: Path, train_x: Tensor, train_y: Tensor) -> LinearClassifier | None:
    """A cached pixel classifier, checked as input: finite float64 tensors of the shapes the data
    needs, that classify the training pixels as they did when written (a damaged or zeroed file
    scores at chance). None, said in one line, for one that fails: it is fitted again."""
    features = train_x.shape[1]
    shapes = {"mean": (features,), "std": (features,), "weight": (features, 10), "bias": (10,)}
    try:
        saved = torch.load(path, map_location=train_x.device, weights_only=True)
        for name, shape in shapes.items():
            if not isinstance(saved, dict) or name not in saved:
                raise ValueError(f"it holds no {name}")
            t = saved[name]
            if not isinstance(t, Tensor) or t.dtype != torch.float64 or tuple(t.shape) != shape:
                found = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name} is {found}, not float64 {shape}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} is not finite")
        classifier = LinearClassifier(**{k: saved[k] for k in LinearClassifier._fields})
        recorded, accuracy = saved.get("train_accuracy"), classifier.accuracy(train_x, train_y)
        if not isinstance(recorded, float) or abs(accuracy - recorded) > 1e-9:
            raise ValueError(f"it scores {accuracy:.4f} on the training pixels, written with {recorded!r}")
        return classifier
    except Exception as err:  # noqa: BLE001 -- a damaged cache only costs a refit, said once
        report(f"warning: pixel-probe cache {path} is damaged ({one_line(err)}); fitted again and rewritten")
        return None
