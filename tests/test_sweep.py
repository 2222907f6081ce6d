"""The sweep summary on a fabricated sweep folder: two finished jobs, one failed, one interrupted."""

import csv
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from sae.report.figures import sweep_metrics
from sae.report.frontier import frontier_ranks
from sae.report.summary import aggregate_seeds, write_summary
from tests.conftest import run_script


def fake_job(sweep, name, overrides, metrics=None, status=None, method="kl"):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    sparsity, _, extra = method.partition("+")  # "topk+auxk": TopK with model.sparsity.auxk=true
    model = {"sparsity": {"method": sparsity} | ({extra: True} if extra else {})}
    config = {"optimized_metric": "val/loss", "rho": 0.05, "model": model}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if status is not None:
        (job / "status.json").write_text(json.dumps(status))


def metrics(mse, val_loss, rho_hat_mean, l0):
    return {
        "test/truncated_mse": 1.5 * mse,
        "test/mse": mse,
        "val/loss": val_loss,
        "test/rho_hat_mean": rho_hat_mean,
        "test/l0": l0,
        "test/probe_accuracy": 0.9,
        "ckpt_path": "/x.ckpt",
    }


def fabricated_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(
        sweep,
        "0",
        ["beta=0.001", "lr=0.001", "~callbacks.run_figures"],
        metrics(0.016, 0.030, 0.13, 8.0),
        {"status": "ok"},
    )
    fake_job(sweep, "1", ["beta=0.005", "lr=0.001"], metrics(0.018, 0.020, 0.07, 4.0), {"status": "ok"})
    fake_job(
        sweep,
        "2",
        ["beta=abc", "lr=0.001"],
        None,
        {"status": "failed", "error": "ValueError: could not convert 'abc'"},
    )
    fake_job(sweep, "10", ["beta=0.1", "lr=0.001"])  # killed before it wrote anything
    return sweep


