"""Sweep summaries: one table row per job, a Markdown ranking, and a Pareto plot.

Written by a Hydra callback as jobs finish and when the multirun ends (no extra command), and
rebuilt from the job folders alone by `python evaluate.py sweep_dir=PATH`, so a sweep that was
interrupted or ran on another machine can be summarised too.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sae.errors import UserError, one_line
from sae.names import (
    CLOSING,
    COMPARED_FIRST,
    ERROR_AXIS,
    FRONTIER_AXES,
    MATCHED_COSINE,
    OBJECTIVE_KNOBS,
    RUN_COST,
    SEED_KNOBS,
    higher_is_better,
    metric_text,
    within_setting,
)
from sae.report.consistency import seed_consistency
from sae.report.equal_l0 import (
    CSV_COLUMNS,
    compare_at_l0,
    comparison_markdown,
    dictionary_overlap,
    overlap_markdown,
)
from sae.report.frontier import frontier_axes, frontier_ranks, is_number
from sae.run.atomic import write_atomic, write_text_atomic
from sae.run.record import RunRecord

# The reference notebook's baselines, each with what it was trained on. Its published test MSE is
# not what its own loop gives when run here (10 epochs on the 60k training images); this project's
# default holds out 5k of them for validation (data.val_size) and trains on 55k.
BASELINES = (
    {
        "name": "reference notebook, published",
        "test/mse": 0.01387,
        "test/rho_hat_mean": 0.069,
        "rho": 0.05,
        "epochs": 10,
        "train_images": 60000,
    },
    {
        "name": "reference notebook's loop, run here",
        "test/mse": 0.0176,
        "rho": 0.05,
        "epochs": 10,
        "train_images": 60000,
    },
)
# What a job's metrics.json records about the run besides metrics: where it came from, not a knob.
RUN_RECORD_COLUMNS = ("ckpt_path", "resumed_from", "resumed_with")
NON_OVERRIDE_COLUMNS = (
    "job",
    "status",
    "error",
    *RUN_RECORD_COLUMNS,
    "frontier",
    "n",
    "seeds",
    "jobs",
)  # jobs that differ only in these are repeats of one setting


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job folders (those holding a .hydra/ config), in job-number order."""
    found = [p for p in Path(sweep_dir).iterdir() if (p / ".hydra" / "config.yaml").is_file()]
    return sorted(found, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def sweep_jobs(sweep_dir: str | Path) -> list[Path]:
    """A sweep folder's job folders; a UserError naming the folder if it has none."""
    jobs = job_dirs(Path(sweep_dir)) if Path(sweep_dir).is_dir() else []
    if not jobs:
        raise UserError(f"sweep_dir={sweep_dir} holds no job folders (<job>/.hydra/config.yaml)")
    return jobs


class Typed(float):
    """A knob's number as the command typed it: it ranks, averages and is drawn as the float
    Hydra read (beta=1e-3 is 0.001), and is shown as typed (`1e-3`) in the tables."""

    text: str

    def __new__(cls, value: float, text: str) -> Typed:
        number = super().__new__(cls, value)
        number.text = text
        return number

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__  # the csv module writes a float's repr

    def __reduce__(self):
        return Typed, (float(self), self.text)


_override_parser = None


def _parse_value(text: str) -> Any:
    """An override's value as Hydra reads it from the command line (1e-3 a float, 0 an int, kl a
    string); a float keeps the text it was typed as (Typed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    global _override_parser
    _override_parser = _override_parser or OverridesParser.create()
    try:
        value = _override_parser.parse_override(f"knob={text}").value()
    except HydraException:
        return text
    return Typed(value, text) if type(value) is float else value


def typed_in_command(sweep_dir: Path, files: JobFiles) -> dict[str, dict[float, str]]:
    """For each knob the sweep's command gave numbers for (beta=1e-3,5e-3), the text each was typed
    as, by value, from the sweep's multirun.yaml: Hydra writes each job's override anew
    (beta=0.001). Values given any other way (range(), a list) are left as the jobs have them."""
    try:
        task = files.read(sweep_dir / "multirun.yaml")["hydra"]["overrides"]["task"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return {}  # no such file (an Optuna study, a summary of copied job folders): as the jobs say
    typed: dict[str, dict[float, str]] = {}
    for item in task if isinstance(task, list) else []:
        key, _, value = str(item).lstrip("+").partition("=")
        texts = [t.strip() for t in value.split(",")]
        numbers = {float(v): t for t in texts if isinstance(v := _parse_value(t), Typed)}
        if numbers:
            typed[key] = numbers
    return typed


def as_typed(rows: list[dict[str, Any]], typed: dict[str, dict[float, str]]) -> list[dict[str, Any]]:
    """The rows with each knob's number shown as the command typed it (typed_in_command)."""
    for key, texts in typed.items():
        for row in rows:
            if isinstance(value := row.get(key), Typed) and float(value) in texts:
                row[key] = Typed(float(value), texts[float(value)])
    return rows


def job_row(job: Path, files: JobFiles | None = None) -> dict[str, Any]:
    """job, each override as a column, status (ok / failed / interrupted / incomplete), error, every
    metric."""
    row: dict[str, Any] = {"job": job.name}
    overrides_file = job / ".hydra" / "overrides.yaml"
    overrides = (files or JobFiles()).read(overrides_file) if overrides_file.is_file() else []
    for item in overrides or []:
        if str(item).startswith("~"):
            continue  # a deletion (~callbacks.x) sets no value
        key, _, value = str(item).lstrip("+").partition("=")
        if not key.startswith("hydra.") and "enable_progress_bar" not in key:
            row[key] = _parse_value(value)
    record = RunRecord(job)
    status = record.status()
    if status.get("status") in ("failed", "interrupted"):
        row.update(status=status["status"], error=str(status.get("error", "")))
    elif record.metrics_file.is_file():
        try:
            metrics = record.metrics()
        except UserError as err:
            return row | {"status": "incomplete", "error": one_line(err)}
        row.update({k: v for k, v in metrics.items() if k not in ("job", "status", "error")})
        if status.get("status") == "incomplete":  # results still missing (its probes, its figures)
            row.update(status="incomplete", error=str(status.get("error", "")))
        else:
            row.update(status="ok", error="")
    else:  # killed, or still running
        row.update(status="incomplete", error=f"no {record.metrics_file.name}")
    return row


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    first = ["job"]
    overrides = [k for k in override_keys(rows) if k not in first]
    metrics = sorted({k for r in rows for k in r if "/" in k})
    metrics = [m for m in COMPARED_FIRST if m in metrics] + [m for m in metrics if m not in COMPARED_FIRST]
    ranked = ["frontier"] if any("frontier" in r for r in rows) else []
    ordered = first + overrides + ["status", *ranked] + metrics
    return ordered + ["error", "ckpt_path"] + [c for c in RUN_RECORD_COLUMNS[1:] if any(c in r for r in rows)]


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Typed):  # a knob: as typed
        return str(value)
    if isinstance(value, float):
        return metric_text(value)
    return str(value)


