"""Methods at equal L0: the confidence intervals and paired tests against hand computations, and
the files a sweep of several methods at target L0s gets (table, CSV, figure)."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
import yaml

from sae.names import ERROR_AXIS
from sae.report.equal_l0 import PROBE, compare_at_l0, paired_p_value, t_interval
from sae.report.summary import write_summary

T_975 = {2: 4.302652729911275, 3: 3.182446305284263}  # Student's t quantile 0.975, by degrees of freedom


def test_t_interval_by_hand():
    mean, half = t_interval([1.0, 2.0, 6.0])
    assert mean == 3.0
    # sample std: sqrt(((1-3)^2 + (2-3)^2 + (6-3)^2) / 2) = sqrt(7)
    assert half == pytest.approx(T_975[2] * math.sqrt(7) / math.sqrt(3), rel=1e-9)
    assert math.isnan(t_interval([4.0])[1])


def test_paired_test_by_hand():
    a = {0: 0.10, 1: 0.12, 2: 0.11}
    b = {0: 0.09, 1: 0.10, 2: 0.105, 7: 5.0}  # seed 7 has no partner: left out
    d = [0.01, 0.02, 0.005]
    t = statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(3))
    # two-sided p for t with 2 degrees of freedom, closed form: 1 - t / sqrt(2 + t^2)
    assert paired_p_value(a, b) == pytest.approx(1 - t / math.sqrt(2 + t**2), rel=1e-9)
    assert math.isnan(paired_p_value({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5}))  # constant difference
    assert math.isnan(paired_p_value({0: 1.0}, {0: 0.5}))  # one pair


def _jobs():
    errors = {"kl": [0.030, 0.032, 0.031], "topk": [0.020, 0.021, 0.023], "l1": [0.025, 0.024, 0.026]}
    probes = {"kl": [0.90, 0.91, 0.92], "topk": [0.93, 0.95, 0.94], "l1": [0.80, 0.82, 0.81]}
    jobs = []
    for method in errors:
        for seed in range(3):
            jobs.append(
                {
                    "method": method,
                    "target_l0": 8,
                    "seed": seed,
                    ERROR_AXIS: errors[method][seed],
                    "test/mse": errors[method][seed] / 2,
                    PROBE: probes[method][seed],
                    "test/l0": 8.0 + 0.1 * seed,
                }
            )
    return jobs, errors, probes


def test_each_method_stands_against_the_best_at_its_l0():
    jobs, errors, probes = _jobs()
    table = {r["method"]: r for r in compare_at_l0(jobs)}
    assert table["topk"][f"{ERROR_AXIS}_best"] and not table["kl"][f"{ERROR_AXIS}_best"]
    assert table["topk"][f"{PROBE}_best"]
    kl = table["kl"]
    assert kl["n"] == 3
    assert kl[ERROR_AXIS] == pytest.approx(0.031)
    assert kl[f"{ERROR_AXIS}_ci"] == pytest.approx(T_975[2] * statistics.stdev(errors["kl"]) / math.sqrt(3))
    assert kl[f"{ERROR_AXIS}_vs_best"] == pytest.approx(0.031 - statistics.fmean(errors["topk"]))
    d = [k - t for k, t in zip(errors["kl"], errors["topk"], strict=True)]
    t = statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(3))
    assert kl[f"{ERROR_AXIS}_p"] == pytest.approx(1 - t / math.sqrt(2 + t**2), rel=1e-9)
    assert math.isnan(table["topk"][f"{ERROR_AXIS}_p"])  # the best is not tested against itself
    assert table["l1"][f"{PROBE}_vs_best"] == pytest.approx(0.81 - 0.94)


def _fake_job(sweep, name, method, target, seed, metrics):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    config = {
        "optimized_metric": "val/loss",
        "rho": 0.05,  # KL's configured rate: adapted with target_l0, so no target to draw
        "target_l0": target,
        "seed": seed,
        "model": {"sparsity": {"method": method}},
    }
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    overrides = [f"sparsity={method}", f"target_l0={target}", f"seed={seed}"]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "metrics.json").write_text(json.dumps(metrics | {"ckpt_path": "/x.ckpt", "val/loss": 1.0}))


def test_a_sweep_of_methods_at_target_l0s_gets_the_comparison(tmp_path):
    sweep = tmp_path / "sweep"
    jobs, _, _ = _jobs()
    for i, job in enumerate(jobs):
        metrics = {k: v for k, v in job.items() if "/" in k}
        _fake_job(sweep, str(i), job["method"], 8, job["seed"], metrics)
    _fake_job(sweep, "9", "kl", 16, 0, {ERROR_AXIS: 0.02, "test/mse": 0.01, "test/l0": 15.9})
    summary = write_summary(sweep)
    assert {"methods_at_l0.md", "methods_at_l0.csv", "methods_at_l0.png"} <= set(summary.files)
    text = (sweep / "methods_at_l0.md").read_text()
    assert "## target L0 8" in text and "## target L0 16" in text
    kl_line = next(line for line in text.splitlines() if line.startswith("| kl | 3 |"))
    assert "0.031 ± 0.0025" in kl_line  # 4.303 * 0.001 / sqrt(3)
    assert "(p " in kl_line
    topk_line = next(line for line in text.splitlines() if line.startswith("| topk | 3 |"))
    assert topk_line.count("**best**") == 2  # lowest error and highest probe accuracy
    rows = list(csv.DictReader((sweep / "methods_at_l0.csv").open()))
    assert [(r["target_l0"], r["method"]) for r in rows] == [
        ("8.0", "kl"),
        ("8.0", "l1"),
        ("8.0", "topk"),
        ("16.0", "kl"),
    ]
    assert "[methods_at_l0.md](methods_at_l0.md)" in (sweep / "summary.md").read_text()
    settings = list(csv.DictReader((sweep / "summary_by_setting.csv").open()))
    assert settings and not any(s.get("rho") for s in settings)  # no configured rho shown as a target
    assert "![methods_at_l0](methods_at_l0.png)" in (sweep / "summary.md").read_text()


def test_one_method_or_no_target_gets_no_comparison(tmp_path):
    sweep = tmp_path / "sweep"
    for seed in range(2):
        _fake_job(sweep, str(seed), "kl", 8, seed, {ERROR_AXIS: 0.03, "test/mse": 0.02, "test/l0": 8.0})
    assert "methods_at_l0.md" not in write_summary(sweep).files
    assert not (sweep / "methods_at_l0.md").exists()


def test_the_figure_draws_each_method_at_the_l0_it_reached():
    from sae.report.figures import methods_at_l0

    jobs, _, _ = _jobs()
    fig = methods_at_l0(compare_at_l0(jobs))
    error_axes, probe_axes = fig.axes
    assert error_axes.get_xscale() == "log"
    drawn = {c.get_label(): c.lines[0] for c in error_axes.containers}  # errorbar: (line, caps, bars)
    assert set(drawn) == {"kl", "l1", "topk"}
    assert list(drawn["kl"].get_xdata()) == pytest.approx([8.1])  # the mean L0 reached, not the target
    assert list(drawn["kl"].get_ydata()) == pytest.approx([0.031])
    assert probe_axes.get_title() == f"{PROBE} at equal L0"
    assert fig.get_size_inches().tolist() == [15.0, 6.0]


def test_methods_dictionaries_are_compared_at_each_l0(tmp_path):
    """A method whose seeds permute one dictionary matches itself at 1.0; a dictionary rotated by
    45 degrees in each pair of pixels matches it at cos 45 = 0.7071 (a constructed case)."""
    import numpy as np

    from sae.report.equal_l0 import dictionary_overlap

    base = np.eye(4)
    c = math.sqrt(0.5)
    rotated = np.array([[c, c, 0, 0], [-c, c, 0, 0], [0, 0, c, c], [0, 0, -c, c]])
    dictionaries = {
        (8.0, "kl"): [base, base[[2, 0, 3, 1]] * 3.0],
        (8.0, "topk"): [rotated, rotated[::-1]],
    }
    overlap = dictionary_overlap(dictionaries)[8.0]
    assert overlap[("kl", "kl")] == pytest.approx(1.0)
    assert overlap[("topk", "topk")] == pytest.approx(1.0)
    assert overlap[("kl", "topk")] == overlap[("topk", "kl")] == pytest.approx(c)

    sweep = tmp_path / "sweep"
    for i, (method, seed) in enumerate([("kl", 0), ("kl", 1), ("topk", 0), ("topk", 1)]):
        _fake_job(
            sweep, str(i), method, 8, seed, {ERROR_AXIS: 0.03 + 0.01 * i, "test/mse": 0.02, "test/l0": 8.0}
        )
        np.save(sweep / str(i) / "dictionary.npy", dictionaries[(8.0, method)][seed])
    write_summary(sweep)
    text = (sweep / "methods_at_l0.md").read_text()
    assert "| kl | 1.000 | 0.707 |" in text
    assert "| topk | 0.707 | 1.000 |" in text