def test_summary_of_finished_failed_and_interrupted_jobs(tmp_path):
    sweep = fabricated_sweep(tmp_path)
    rows = write_summary(sweep).rows
    assert [r["job"] for r in rows] == ["0", "1", "2", "10"]  # numeric order, not text order

    with open(sweep / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["status"] for r in table] == ["ok", "ok", "failed", "incomplete"]
    assert table[2]["error"] == "ValueError: could not convert 'abc'"
    assert [r["beta"] for r in table] == ["0.001", "0.005", "abc", "0.1"]
    assert {"job", "beta", "lr", "status", "test/mse", "val/loss", "test/rho_hat_mean"} <= set(table[0])
    assert float(table[1]["test/mse"]) == 0.018
    assert not any(k.startswith("callbacks") for k in table[0])  # a deletion is not a swept value
    columns = list(table[0])
    # The figures a reader compares come first, right after the overrides and the status.
    assert columns[:9] == [
        "job",
        "beta",
        "lr",
        "status",
        "frontier",
        "test/truncated_mse",
        "test/mse",
        "test/l0",
        "test/rho_hat_mean",
    ]
    assert columns.index("val/loss") > columns.index("test/probe_accuracy")  # within-setting: last

    md = (sweep / "summary.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    # Only what differs between jobs: lr (0.001 in every job) and the probe's accuracy (0.9 in
    # every job that has one) move to a line above the table; summary.csv keeps them.
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    # val/loss holds beta * the penalty: across betas it is left out of the table, and said why.
    assert header == [
        "job",
        "beta",
        "status",
        "frontier",
        "test/truncated_mse",
        "test/mse",
        "test/l0",
        "test/rho_hat_mean",
        "error",
    ]
    assert "`val/loss` holds beta * the sparsity penalty, so it compares jobs of one setting only" in md
    assert "not in the table: `lr` 0.001, `test/probe_accuracy` 0.9." in md
    assert {"lr", "test/probe_accuracy"} <= set(table[0])
    # The jobs differ in beta, so not by val/loss (the lower beta would win by construction): both
    # finished jobs are on the L0-MSE frontier (one sparser, one better), then by test MSE.
    assert [r["frontier"] for r in table] == ["1", "1", "", ""]
    assert [line.split(" | ")[0].strip("| ") for line in lines[1:]] == ["0", "1", "2", "10"]
    assert "ranked by `frontier`" in md and "Not by `val/loss`" in md
    assert "Pareto rank on (`test/l0`, `test/truncated_mse`)" in md
    assert "published: test MSE 0.01387 (10 epochs, 60k images)" in md
    assert "run here: test MSE 0.0176 (10 epochs, 60k images)" in md

    png = Image.open(sweep / "pareto.png")
    assert png.size == (1500, 650)
    assert (sweep / "sweep_metrics.png").stat().st_size > 0


def test_frontier_ranks_on_the_truncated_code_error(tmp_path):
    """A job whose MSE is best but whose truncated code reconstructs worst is beaten on the
    frontier by one as sparse that is exactly sparse; jobs from before test/truncated_mse are
    ranked on test/mse, and the summary says what that means."""
    sweep = tmp_path / "sweep"
    dense = metrics(0.010, 0.02, 0.1, 4.0) | {"test/truncated_mse": 0.040}
    sparse = metrics(0.020, 0.03, 0.1, 4.0) | {"test/truncated_mse": 0.020}
    fake_job(sweep, "0", ["beta=0.001"], dense, {"status": "ok"})
    fake_job(sweep, "1", ["beta=0.005"], sparse, {"status": "ok"})
    ranked = write_summary(sweep, figures=False).ranked
    assert [(r["job"], r["frontier"]) for r in ranked] == [("1", 1), ("0", 2)]

    for job in ("0", "1"):
        record = json.loads((sweep / job / "metrics.json").read_text())
        del record["test/truncated_mse"]
        (sweep / job / "metrics.json").write_text(json.dumps(record))
    summary = write_summary(sweep, figures=False)
    assert [(r["job"], r["frontier"]) for r in summary.ranked] == [("0", 1), ("1", 2)]
    assert "predate `test/truncated_mse`" in (sweep / "summary.md").read_text()


@pytest.mark.slow
def test_evaluate_rebuilds_the_summary_from_job_folders(tmp_path):
    sweep = fabricated_sweep(tmp_path)
    proc = run_script("evaluate.py", f"sweep_dir={sweep}", f"hydra.run.dir={tmp_path}/out", timeout=120)
    assert proc.returncode == 0, proc.stderr
    # It ends by saying where the results are, and the best jobs.
    said = proc.stdout.splitlines()
    assert said[0] == f"sweep folder: {sweep.resolve()}" and "4 jobs, 2 ok" in said[1]
    assert said[said.index("best 2:") + 1].startswith("| job |")
    for name in ("summary.csv", "summary.md", "pareto.png"):
        assert (sweep / name).stat().st_size > 0
    assert not (tmp_path / "out").exists()  # it wrote into the sweep folder only

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_script("evaluate.py", f"sweep_dir={empty}", f"hydra.run.dir={tmp_path}/out2", timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error: sweep_dir=")
    assert not (tmp_path / "out2").exists()


def test_frontier_ranks_hand_case():
    rows = [
        {"test/l0": 2.0, "test/mse": 0.05},  # sparsest: frontier
        {"test/l0": 4.0, "test/mse": 0.03},  # frontier
        {"test/l0": 5.0, "test/mse": 0.04},  # beaten by the one above: rank 2
        {"test/l0": 8.0, "test/mse": 0.02},  # best MSE: frontier
        {"test/l0": 9.0, "test/mse": 0.045},  # beaten by rows 1 and 2: rank 3
        {"test/l0": 4.0, "test/mse": 0.03},  # equal to a frontier row: as good
        {"test/mse": 0.01},  # no L0: unranked
    ]
    assert frontier_ranks(rows, ("test/l0", "test/mse")) == [1, 1, 2, 1, 3, 1, None]


def test_seeds_are_aggregated_and_a_grid_gets_heatmaps(tmp_path):
    """Jobs that differ only in seed become one setting: mean, sample std and n per metric, as
    numpy computes them; a beta x rho grid gets the heatmap figure."""
    sweep = tmp_path / "sweep"
    rng = np.random.default_rng(0)
    values = {}
    job = 0
    for beta in (0.001, 0.01):
        for rho in (0.05, 0.1):
            for seed in (0, 1, 2):
                m = {
                    "test/mse": float(rng.uniform(0.01, 0.03)),
                    "test/l0": float(rng.uniform(2, 9)),
                    "test/rho_hat_mean": float(rng.uniform(0.04, 0.12)),
                    "test/rho_hat_min": 0.01,
                    "test/rho_hat_max": 0.2,
                    "test/dead_fraction": 0.0,
                    "test/encoder_1/dead_fraction": float(rng.uniform(0.2, 0.6)),
                    "test/probe_accuracy": float(rng.uniform(0.8, 0.9)),
                    "val/loss": 0.1,
                }
                values.setdefault((beta, rho), []).append(m)
                fake_job(sweep, str(job), [f"beta={beta}", f"rho={rho}", f"seed={seed}"], m, {"status": "ok"})
                job += 1
    tables = write_summary(sweep, figures=False)  # a job's end when more jobs follow: tables only
    assert not list(sweep.glob("*.png")) and "pareto.png" not in tables.files
    drawn = ["pareto.png", "sweep_metrics.png", "sweep_heatmaps.png"]
    assert write_summary(sweep).files[-3:] == drawn
    assert write_summary(sweep, figures=False).files[-3:] == drawn  # the ones on disk
    with open(sweep / "summary_by_setting.csv") as f:
        settings = list(csv.DictReader(f))
    assert len(settings) == 4
    for row in settings:
        runs = values[(float(row["beta"]), float(row["rho"]))]
        assert row["n"] == "3" and row["seeds"] == "0 1 2"
        for metric in ("test/mse", "test/l0", "test/encoder_1/dead_fraction"):
            column = np.array([r[metric] for r in runs])
            assert float(row[metric]) == pytest.approx(column.mean(), rel=1e-12)
            assert float(row[f"{metric}_std"]) == pytest.approx(column.std(ddof=1), rel=1e-12)
    md = (sweep / "summary.md").read_text()
    assert "## By setting: mean ± sample std over seeds" in md and "## Every job" in md
    by_setting = md.split("## By setting")[1].split("## Every job")[0]
    table_header = next(line for line in by_setting.splitlines() if line.startswith("| beta"))
    assert "test/mse" in table_header and "test/encoder_1/dead_fraction" in table_header
    # the same in every job: said once in the header line, not a column of "0 ± 0"
    assert "test/dead_fraction |" not in table_header and "`test/dead_fraction` 0" in md
    # The sweep's closing lines rank settings, not jobs: three seeds of one take one place.
    said = write_summary(sweep, figures=False).closing_lines().splitlines()
    start = said.index("best 3 settings (mean ± std over their seeds):")
    header, _, *best = said[start + 1 :]
    assert [c.strip() for c in header.strip("|").split("|")][:3] == ["beta", "rho", "n"]
    places = [tuple(c.strip() for c in row.strip("|").split("|")[:3]) for row in best]
    assert len(places) == len(set(places)) == 3 and all(p[2] == "3" for p in places)
    first = values[(0.001, 0.05)]
    mean, std = np.mean([r["test/mse"] for r in first]), np.std([r["test/mse"] for r in first], ddof=1)
    assert f"{mean:.5g} ± {std:.2g}" in md
    for name in ("pareto", "sweep_metrics", "sweep_heatmaps"):
        with Image.open(sweep / f"{name}.png") as png:
            assert len(np.unique(np.asarray(png.convert("L")))) > 10, name


def test_a_resumed_job_is_a_repeat_of_its_setting_not_a_knob_of_its_own(tmp_path):
    """metrics.json records where a run resumed from; that is not a setting: a resumed seed is
    aggregated with the others, and the record stays in summary.csv."""
    sweep = tmp_path / "sweep"
    for job, seed in enumerate((0, 1, 2)):
        m = metrics(0.02 + seed / 1000, 0.03, 0.1, 5.0)
        if seed == 1:
            m |= {"resumed_from": "/runs/1/checkpoints/last.ckpt", "resumed_with": "epochs=12"}
        fake_job(sweep, str(job), ["beta=0.001", f"seed={seed}"], m, {"status": "ok"})
    summary = write_summary(sweep, figures=False)
    assert "resumed_from" not in summary.columns and "resumed_with" not in summary.columns
    with open(sweep / "summary_by_setting.csv") as f:
        [setting] = list(csv.DictReader(f))
    assert setting["n"] == "3" and "resumed_from" not in setting
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["resumed_from"] for r in rows] == ["", "/runs/1/checkpoints/last.ckpt", ""]


def test_methods_get_their_own_colour_and_frontier(tmp_path):
    """A sweep over sparsity methods: L0 panels per method with each method's frontier, probe
    accuracy against L0, and the distance-to-target panel for the KL settings only."""
    sweep = tmp_path / "sweep"
    jobs = [
        ("kl", ["beta=0.001"], 0.016, 14.0, 0.90),
        ("kl", ["beta=0.005"], 0.018, 7.0, 0.90),
        ("l1", ["sparsity=l1", "beta=0.01"], 0.017, 9.0, 0.93),
        ("l1", ["sparsity=l1", "beta=0.1"], 0.025, 3.0, 0.88),
        ("topk", ["sparsity=topk", "k=4"], 0.020, 4.0, 0.91),
        ("topk+auxk", ["sparsity=topk", "k=4", "model.sparsity.auxk=true"], 0.019, 4.0, 0.92),
    ]
    for i, (method, overrides, mse, l0, probe) in enumerate(jobs):
        m = {
            "test/mse": mse,
            "test/l0": l0,
            "test/probe_accuracy": probe,
            "test/rho_hat_mean": 0.07,
            "val/loss": 0.1,
        }
        fake_job(sweep, str(i), overrides, m, {"status": "ok"}, method=method)

    from sae.report import summary

    figures = {}
    real = summary._write_figures

    def keep(sweep_dir, settings, knobs, rows):
        figures["settings"] = settings
        return real(sweep_dir, settings, knobs, rows)

    summary._write_figures = keep
    try:
        write_summary(sweep)
    finally:
        summary._write_figures = real
    assert [s["method"] for s in figures["settings"]] == ["kl", "kl", "l1", "l1", "topk", "topk+auxk"]
    from sae.report.figures import pareto_figure

    fig = pareto_figure(figures["settings"], ["sparsity", "beta", "k"], summary.BASELINES)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "KL: reconstruction vs distance to the sparsity target",
        "Reconstruction vs L0",
        "Probe accuracy vs L0",
    ]
    labels = fig.axes[1].get_legend_handles_labels()[1]
    methods = ("kl", "l1", "topk", "topk+auxk")
    assert {*methods, *(f"{m} frontier" for m in methods)} <= set(labels)
    (placed,) = fig.axes[0].containers  # only the two KL settings are placed against rho
    assert len(placed.lines[0].get_xdata()) == 2
    # Labels face the middle: the rightmost point's (L0 14) runs left, into the plot.
    labels = {t.get_text(): t for t in fig.axes[1].texts}
    assert labels["beta=0.001"].get_horizontalalignment() == "right"
    assert labels["sparsity=l1, beta=0.1"].get_horizontalalignment() == "left"
    probe_front = [line for line in fig.axes[2].get_lines() if line.get_label() == "l1 frontier"][0]
    assert list(probe_front.get_ydata()) == [0.88, 0.93]  # higher accuracy is better here


