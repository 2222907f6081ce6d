"""Feature consistency across seeds: the Hungarian matching of two dictionaries, hand-checked, and
the sweep summary reporting it per setting from the jobs' dictionary.npy files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from sae.names import MATCHED_COSINE, MATCHED_FRACTION
from sae.report.consistency import matched_cosines, seed_consistency
from sae.report.summary import write_summary
from sae.run.record import RunRecord


def test_a_permuted_copy_of_a_dictionary_matches_at_one():
    rng = np.random.default_rng(0)
    dictionary = rng.normal(size=(16, 784))
    shuffled = dictionary[rng.permutation(16)] * rng.uniform(0.5, 2.0, size=(16, 1))  # order, scale
    assert matched_cosines(dictionary, shuffled) == pytest.approx(np.ones(16))
    assert seed_consistency([dictionary, shuffled]) == {
        MATCHED_COSINE: pytest.approx(1.0),
        MATCHED_FRACTION: 1.0,
    }


def test_the_matching_maximises_the_summed_cosine_hand_case():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[0.6, 0.8], [2.0, 0.0]])
    # cosines: a0.b0 = 0.6, a0.b1 = 1, a1.b0 = 0.8, a1.b1 = 0: pairing a0-b1, a1-b0 sums 1.8 > 0.6
    assert sorted(matched_cosines(a, b)) == pytest.approx([0.8, 1.0])
    assert seed_consistency([a, b]) == {MATCHED_COSINE: pytest.approx(0.9), MATCHED_FRACTION: 0.5}
    assert matched_cosines(np.zeros((2, 2)), b).tolist() == [0.0, 0.0]  # a unit that writes nothing
    assert seed_consistency([a]) == {}


def test_three_seeds_average_their_three_pairs():
    a = np.eye(3)
    b = np.eye(3)[[1, 2, 0]]  # a permutation: matches at 1
    c = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    pairs = [matched_cosines(x, y) for x, y in ((a, b), (a, c), (b, c))]
    got = seed_consistency([a, b, c])
    assert got[MATCHED_COSINE] == pytest.approx(np.mean([p.mean() for p in pairs]))
    assert got[MATCHED_FRACTION] == pytest.approx((1.0 + 1 / 3 + 1 / 3) / 3)


def test_a_dictionary_file_is_data_or_nothing(tmp_path):
    record = RunRecord(tmp_path)
    assert record.dictionary() is None  # none written
    record.save_dictionary(np.ones((3, 4)))
    assert record.dictionary().shape == (3, 4) and record.dictionary().dtype == np.float32
    np.save(record.dictionary_file, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert record.dictionary() is None  # a pickle is never loaded
    for bad in (np.ones(4), np.full((2, 2), np.nan), np.ones((2, 2), dtype=np.int64)):
        np.save(record.dictionary_file, bad)
        assert record.dictionary() is None
    record.dictionary_file.write_bytes(b"not numpy")
    assert record.dictionary() is None


def test_the_summary_reports_each_settings_consistency_over_its_seeds(tmp_path):
    sweep = tmp_path / "sweep"
    rng = np.random.default_rng(1)
    base = rng.normal(size=(8, 20))
    job = 0
    for beta in ("1e-3", "5e-3"):
        for seed in (0, 1):
            folder = sweep / str(job)
            (folder / ".hydra").mkdir(parents=True)
            config = {"optimized_metric": "val/loss", "rho": 0.05, "model": {"sparsity": {"method": "kl"}}}
            (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
            (folder / ".hydra" / "overrides.yaml").write_text(
                yaml.safe_dump([f"beta={beta}", f"seed={seed}"])
            )
            metrics = {
                "test/mse": 0.02 + job / 1000,
                "test/l0": 5.0 + job,
                "test/truncated_mse": 0.03,
                "val/loss": 0.1,
            }
            (folder / "metrics.json").write_text(json.dumps(metrics))
            (folder / "status.json").write_text('{"status": "ok"}')
            # beta 1e-3: the second seed finds the same units, reordered; 5e-3: other units
            same = beta == "1e-3"
            units = base[rng.permutation(8)] if same and seed else base if same else rng.normal(size=(8, 20))
            RunRecord(folder).save_dictionary(units)
            job += 1
    assert "seed_consistency.png" in write_summary(sweep).files  # drawn with the sweep's figures
    with open(sweep / "summary_by_setting.csv") as f:
        settings = {r["beta"]: r for r in csv.DictReader(f)}
    assert float(settings["1e-3"][MATCHED_COSINE]) == pytest.approx(1.0, abs=1e-6)
    assert float(settings["1e-3"][MATCHED_FRACTION]) == 1.0
    assert float(settings["5e-3"][MATCHED_COSINE]) < 0.6 and float(settings["5e-3"][MATCHED_FRACTION]) == 0.0
    md = (sweep / "summary.md").read_text()
    header = next(line for line in md.split("## By setting")[1].splitlines() if line.startswith("| beta"))
    assert MATCHED_COSINE in header and MATCHED_FRACTION in header


def test_the_consistency_figure_draws_each_setting_of_seeds(tmp_path):
    from sae.report.figures import seed_consistency as figure

    settings = [
        {"beta": 0.001, "n": 2, MATCHED_COSINE: 0.6, MATCHED_FRACTION: 0.0},
        {"beta": 0.005, "n": 2, MATCHED_COSINE: 0.95, MATCHED_FRACTION: 0.75},
        {"beta": 0.02, "n": 1},  # one seed: nothing to compare, not drawn
    ]
    fig = figure(settings, ["beta"])
    left, right = fig.axes
    assert [left.get_title(), right.get_title()] == [MATCHED_COSINE, MATCHED_FRACTION]
    assert [round(b.get_height(), 3) for b in left.patches] == [0.6, 0.95]
    assert [round(b.get_height(), 3) for b in right.patches] == [0.0, 0.75]
    assert [t.get_text() for t in left.get_xticklabels()] == ["beta=0.001", "beta=0.005"]
    assert left.get_ylim() == right.get_ylim() == (0.0, 1.0)
    assert tuple(fig.get_size_inches() * fig.dpi) == (1000, 480)


def test_evaluate_compares_the_dictionaries_of_runs_on_request(tmp_path):
    """`python evaluate.py compare_runs=[...]`: a permuted, rescaled copy matches at 1.0; a 45-degree
    rotation in each pair of pixels at cos 45; a run without a dictionary is one line naming it."""
    import math

    import numpy as np

    from tests.conftest import run_script

    base = np.eye(4, dtype=np.float32)
    c = math.sqrt(0.5)
    rotated = np.array([[c, c, 0, 0], [-c, c, 0, 0], [0, 0, c, c], [0, 0, -c, c]], dtype=np.float32)
    for name, dictionary in (("a", base), ("b", 2.0 * base[[3, 1, 0, 2]]), ("c", rotated)):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "dictionary.npy", dictionary)
    runs = [str(tmp_path / n) for n in "abc"]
    result = run_script("evaluate.py", f"compare_runs=[{','.join(runs)}]")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[2:] == [
        f"| {runs[0]} | {runs[1]} | 1.000 | 1.000 |",
        f"| {runs[0]} | {runs[2]} | 0.707 | 0.000 |",
        f"| {runs[1]} | {runs[2]} | 0.707 | 0.000 |",
    ]
    (tmp_path / "empty").mkdir()
    result = run_script("evaluate.py", f"compare_runs=[{runs[0]},{tmp_path / 'empty'}]")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'empty'} has no readable dictionary.npy: "
        "pass run folders (runs write it since 2026-12-04)"
    ]
