"""Whole-split metrics against direct computation on the concatenated split."""

import pytest
import torch
import torch.nn.functional as F

from sae.core.metrics import FractionOfVarianceUnexplained, UnitActivity, density_summary, rho_hat_summary
from sae.report.frontier import pareto_front
from sae.report.probe import linear_probe_accuracy, probe_loss_and_grad


def test_unit_mean_is_over_samples_not_a_mean_of_batch_means():
    torch.manual_seed(0)
    batches = [torch.rand(n, 4) for n in (7, 1, 30)]  # unequal sizes: batch means would differ
    metric = UnitActivity(4)
    for b in batches:
        metric.update(b)
    whole = torch.cat(batches).double().mean(0).float()
    torch.testing.assert_close(metric.compute()[0], whole)
    mean_of_means = torch.stack([b.mean(0) for b in batches]).mean(0)
    assert not torch.allclose(metric.compute()[0], mean_of_means, atol=1e-3)


def test_firing_frequency_and_l0_hand_case():
    # 4 samples x 3 units, in two batches. Above 0: unit 0 on 2 samples, unit 1 never, unit 2 on all.
    codes = torch.tensor([[0.0, 0.0, 0.2], [0.3, 0.0, 0.05], [0.0, 0.0, 0.7], [0.6, 0.0, 0.125]])
    metric = UnitActivity(3, thresholds=[0.0, 0.125])
    metric.update(codes[:1])
    metric.update(codes[1:])
    rho_hat, density = metric.compute()
    torch.testing.assert_close(rho_hat, torch.tensor([0.9 / 4, 0.0, 1.075 / 4]))
    torch.testing.assert_close(
        density, torch.tensor([[0.5, 0.0, 1.0], [0.5, 0.0, 0.5]])
    )  # 0.125 is not above 0.125
    # L0 (mean active units per sample) is the sum of the frequencies: counted per sample here.
    per_sample = [[sum(v > t for v in row) for row in codes.tolist()] for t in (0.0, 0.125)]
    assert density.sum(dim=1).tolist() == pytest.approx([sum(c) / 4 for c in per_sample])
    fractions = {k: v.item() for k, v in density_summary(density[0], rare_below=0.6, dense_above=0.9).items()}
    assert fractions == {
        "dead_fraction": pytest.approx(1 / 3),
        "rare_fraction": pytest.approx(2 / 3),
        "dense_fraction": pytest.approx(1 / 3),
    }


def test_rho_hat_summary_hand_case():
    rho_hat = torch.tensor([0.0005, 0.05, 0.1, 0.0])
    s = {k: v.item() for k, v in rho_hat_summary(rho_hat).items()}
    assert s["rho_hat_mean"] == pytest.approx((0.0005 + 0.05 + 0.1) / 4)
    assert s["rho_hat_min"] == 0.0
    assert s["rho_hat_max"] == pytest.approx(0.1)


def test_fvu_hand_case_in_two_batches():
    # Two pixels, three samples. Per-pixel means: 1/3 and 2; squared deviations: 2/3 and 2.
    target = torch.tensor([[0.0, 1.0], [0.0, 2.0], [1.0, 3.0]])
    recon = torch.tensor([[0.0, 1.0], [0.5, 2.0], [1.0, 2.0]])  # squared errors: 0.25 + 1
    metric = FractionOfVarianceUnexplained(2)
    metric.update(recon[:1], target[:1])
    metric.update(recon[1:], target[1:])
    assert metric.compute().item() == pytest.approx(1.25 / (2 / 3 + 2), rel=1e-6)


def test_fvu_is_one_for_the_mean_and_zero_for_a_copy():
    torch.manual_seed(0)
    target = torch.rand(50, 6)
    for recon, expected in ((target.mean(0).expand_as(target), 1.0), (target.clone(), 0.0)):
        metric = FractionOfVarianceUnexplained(6)
        for a, b in zip(recon.split(7), target.split(7), strict=True):
            metric.update(a, b)
        assert metric.compute().item() == pytest.approx(expected, abs=1e-6)


def test_probe_separates_separable_codes_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (2000,), generator=gen)
    centres = torch.randn(10, 16, generator=gen) * 4
    codes = centres[labels] + torch.randn(2000, 16, generator=gen) * 0.5
    acc = linear_probe_accuracy(codes[:1500], labels[:1500], codes[1500:], labels[1500:])
    assert acc > 0.99
    noise = torch.randn(2000, 16, generator=gen)
    chance = linear_probe_accuracy(noise[:1500], labels[:1500], noise[1500:], labels[1500:])
    assert 0.03 < chance < 0.2  # 10 classes