def split_constant_columns(
    rows: list[dict[str, Any]], columns: list[str], keep: tuple[str, ...]
) -> tuple[list[str], dict[str, str]]:
    """The columns whose value differs between jobs (plus `keep`), and the others' common values.

    A metric counts as the same when every job that has it has the same value (failed jobs have
    none); a column empty in every job is dropped without a value. With one job every column with
    a value is kept: nothing is compared.
    """
    shown, same = [], {}
    for column in columns:
        values = [_fmt(r.get(column)) for r in rows]
        present = {v for v in values if v}
        differs = len(present) > 1 or ("/" not in column and len(set(values)) > 1)
        if column in keep or differs or (len(rows) < 2 and present):
            shown.append(column)
        elif present:
            same[column] = present.pop()
    return shown, same


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_fmt(row.get(c)).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _job_config(job: Path, files: JobFiles) -> dict[str, Any]:
    return files.read(job / ".hydra" / "config.yaml") or {}


_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, where PyYAML has it


class JobFiles:
    """Jobs' .hydra files, each parsed once per version (path, mtime, size). Its owner keeps it
    between summaries (sae.sweep.summary_callback: the summary rewritten after each of a sweep's n
    jobs reads every job's files, n^2 reads over the sweep); a summary made once makes its own."""

    def __init__(self) -> None:
        self._parsed: dict[tuple[str, int, int], Any] = {}

    def read(self, path: Path) -> Any:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in self._parsed:
            self._parsed[key] = yaml.load(path.read_text(), Loader=_SafeLoader)
        return copy.deepcopy(self._parsed[key])