def test_the_methods_figure_holds_each_method_to_its_l0():
    """With test/truncated_mse, the L0 panel draws it (not test/mse), and leaves out the notebook's
    baselines, whose MSEs are of its dense code."""
    from sae.report.figures import pareto_figure
    from sae.report.summary import BASELINES

    settings = [
        {"method": "kl", "n": 1, "rho": 0.05, "test/l0": 7.2, "test/mse": 0.018, "test/truncated_mse": 0.026},
        {"method": "topk", "n": 1, "test/l0": 8.0, "test/mse": 0.020, "test/truncated_mse": 0.020},
    ]
    fig = pareto_figure(settings, ["method"], BASELINES)
    panel = next(ax for ax in fig.axes if ax.get_title() == "Reconstruction at the L0 it is plotted at")
    drawn = sorted(y for c in panel.containers for y in c.lines[0].get_ydata())
    assert drawn == [0.020, 0.026]
    assert "truncated at the L0 threshold" in panel.get_ylabel()
    assert not any("published" in label for label in panel.get_legend_handles_labels()[1])


def test_jobs_whose_configs_differ_in_the_objective_are_not_ranked_by_val_loss(tmp_path):
    """Points of a preset (+point=...) set beta and the method in their own config files: the
    summary reads the difference from the jobs' configs, not only from the command line."""
    sweep = tmp_path / "sweep"
    for i, (beta, val_loss, mse, l0) in enumerate(((0.001, 0.02, 0.016, 14.0), (0.05, 0.01, 0.02, 4.0))):
        job = sweep / str(i)
        (job / ".hydra").mkdir(parents=True)
        config = {"optimized_metric": "val/loss", "rho": 0.05, "beta": beta, "model": {"sparsity": "kl"}}
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"+point=p{i}"]))
        (job / "metrics.json").write_text(json.dumps({"val/loss": val_loss, "test/mse": mse, "test/l0": l0}))
        (job / "status.json").write_text('{"status": "ok"}')
    write_summary(sweep)
    md = (sweep / "summary.md").read_text()
    assert "ranked by `frontier`" in md and "differ in `point`, `beta`" not in md and "`beta`" in md