def test_probe_loss_and_gradient_match_autograd_in_float64():
    """The probe's written-out loss and gradient against F.cross_entropy + the penalty, by autograd."""
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 5, generator=gen, dtype=torch.float64), torch.randint(0, 4, (40,), generator=gen)
    weight = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    expected = F.cross_entropy(x @ weight + bias, y) + 0.5 * 0.3 * weight.pow(2).sum()
    expected.backward()
    one_hot_t = F.one_hot(y, 4).T.to(x.dtype).contiguous()
    with torch.no_grad():
        loss, grad_w, grad_b = probe_loss_and_grad(x.T.contiguous(), one_hot_t, weight, bias, 0.3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(grad_w, weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_b, bias.grad, rtol=1e-10, atol=1e-12)


def test_probe_is_deterministic():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 8, generator=gen), torch.randint(0, 3, (300,), generator=gen)
    a = linear_probe_accuracy(x[:200], y[:200], x[200:], y[200:], num_classes=3)
    assert a == linear_probe_accuracy(x[:200], y[:200], x[200:], y[200:], num_classes=3)


def test_probe_reads_the_same_on_one_thread_as_on_two():
    """A sweep's worker fits the code probe on one thread, a separate run on the default two: the
    same codes must give the same accuracy. Sparse, correlated codes, as a strong penalty makes
    them: in float32 this case read 0.6342 on one thread and 0.6344 on two."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (30000,), generator=gen)
    centres = torch.randn(10, 32, generator=gen)
    mix = torch.randn(32, 32, generator=gen) * 0.3 + torch.eye(32)
    codes = torch.sigmoid(8 * ((centres[labels] + 2 * torch.randn(30000, 32, generator=gen)) @ mix) - 6)
    split = (codes[:25000], labels[:25000], codes[25000:], labels[25000:])
    threads = torch.get_num_threads()
    try:
        accuracy = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            accuracy[n] = linear_probe_accuracy(*split)
    finally:
        torch.set_num_threads(threads)
    assert 0.3 < accuracy[1] < 0.95  # neither chance nor separable: a fit that rounding could move
    assert accuracy[1] == accuracy[2]


def test_pareto_front_hand_case():
    # (x, y), both minimised: (1, 5), (2, 3), (4, 1) are optimal; (3, 4) and (5, 5) are dominated.
    xs, ys = [3, 1, 4, 2, 5], [4, 5, 1, 3, 5]
    assert pareto_front(xs, ys) == [1, 3, 2]


def test_pixel_classifier_is_fitted_once_per_data_then_reused(tmp_path, monkeypatch):
    """The same tensors or equal data (a sweep's next job): the last classifier and its test
    accuracy, no refit; a new process: the disk cache; other data: a new fit."""
    from sae.report import probe

    monkeypatch.setattr(probe, "_last_pixel_classifier", None)
    fits = []
    fit = probe.fit_linear_classifier
    counted = lambda x, y, **kw: fits.append(len(x)) or fit(x, y, **kw)  # noqa: E731
    monkeypatch.setattr(probe, "fit_linear_classifier", counted)
    gen = torch.Generator().manual_seed(3)
    data = probe.ProbeData(
        torch.rand(60, 9, generator=gen),
        torch.randint(0, 10, (60,), generator=gen),
        torch.rand(20, 9, generator=gen),
        torch.randint(0, 10, (20,), generator=gen),
    )
    settings = dict(max_iter=5, cache_dir=tmp_path)
    first, accuracy = probe.pixel_classifier(data, **settings)
    assert accuracy == first.accuracy(data.test_x, data.test_y)
    assert probe.pixel_classifier(data, **settings) == (first, accuracy)
    clones = probe.ProbeData(*(t.clone() for t in data))
    assert probe.pixel_classifier(clones, **settings)[0] is first and fits == [60]
    monkeypatch.setattr(probe, "_last_pixel_classifier", None)  # as in a new process
    from_disk, _ = probe.pixel_classifier(data, **settings)
    assert fits == [60] and torch.equal(from_disk.weight, first.weight)
    probe.pixel_classifier(data._replace(train_x=data.train_x + 1e-3), **settings)
    assert fits == [60, 60]
    probe.pixel_classifier(data, max_iter=6, cache_dir=tmp_path)  # other settings: refit
    assert fits == [60, 60, 60]


@pytest.mark.parametrize(
    "damage, said",
    [
        (
            lambda saved: (
                {
                    k: torch.zeros_like(v) if k != "std" else v
                    for k, v in saved.items()
                    if k != "train_accuracy"
                }
                | {"train_accuracy": saved["train_accuracy"]}
            ),
            "it scores",
        ),
        (
            lambda saved: saved | {"weight": torch.zeros(9, 3, dtype=torch.float64)},
            "weight is torch.float64 (9, 3)",
        ),
        (
            lambda saved: saved | {"bias": torch.full((10,), float("nan"), dtype=torch.float64)},
            "bias is not finite",
        ),
        (lambda saved: {"weight": 1}, "it holds no mean"),
    ],
    ids=["zeroed", "wrong_shape", "not_finite", "not_a_classifier"],
)
def test_a_damaged_pixel_probe_cache_is_said_and_fitted_again(tmp_path, monkeypatch, capsys, damage, said):
    """The cache is input: a file zeroed, of another shape, or not a classifier at all would give
    a baseline at chance or fail mid-probe; it is refused in one line and the classifier refitted."""
    from sae.report import probe

    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 10, (200,), generator=gen)
    images = torch.rand(10, 9, generator=gen)[labels] + 0.3 * torch.rand(200, 9, generator=gen)
    data = probe.ProbeData(images[:150], labels[:150], images[150:], labels[150:])
    monkeypatch.setattr(probe, "_last_pixel_classifier", None)
    fitted, accuracy = probe.pixel_classifier(data, max_iter=20, cache_dir=tmp_path)
    [path] = tmp_path.glob("pixel_probe-*.pt")
    torch.save(damage(torch.load(path, weights_only=True)), path)
    monkeypatch.setattr(probe, "_last_pixel_classifier", None)  # as in a new process
    again, again_accuracy = probe.pixel_classifier(data, max_iter=20, cache_dir=tmp_path)
    assert again_accuracy == accuracy > 0.5 and torch.equal(again.weight, fitted.weight)
    [line] = [line for line in capsys.readouterr().out.splitlines() if "pixel-probe cache" in line]
    assert line.startswith(f"warning: pixel-probe cache {path} is damaged (") and said in line
    monkeypatch.setattr(probe, "_last_pixel_classifier", None)
    probe.pixel_classifier(data, max_iter=20, cache_dir=tmp_path)  # rewritten: read without a word
    assert "pixel-probe cache" not in capsys.readouterr().out


def test_the_code_probe_converges_to_its_tolerance():
    """With a tolerance, L-BFGS runs until no gradient entry of the probe's objective exceeds it
    (written-out gradient, sae.report.probe.probe_loss_and_grad); 3 steps stop well short of that."""
    from sae.report import probe

    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (300,), generator=gen)
    x = torch.rand(10, 6, generator=gen)[labels] + 0.8 * torch.rand(300, 6, generator=gen)

    def largest_gradient(classifier) -> float:
        features = ((x.double() - classifier.mean) / classifier.std).T.contiguous()
        one_hot = torch.nn.functional.one_hot(labels, 10).T.double().contiguous()
        _, grad_w, grad_b = probe.probe_loss_and_grad(
            features, one_hot, classifier.weight, classifier.bias, 1e-4
        )
        return max(grad_w.abs().max().item(), grad_b.abs().max().item())

    assert largest_gradient(probe.fit_linear_classifier(x, labels, max_iter=2000, tolerance=1e-6)) <= 1e-6
    assert largest_gradient(probe.fit_linear_classifier(x, labels, max_iter=3)) > 1e-4


def test_probe_accuracies_match_their_parts_and_encode_on_the_given_thread_count(monkeypatch, tmp_path):
    """The three numbers against the classifiers fitted by hand; the codes and reconstructions are
    computed on `threads` (a sweep's worker encodes on the job's count: float32 codes differ in
    their last bits between thread counts), and the caller's count is restored after."""
    from sae.core.model import SparseAutoencoder
    from sae.report import probe

    monkeypatch.setattr(probe, "_last_pixel_classifier", None)
    torch.manual_seed(0)
    model = SparseAutoencoder(input_dim=12, hidden_dims=(8,), latent_dim=4).eval()
    gen = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 10, (160,), generator=gen)
    images = torch.rand(10, 12, generator=gen)[labels] * 0.5 + torch.rand(160, 12, generator=gen) * 0.5
    train_x, train_y, test_x, test_y = images[:120], labels[:120], images[120:], labels[120:]
    seen = []
    encode_all = model.encode_all
    monkeypatch.setattr(model, "encode_all", lambda x: seen.append(torch.get_num_threads()) or encode_all(x))
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    data = probe.ProbeData(train_x, train_y, test_x, test_y)
    values = probe.probe_accuracies(model, data, max_iter=20, threads=other)
    assert seen == [other, other] and torch.get_num_threads() == before
    with torch.no_grad():
        codes = probe.fit_linear_classifier(
            encode_all(train_x), train_y, max_iter=probe.CODE_PROBE_MAX_ITER, tolerance=1e-5
        )
        pixels = probe.fit_linear_classifier(train_x, train_y, max_iter=20)
        recon = model(test_x).recon
    assert values == {
        "test/probe_accuracy": codes.accuracy(encode_all(test_x), test_y),
        "test/probe_accuracy_pixels": pixels.accuracy(test_x, test_y),
        "test/probe_accuracy_reconstructions": pixels.accuracy(recon, test_y),
    }
    # With a validation split: the same code classifier scored on its codes, for a sweeper.
    val_x, val_y = images[100:120], labels[100:120]
    with_val = probe.probe_accuracies(model, data, max_iter=20, val=(val_x, val_y))
    assert with_val == values | {"val/probe_accuracy": codes.accuracy(encode_all(val_x), val_y)}