def _method(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A job's sparsity method and its settings, from its config (a sweep from before the method
    owned its settings: `model.sparsity` a name, `model.auxk` beside it)."""
    model = cfg.get("model") or {}
    sparsity = model.get("sparsity", "kl")
    if isinstance(sparsity, dict):
        return str(sparsity.get("method", "kl")), sparsity
    return str(sparsity), {"auxk": model.get("auxk")}


def _objective_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings of a job's config that define its training objective."""
    model = cfg.get("model") or {}
    method, settings = _method(cfg)
    return (
        {k: cfg.get(k) for k in OBJECTIVE_KNOBS}
        | {f"model.{k}": model.get(k) for k in ("recon_loss", "sparsity_layers", "hidden_dims")}
        | {"model.sparsity": method, "model.sparsity.auxk": settings.get("auxk")}
    )


def _figure_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """What the figures need of a job's config: its KL target rho (none for other methods, or
    with target_l0) and its sparsity method (TopK with AuxK apart from TopK: a frontier each)."""
    method, settings = _method(cfg)
    return {  # with target_l0, KL's rho is adapted in training: the configured one is no target
        "rho": cfg.get("rho") if method == "kl" and cfg.get("target_l0") is None else None,
        "method": method + ("+auxk" if settings.get("auxk") else ""),
    }


def _optimized_metric(jobs: list[Path], files: JobFiles) -> str:
    for job in jobs:
        cfg = _job_config(job, files)
        if cfg.get("optimized_metric"):
            return cfg["optimized_metric"]
    return "val/loss"


def override_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The override columns, in the order the jobs give them."""
    keys = [k for r in rows for k in r if "/" not in k and k not in NON_OVERRIDE_COLUMNS]
    return list(dict.fromkeys(keys))


def swept_knobs(rows: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between jobs (seeds included)."""
    return [k for k in override_keys(rows) if len({_fmt(r.get(k)) for r in rows}) > 1]


def ranking(
    rows: list[dict[str, Any]], optimized_metric: str, objective_differs: list[str] = ()
) -> tuple[Any, str]:
    """How the summary orders jobs (a sort key over rows) and the sentence that says so.

    The sweep's optimized_metric, unless it contains the sparsity penalty (val/loss) and the jobs
    differ in a knob of the objective (beta, rho, ...; by their overrides, or `objective_differs`,
    read from their configs): then the lower beta would win by construction, so the jobs are
    ranked by their Pareto rank on (L0, the truncated code's test MSE), then that MSE.
    """
    knobs = [k for k in swept_knobs(rows) if k not in SEED_KNOBS]
    objective = [k for k in knobs if k in OBJECTIVE_KNOBS or k.startswith(("model.", "sparsity"))]
    objective += [k for k in objective_differs if k not in objective]
    if within_setting(optimized_metric) and objective:
        axes = frontier_axes(rows)
        ranks = frontier_ranks(rows, axes)
        for row, rank in zip(rows, ranks, strict=True):
            row["frontier"] = rank

        def by_frontier(row: dict[str, Any]):
            ok = row.get("frontier") is not None and row.get("status", "ok") == "ok"
            return (0, row["frontier"], row[axes[1]]) if ok else (1, 0, 0.0)

        said = (
            f"ranked by `frontier`, the Pareto rank on ({', '.join(f'`{a}`' for a in axes)}), both "
            "lower = better (1: no other job is both sparser and reconstructs better), "
            f"then by `{axes[1]}`. Not by `{optimized_metric}`: it contains beta * the sparsity penalty, "
            f"and the jobs differ in {', '.join(f'`{k}`' for k in objective)}, so it would rank them by "
            "their objective"
        )
        if axes != FRONTIER_AXES:
            said += (
                f". These jobs predate `{ERROR_AXIS}` (the error of the code truncated at the L0 threshold): "
                "`test/mse` stands in, which for dense (sigmoid) codes is not the error at that L0"
            )
        return by_frontier, said
    sign = -1 if higher_is_better(optimized_metric) else 1

    def by_metric(row: dict[str, Any]):
        value = row.get(optimized_metric)
        ok = row.get("status", "ok") == "ok" and is_number(value)
        return (0, sign * value) if ok else (1, 0.0)

    best = "highest" if higher_is_better(optimized_metric) else "lowest"
    return by_metric, f"ranked by `{optimized_metric}` ({best} first), the sweep's optimized_metric"