def test_the_frontier_is_circled_where_its_points_are_drawn():
    """A setting that undershoots rho (rho_hat / rho - 1 < 0) and is on the frontier is circled at
    its own, negative, x: the front is found on the distance |x|, the ring drawn at x."""
    from sae.report.figures import pareto_figure

    settings = [
        {"rho": 0.05, "test/rho_hat_mean": 0.04, "test/mse": 0.02, "test/l0": 5.0},  # x = -0.2
        {"rho": 0.05, "test/rho_hat_mean": 0.10, "test/mse": 0.03, "test/l0": 9.0},  # x = +1, worse MSE
    ]
    fig = pareto_figure(settings, [], [])
    (ring,) = [c for c in fig.axes[0].collections if c.get_label().startswith("Pareto frontier")]
    assert ring.get_offsets().tolist() == [[pytest.approx(-0.2), 0.02]]


def test_summary_md_shows_the_key_metrics_and_names_the_others(tmp_path):
    sweep = tmp_path / "sweep"
    for job, beta, l1 in (("0", "0.001", 0.3), ("1", "0.005", 0.4)):
        m = metrics(0.02 - float(beta), 0.03, 0.07, 8.0) | {"test/l1": l1, "fit/seconds": 3.0 + l1}
        fake_job(sweep, job, [f"beta={beta}"], m, {"status": "ok"})
    write_summary(sweep)
    text = (sweep / "summary.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| job |"))
    assert "test/mse" in header and "fit/seconds" in header and "test/l1" not in header
    assert "Also in summary.csv, one column each: `test/l1`." in text
    with open(sweep / "summary.csv") as f:
        assert "test/l1" in next(csv.reader(f))