def aggregate_seeds(
    rows: list[dict[str, Any]], job_settings: dict[str, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """One row per setting: the finished jobs that differ only in `seed`, with each metric's mean
    and sample standard deviation (`<metric>_std`, NaN for one job) and their number `n`; `rho`
    and `method` (the sparsity method) from the jobs' configs (`job_settings`, by job)."""
    knobs = [k for k in override_keys(rows) if k not in SEED_KNOBS]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "ok":
            groups.setdefault(tuple(_fmt(row.get(k)) for k in knobs), []).append(row)
    settings = []
    for members in groups.values():
        setting = {k: members[0].get(k) for k in knobs if k in members[0]}
        setting["n"] = len(members)
        setting["seeds"] = " ".join(_fmt(m.get("seed", "default")) for m in members)
        setting["jobs"] = " ".join(m["job"] for m in members)
        metrics = dict.fromkeys(m for r in members for m in r if "/" in m)
        for metric in metrics:
            values = [float(r[metric]) for r in members if is_number(r.get(metric))]
            if len(values) == len(members):  # a metric some repeats lack is not averaged
                setting[metric] = statistics.fmean(values)
                setting[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        known = (job_settings or {}).get(members[0]["job"], {})
        rho = setting.get("rho", known.get("rho"))
        if is_number(rho):
            setting["rho"] = rho
        if known.get("method"):
            setting["method"] = known["method"]
        settings.append(setting)
    return settings


def with_seed_consistency(settings: list[dict[str, Any]], sweep_dir: Path) -> list[dict[str, Any]]:
    """Each setting of two or more seeds with whether they found the same dictionary
    (sae.report.consistency), where every one of its jobs left its dictionary.npy."""
    for setting in settings:
        if setting["n"] < 2:
            continue
        dictionaries = [RunRecord(sweep_dir / job).dictionary() for job in setting["jobs"].split()]
        if all(d is not None for d in dictionaries) and len({d.shape for d in dictionaries}) == 1:
            setting.update(seed_consistency(dictionaries))
    return settings


def _spread(setting: dict[str, Any], metric: str) -> bool:
    """Whether a setting's seeds differ in the metric (a single seed's std is NaN: they do not)."""
    std = setting.get(f"{metric}_std")
    return is_number(std) and std > 0


def _mean_std(row: dict[str, Any], metric: str) -> str:
    mean, std = row.get(metric), row.get(f"{metric}_std")
    if not is_number(mean):
        return ""
    return f"{metric_text(mean)} ± {std:.2g}" if is_number(std) else metric_text(mean)


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


@dataclass
class SweepSummary:
    """What write_summary wrote: the job rows (in job order and best first) and the files."""

    sweep_dir: Path
    rows: list[dict[str, Any]]
    ranked: list[dict[str, Any]]
    ranked_by: str
    columns: list[str]  # those summary.md shows
    files: list[str]
    metric: str  # the sweep's optimized_metric
    # When jobs repeat settings with other seeds: the settings (mean ± std), best first, and the
    # columns summary.md shows of them.
    settings: list[dict[str, Any]] = field(default_factory=list)
    setting_columns: list[str] = field(default_factory=list)

    def closing_lines(self, best: int = 3) -> str:
        """What a sweep command ends with: where its results are, and its best settings (over
        their seeds, when jobs repeat them), else its best jobs."""
        ok = sum(r["status"] == "ok" for r in self.rows)
        figures = ", ".join(f for f in self.files if f.endswith(".png"))
        lines = [
            f"sweep folder: {self.sweep_dir.resolve()}",
            f"  summary.md: {len(self.rows)} jobs, {ok} ok; {self.ranked_by.split(',')[0].replace('`', '')}",
            f"  figures: {figures}",
            f"  tensorboard --logdir {self.sweep_dir.resolve()}",
        ]
        if self.settings:  # a setting's seeds do not take several of the places
            top = self.settings[:best]
            lines += [
                f"best {len(top)} settings (mean ± std over their seeds):",
                markdown_table(top, self.setting_columns).rstrip(),
            ]
            return "\n".join(lines)
        top = [r for r in self.ranked if r["status"] == "ok"][:best]
        if top:  # the settings, how they rank, and the metrics compared first; summary.md has all
            settings = [c for c in self.columns if "/" not in c and c != "error"]
            metrics = [m for m in (self.metric, *CLOSING) if m in self.columns]
            lines += [f"best {len(top)}:", markdown_table(top, [*settings, *dict.fromkeys(metrics)]).rstrip()]
        return "\n".join(lines)


def write_summary(sweep_dir: str | Path, figures: bool = True, files: JobFiles | None = None) -> SweepSummary:
    """Write summary.csv, summary.md, pareto.png and sweep_metrics.png into sweep_dir (and, when
    jobs repeat a setting with other seeds, summary_by_setting.csv; for a two-knob grid,
    sweep_heatmaps.png). figures=False: the tables only (a job's end, when more jobs follow)."""
    sweep_dir = Path(sweep_dir)
    jobs = job_dirs(sweep_dir)
    files = files or JobFiles()
    rows = as_typed([job_row(job, files) for job in jobs], typed_in_command(sweep_dir, files))
    configs = {job.name: _job_config(job, files) for job in jobs}
    job_settings = {name: _figure_settings(cfg) for name, cfg in configs.items()}
    objectives = [_objective_settings(cfg) for cfg in configs.values()]
    differ = [
        k for k in (objectives[0] if objectives else {}) if len({repr(o.get(k)) for o in objectives}) > 1
    ]
    metric = _optimized_metric(jobs, files)
    sort_key, ranked_by = ranking(rows, metric, differ)
    columns = _columns(rows)
    _write_csv(sweep_dir / "summary.csv", rows, columns)

    ranked = sorted(rows, key=sort_key)
    # The Markdown shows what differs between jobs; summary.csv keeps every column.
    across = "frontier" in columns  # the jobs differ in the objective: within-setting metrics mislead
    keep = ("job", "status", "frontier") if across else ("job", "status", metric)
    shown, same = split_constant_columns(rows, [c for c in columns if c not in RUN_RECORD_COLUMNS], keep=keep)
    # Of the metrics, the ones compared first (and the run's time): a table that reads.
    hidden = [
        c
        for c in shown
        if "/" in c and (c not in (metric, *COMPARED_FIRST, *RUN_COST) or (across and within_setting(c)))
    ]
    shown = [c for c in shown if c not in hidden]
    header = _summary_header(sweep_dir, rows, ranked_by, same, hidden, across)
    body = "## Every job\n\n" + markdown_table(ranked, shown)

    files = ["summary.csv", "summary.md"]
    settings = with_seed_consistency(aggregate_seeds(rows, job_settings), sweep_dir)
    knobs = [k for k in swept_knobs(rows) if k not in SEED_KNOBS]
    by_setting: tuple[list[dict[str, Any]], list[str]] = ([], [])
    if any(s["n"] > 1 for s in settings):
        section, *by_setting = _settings_section(sweep_dir, settings, metric, differ)
        body = section + "\n" + body
        files.append("summary_by_setting.csv")
    if figures:
        drawn = _write_figures(sweep_dir, settings, knobs, rows)
    else:  # the ones drawn before, on disk
        drawn = [f"{name}.png" for name in SWEEP_FIGURES if (sweep_dir / f"{name}.png").is_file()]
    files += drawn
    if by_setting[0]:  # the settings, best first, their means and stds as numbers
        best = sorted(settings, key=ranking(settings, metric, differ)[0])
    else:
        best = [r for r in ranked if r["status"] == "ok"]
    ranked_on = list(frontier_axes(rows)) if "frontier" in columns else [metric]
    equal_l0, written = _methods_at_l0(sweep_dir, rows, configs, job_settings, figures)
    answer = _answer(best, knobs, ranked_on) + equal_l0
    files, drawn = files + written, drawn + [f for f in written if f.endswith(".png")]
    pictures = "".join(f"![{name[:-4]}]({name})\n\n" for name in drawn)  # relative: next to summary.md
    write_text_atomic(
        sweep_dir / "summary.md", header + answer + body + ("\n## Figures\n\n" + pictures if drawn else "")
    )
    return SweepSummary(sweep_dir, rows, ranked, ranked_by, shown, files, metric, *by_setting)


def _methods_at_l0(
    sweep_dir: Path,
    rows: list[dict[str, Any]],
    configs: dict[str, dict[str, Any]],
    job_settings: dict[str, dict[str, Any]],
    figures: bool,
) -> tuple[str, list[str]]:
    """For a sweep of two or more methods at target L0s: methods_at_l0.md, .csv and .png
    (sae.report.equal_l0), and the line of summary.md that points to them."""
    jobs = [
        {
            **row,
            "method": job_settings[row["job"]]["method"],
            "target_l0": configs[row["job"]].get("target_l0"),
            "seed": configs[row["job"]].get("seed"),
        }
        for row in rows
        if row["status"] == "ok"
    ]
    jobs = [j for j in jobs if is_number(j["target_l0"])]
    if len({j["method"] for j in jobs}) < 2:
        return "", []
    table = compare_at_l0(jobs)
    seeds = len({j["seed"] for j in jobs})
    dictionaries: dict[tuple[float, str], list[Any]] = {}
    for job in jobs:
        dictionary = RunRecord(sweep_dir / job["job"]).dictionary()
        if dictionary is not None:
            dictionaries.setdefault((float(job["target_l0"]), job["method"]), []).append(dictionary)
    text = comparison_markdown(table, seeds) + "\n" + overlap_markdown(dictionary_overlap(dictionaries))
    write_text_atomic(sweep_dir / "methods_at_l0.md", text)
    _write_csv(sweep_dir / "methods_at_l0.csv", table, list(CSV_COLUMNS))
    written = ["methods_at_l0.md", "methods_at_l0.csv"]
    if figures:
        from sae.report.figures import methods_at_l0, png_bytes

        png = png_bytes(methods_at_l0(table))
        write_atomic(sweep_dir / "methods_at_l0.png", lambda f: f.write(png))
        written.append("methods_at_l0.png")
    elif (sweep_dir / "methods_at_l0.png").is_file():
        written.append("methods_at_l0.png")
    line = (
        "The methods at equal L0, each target with 95% confidence intervals and paired t-tests over "
        "seeds: [methods_at_l0.md](methods_at_l0.md).\n\n"
    )
    return line, written


def _answer(ranked: list[dict[str, Any]], knobs: list[str], metrics: list[str]) -> str:
    """summary.md's answer, before the tables: the setting ranked first, its values of the
    metrics it was ranked on (mean ± sample std over its seeds, when it has several), and the
    other settings on the Pareto frontier with it, if any."""
    if not ranked:
        return "## Answer\n\nNo job finished: the table below says why.\n\n"

    def name(row: dict[str, Any]) -> str:
        return " ".join(f"{k}={_fmt(row[k])}" for k in knobs if k in row) or f"job {row.get('job', '')}"

    best = ranked[0]
    values = ", ".join(f"`{m}` {_mean_std(best, m)}" for m in metrics if is_number(best.get(m)))
    seeds = f" over {best['n']} seeds" if best.get("n", 1) > 1 else ""
    if len(ranked) == 1 and not any(k in best for k in knobs) and "job" not in best:
        return f"## Answer\n\nOne setting, only the seed swept: {values}{seeds}.\n\n"
    line = f"## Answer\n\n**{name(best)}** ranks first: {values}{seeds}."
    also = [name(r) for r in ranked[1:] if best.get("frontier") == r.get("frontier") == 1]
    if also:
        line += f" Also on the frontier (sparser but worse, or better but denser): {', '.join(also)}."
    return line + "\n\n"


def _summary_header(
    sweep_dir: Path,
    rows: list[dict[str, Any]],
    ranked_by: str,
    same: dict[str, Any],
    hidden: list[str],
    across: bool,
) -> str:
    """summary.md's opening: the count, the ranking, the baselines, and what the tables leave out."""
    baselines = "; ".join(
        f"{b['name']}: test MSE {b['test/mse']:g} ({b['epochs']} epochs, {b['train_images'] // 1000}k images)"
        for b in BASELINES
    )
    header = (
        f"# Sweep summary: {sweep_dir}\n\n{len(rows)} jobs, {sum(r['status'] == 'ok' for r in rows)} ok; "
        f"{ranked_by}.\n\nBaselines: {baselines}. This project's default trains on 55k images "
        "(data.val_size=5000 held out): `data.val_size=0` trains on all 60k.\n\n"
    )
    if same:
        common = ", ".join(f"`{k}` {v}" for k, v in same.items())
        header += f"The same in every job (that has it), so not in the table: {common}.\n\n"
    if across and any(within_setting(c) for c in hidden):
        header += (
            "`val/loss` holds beta * the sparsity penalty, so it compares jobs of one setting only (an lr "
            "or seed search), not these: it is in summary.csv, not in the tables below.\n\n"
        )
    if hidden:
        header += f"Also in summary.csv, one column each: {', '.join(f'`{c}`' for c in hidden)}.\n\n"
    return header


def _settings_section(
    sweep_dir: Path, settings: list[dict[str, Any]], metric: str, differ: list[str]
) -> tuple[str, list[dict[str, Any]], list[str]]:
    """summary_by_setting.csv, and the Markdown table of settings (mean ± std over their seeds);
    returns that section, and the table's rows (best first) and columns."""
    sort_key, _ = ranking(settings, metric, differ)
    knobs = [k for k in override_keys(settings) if k not in ("n", "seeds", "jobs")]
    metrics = [
        m for m in dict.fromkeys(m for s in settings for m in s if "/" in m and not m.endswith("_std"))
    ]
    metrics = [m for m in COMPARED_FIRST if m in metrics] + [m for m in metrics if m not in COMPARED_FIRST]
    extra = ["frontier"] if any("frontier" in s for s in settings) else []
    columns = [*knobs, "n", "seeds", "jobs", *extra]
    _write_csv(
        sweep_dir / "summary_by_setting.csv",
        settings,
        columns + [c for m in metrics for c in (m, f"{m}_std")],
    )
    varying = [k for k in knobs if len({_fmt(s.get(k)) for s in settings}) > 1] or knobs
    shown = [m for m in metrics if m in COMPARED_FIRST and not (extra and within_setting(m))]
    # A metric the same in every job is in the header line above (dead_fraction 0 ± 0 reads as news).
    shown = [
        m
        for m in shown
        if len({_fmt(s.get(m)) for s in settings}) > 1 or any(_spread(s, m) for s in settings)
    ]
    if metric in metrics and metric not in shown and not extra:  # the metric ranked on, shown
        shown.insert(0, metric)
    table = [{**s, **{m: _mean_std(s, m) for m in shown}} for s in sorted(settings, key=sort_key)]
    table_columns = [*varying, "n", *extra, *shown]
    section = (
        "## By setting: mean ± sample std over seeds (n jobs each)\n\n"
        "Ranked as the jobs below, on the settings' means. Every metric's mean and std: "
        "summary_by_setting.csv.\n\n" + markdown_table(table, table_columns)
    )
    return section, table, table_columns


SWEEP_FIGURES = ("pareto", "sweep_metrics", "sweep_heatmaps", "seed_consistency")


def _write_figures(
    sweep_dir: Path, settings: list[dict[str, Any]], knobs: list[str], rows: list[dict[str, Any]]
) -> list[str]:
    """pareto.png (one point per setting, error bars over seeds), sweep_metrics.png (the settings'
    means as lines, each job of `rows` as a point), and sweep_heatmaps.png when the sweep is a
    grid over two knobs; returns their names."""
    # matplotlib only when there is something to draw
    from sae.report.figures import pareto_figure, png_bytes, sweep_heatmaps, sweep_metrics
    from sae.report.figures import seed_consistency as seed_consistency_figure

    numeric = [k for k in knobs if all(is_number(s.get(k)) for s in settings)]
    figures = {
        "pareto": pareto_figure(settings, knobs, BASELINES),
        "sweep_metrics": sweep_metrics(settings, numeric, knobs, {r["job"]: r for r in rows}),
    }
    if len(numeric) == 2 and len(settings) > 2:
        figures["sweep_heatmaps"] = sweep_heatmaps(settings, *numeric)
    if any(MATCHED_COSINE in s for s in settings):
        figures["seed_consistency"] = seed_consistency_figure(settings, knobs)
    for name, fig in figures.items():
        png = png_bytes(fig)
        write_atomic(sweep_dir / f"{name}.png", lambda f, png=png: f.write(png))
    return [f"{name}.png" for name in figures]