class _Job:
    """A submitit job as the launcher sees it: its results, or the error of a job that left none."""

    job_id = "7_1"
    state = "CANCELLED by 0"

    def __init__(self, error=None, job_return=None, stderr="/sweep/.submitit/7_1/7_1_0_log.err"):
        from types import SimpleNamespace

        self.error, self.job_return, self.paths = error, job_return, SimpleNamespace(stderr=stderr)

    def results(self):
        if self.error is not None:
            raise self.error
        return [self.job_return]


@pytest.fixture
def slurm_launcher(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra_plugins.sae_submitit_launchers.submitit_launchers import SlurmLauncher

    launcher = SlurmLauncher(partition="debug")
    job_folder = tmp_path / "1"
    job_folder.mkdir()
    monkeypatch.setattr(launcher, "_job_folder", lambda overrides, job_num: job_folder)
    return launcher, job_folder


def test_a_slurm_job_that_left_no_result_is_recorded_failed_and_the_sweep_goes_on(slurm_launcher):
    from hydra.core.utils import JobReturn, JobStatus
    from submitit.core.utils import FailedJobError, UncompletedJobError

    from sae.errors import JobFailed
    from sae.report.summary import job_row

    launcher, job_folder = slurm_launcher
    error = UncompletedJobError(
        "Job 7_1 (task: 0) with path /x.pkl\nhas not produced any output (state: CANCELLED)"
    )
    outcome = launcher._outcome(_Job(error), ["beta=-1"], 1)
    assert outcome.status == JobStatus.COMPLETED  # Hydra's sweeper would raise at a FAILED one
    assert isinstance(outcome.return_value, JobFailed)
    log = "/sweep/.submitit/7_1/7_1_0_log.err"
    line = f"slurm job 7_1 ended without a result (state CANCELLED by 0); its log: {log}"
    assert outcome.return_value.error == line
    assert json.loads((job_folder / "status.json").read_text()) == {"status": "failed", "error": line}
    assert (job_row(job_folder)["status"], job_row(job_folder)["error"]) == ("failed", line)

    # submitit's own error (the job timed out too often): its traceback's last line says why
    last = "UncompletedJobError: Job not requeued because: timed-out too many times."
    traceback = f"Traceback (most recent call last):\n  ...\n{last}\n"
    outcome = launcher._outcome(_Job(FailedJobError(traceback)), ["beta=-1"], 1)
    assert outcome.return_value.error.endswith(
        "timed-out too many times.; its log: /sweep/.submitit/7_1/7_1_0_log.err"
    )

    # a job that finished, or failed with an error of ours (a bug), hands back its own JobReturn
    for finished in (
        JobReturn(status=JobStatus.COMPLETED, _return_value=0.25),
        JobReturn(status=JobStatus.FAILED, _return_value=ValueError("a bug")),
    ):
        assert launcher._outcome(_Job(job_return=finished), ["beta=-1"], 1) is finished
    # one submitit ended from within (out of time, not requeued) goes on as failed
    out_of_time = UncompletedJobError("Job not requeued because: timed-out too many times.")
    ended = JobReturn(status=JobStatus.FAILED, _return_value=out_of_time)
    outcome = launcher._outcome(_Job(job_return=ended), ["beta=-1"], 1)
    assert outcome.status == JobStatus.COMPLETED
    assert outcome.return_value.error == "Job not requeued because: timed-out too many times."


def test_a_slurm_job_that_saved_itself_on_sigterm_keeps_its_interrupted_status(slurm_launcher):
    from submitit.core.utils import UncompletedJobError

    from sae.report.summary import job_row
    from sae.run.record import RunRecord

    launcher, job_folder = slurm_launcher
    said = f"interrupted at step 20 (epoch 2): saved ...; continue with: python train.py resume={job_folder}"
    RunRecord(job_folder).interrupted(said)
    outcome = launcher._outcome(_Job(UncompletedJobError("has not produced any output")), ["epochs=9"], 1)
    assert outcome.return_value.error == said
    assert job_row(job_folder)["status"] == "interrupted" and job_row(job_folder)["error"] == said


def test_summary_opens_with_the_answer_and_ends_with_its_figures(tmp_path):
    """summary.md says first which setting ranks first, with its spread over seeds, then the
    tables, then the figures (relative links, so GitHub and editors show them beside it)."""
    sweep = tmp_path / "sweep"
    mses = {"0.001": (0.010, 0.012), "0.005": (0.020, 0.024)}  # beta 0.001: better at lower L0
    for i, (beta, seed) in enumerate((b, s) for b in mses for s in (0, 1)):
        m = metrics(mses[beta][seed], 0.03, 0.06, 4.0 + seed if beta == "0.001" else 8.0 + seed)
        fake_job(sweep, str(i), [f"beta={beta}", f"seed={seed}"], m, {"status": "ok"})
    fake_job(sweep, "4", ["beta=-1", "seed=0"], None, {"status": "failed", "error": "config error: beta=-1"})
    write_summary(sweep)
    md = (sweep / "summary.md").read_text()
    answer = md.split("## Answer\n\n")[1].split("\n")[0]
    mse = np.array([0.010, 0.012]) * 1.5  # the truncated code's error ranks
    expected = f"`test/truncated_mse` {mse.mean():.5g} ± {mse.std(ddof=1):.2g}"
    assert answer.startswith("**beta=0.001** ranks first: ") and expected in answer
    assert "over 2 seeds" in answer
    sections = ("## Answer", "## By setting", "## Every job", "## Figures")
    assert [md.index(s) for s in sections] == sorted(md.index(s) for s in sections)
    figures = md.split("## Figures\n\n")[1]
    assert figures.split() == ["![pareto](pareto.png)", "![sweep_metrics](sweep_metrics.png)"]
    assert all((sweep / f"{name}.png").is_file() for name in ("pareto", "sweep_metrics"))
    assert "| 4 | -1 | 0 | failed |" in md and "config error: beta=-1" in md  # its row says why

    none = tmp_path / "none"
    fake_job(none, "0", ["beta=-1"], None, {"status": "failed", "error": "config error: beta=-1"})
    write_summary(none, figures=False)
    assert "## Answer\n\nNo job finished: the table below says why." in (none / "summary.md").read_text()


def test_a_sweep_of_seeds_alone_answers_with_its_one_setting(tmp_path):
    """Three seeds of one setting (experiment=best_probe): the answer gives the setting's mean and
    spread, not a first-ranked job without a name."""
    sweep = tmp_path / "sweep"
    for seed, val_loss in enumerate((0.030, 0.032, 0.037)):
        fake_job(sweep, str(seed), [f"seed={seed}"], metrics(0.01, val_loss, 0.06, 8.0), {"status": "ok"})
    write_summary(sweep, figures=False)
    answer = (sweep / "summary.md").read_text().split("## Answer\n\n")[1].split("\n")[0]
    losses = np.array([0.030, 0.032, 0.037])
    expected = f"`val/loss` {losses.mean():.5g} ± {losses.std(ddof=1):.2g} over 3 seeds."
    assert answer.startswith("One setting, only the seed swept: ") and answer.endswith(expected)


def test_a_metric_the_same_in_every_job_is_no_column_of_the_settings_table(tmp_path):
    """Two seeds of one setting, one of another (its std is NaN): dead_fraction 0 everywhere is
    said once in the header line, not a column of the table of settings."""
    sweep = tmp_path / "sweep"
    for job, (beta, seed) in enumerate((("1e-3", 0), ("1e-3", 1), ("5e-3", 0))):
        m = metrics(0.01 + job / 100, 0.03, 0.06, 8.0 - job) | {"test/dead_fraction": 0.0}
        fake_job(sweep, str(job), [f"beta={beta}", f"seed={seed}"], m, {"status": "ok"})
    write_summary(sweep, figures=False)
    md = (sweep / "summary.md").read_text()
    header = next(line for line in md.split("## By setting")[1].splitlines() if line.startswith("| beta"))
    assert "test/mse" in header and "test/dead_fraction" not in header
    assert "`test/dead_fraction` 0" in md


def test_knobs_read_as_typed_and_count_as_numbers(tmp_path):
    """beta=1e-3 on the command line: `1e-3` in summary.md and summary.csv (not 0.001, as Hydra
    writes each job's override, nor float noise), and a number for ranking and figures."""
    sweep = tmp_path / "sweep"
    for i, beta in enumerate(("0.001", "0.005", "0.02")):  # each job's value, as Hydra writes it
        fake_job(sweep, str(i), [f"beta={beta}", "lr=0.0003"], metrics(0.01 * (i + 1), 0.03, 0.06, 8.0 - i))
        (sweep / str(i) / "status.json").write_text('{"status": "ok"}')
    command = {"hydra": {"overrides": {"task": ["beta=1e-3,5e-3, 2e-2", "lr=0.0003", "epochs=range(1,3)"]}}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(command))  # what the user typed
    summary = write_summary(sweep)
    md = (sweep / "summary.md").read_text()
    assert {"| 1e-3 |", "| 5e-3 |", "| 2e-2 |"} <= {f"| {c} |" for c in md.replace(" | ", "|").split("|")}
    assert "`lr` 0.0003" in md  # a constant knob, in the header line, as typed
    with open(sweep / "summary.csv") as f:
        assert sorted(row["beta"] for row in csv.DictReader(f)) == ["1e-3", "2e-2", "5e-3"]
    betas = [r["beta"] for r in summary.rows]
    assert betas == [0.001, 0.005, 0.02] and all(isinstance(b, float) for b in betas)
    fig = sweep_metrics(aggregate_seeds(summary.rows), ["beta"])
    assert fig.axes[0].get_xscale() == "log"  # beta drawn as a number over its decades
