"""Methods compared at equal L0: for a sweep that trains several sparsity methods at the same
target L0s (target_l0, e.g. experiment=methods_frontier_l0), each method's mean and 95% confidence
interval over seeds at each target, and a paired t-test over seeds against the best method there.

A method's sparsity knob (beta, k, a threshold) does not compare across methods; its L0 does.
Seeds pair the jobs: the same seed gives the same data order and split, so a paired test removes
what the seeds share.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np

from sae.names import ERROR_AXIS, MATCHED_COSINE, SPARSITY_AXIS, higher_is_better
from sae.report.consistency import between_settings, seed_consistency
from sae.report.frontier import is_number

PROBE = "test/probe_accuracy"
# What the comparison reports, in this order: the error it ranks on, the plain MSE, the probe
# and the L0 each method reached.
COMPARED = (ERROR_AXIS, "test/mse", PROBE, SPARSITY_AXIS)
RANKED_ON = (ERROR_AXIS, PROBE)  # each with its best method and the paired test against it
CONFIDENCE = 0.95


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t confidence interval (NaN for one value)."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    half = (
        stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    )
    return mean, float(half)


def paired_p_value(a: dict[Any, float], b: dict[Any, float]) -> float:
    """Two-sided paired t-test over the seeds both have (NaN with fewer than two, or when every
    difference is the same: no spread to test against)."""
    from scipy import stats

    seeds = [s for s in a if s in b]
    differences = [a[s] - b[s] for s in seeds]
    if len(seeds) < 2 or statistics.stdev(differences) <= 1e-9 * max(map(abs, differences)):
        return math.nan  # a constant difference (up to rounding): no spread to test against
    return float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)


def compare_at_l0(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (target L0, method) from finished jobs, each a dict with `target_l0`, `method`,
    `seed` and its metrics: n, `<metric>` (mean) and `<metric>_ci` (half-width) for each of
    COMPARED, and for each metric ranked on, `<metric>_best` (this method is the best at this
    L0), `<metric>_vs_best` (mean difference to the best) and `<metric>_p` (paired t-test)."""
    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for job in jobs:
        if is_number(job.get("target_l0")):
            groups.setdefault((float(job["target_l0"]), str(job["method"])), []).append(job)
    table = []
    for (target, method), members in sorted(groups.items()):
        row: dict[str, Any] = {"target_l0": target, "method": method, "n": len(members)}
        for metric in COMPARED:
            values = [float(m[metric]) for m in members if is_number(m.get(metric))]
            if values:
                row[metric], row[f"{metric}_ci"] = t_interval(values)
            row[f"{metric}_by_seed"] = {
                m.get("seed"): float(m[metric]) for m in members if is_number(m.get(metric))
            }
        table.append(row)
    for target in sorted({r["target_l0"] for r in table}):
        at_target = [r for r in table if r["target_l0"] == target]
        for metric in RANKED_ON:
            measured = [r for r in at_target if is_number(r.get(metric))]
            if not measured:
                continue
            better = max if higher_is_better(metric) else min
            best = better(measured, key=lambda r: r[metric])
            for r in measured:
                r[f"{metric}_best"] = r is best
                r[f"{metric}_vs_best"] = r[metric] - best[metric]
                r[f"{metric}_p"] = (
                    math.nan
                    if r is best
                    else paired_p_value(r[f"{metric}_by_seed"], best[f"{metric}_by_seed"])
                )
    return table


def dictionary_overlap(
    dictionaries: dict[tuple[float, str], list[np.ndarray]],
) -> dict[float, dict[tuple[str, str], float]]:
    """Per target L0, per pair of methods (a method with itself: its seeds), the mean matched
    cosine of their dictionaries (sae.report.consistency), over every pair of runs."""
    overlap: dict[float, dict[tuple[str, str], float]] = {}
    for target in sorted({t for t, _ in dictionaries}):
        methods = sorted(m for t, m in dictionaries if t == target)
        cells = overlap.setdefault(target, {})
        for i, a in enumerate(methods):
            for b in methods[i:]:
                runs_a, runs_b = dictionaries[(target, a)], dictionaries[(target, b)]
                matched = seed_consistency(runs_a) if a == b else between_settings(runs_a, runs_b)
                if matched:
                    cells[(a, b)] = cells[(b, a)] = matched[MATCHED_COSINE]
    return overlap


def overlap_markdown(overlap: dict[float, dict[tuple[str, str], float]]) -> str:
    """Per target L0, the methods x methods matrix of matched cosines (the diagonal: a method's
    seeds with each other)."""
    lines = [
        "## Do the methods find the same features?",
        "",
        "Mean matched cosine of the dictionaries (what each unit writes in pixel space, units paired "
        "one to one by the Hungarian algorithm), over every pair of runs: on the diagonal a method's "
        "seeds with each other, off it one run of each method (docs/results.md).",
        "",
    ]
    for target, cells in overlap.items():
        methods = sorted({a for a, _ in cells})
        lines += [
            f"### target L0 {target:g}",
            "",
            "| | " + " | ".join(methods) + " |",
            "|" + "---|" * (len(methods) + 1),
        ]
        for a in methods:
            row = [f"{cells[(a, b)]:.3f}" if (a, b) in cells else "" for b in methods]
            lines.append(f"| {a} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def _value_ci(row: dict[str, Any], metric: str, digits: int = 4) -> str:
    if not is_number(row.get(metric)):
        return ""
    ci = row.get(f"{metric}_ci")
    return f"{row[metric]:.{digits}g} ± {ci:.2g}" if is_number(ci) else f"{row[metric]:.{digits}g}"


def _versus(row: dict[str, Any], metric: str) -> str:
    if row.get(f"{metric}_best"):
        return "**best**"
    if not is_number(row.get(f"{metric}_vs_best")):
        return ""
    p = row.get(f"{metric}_p")
    return (
        f"{row[f'{metric}_vs_best']:+.3g} (p {p:.2g})" if is_number(p) else f"{row[f'{metric}_vs_best']:+.3g}"
    )


def comparison_markdown(table: list[dict[str, Any]], seeds: int) -> str:
    """methods_at_l0.md: per target L0, every method's values and how it stands against the best."""
    lines = [
        "# Methods at equal L0",
        "",
        f"Each method trained to each target L0 (`target_l0`), {seeds} seeds. Values: mean ± half-width "
        f"of the {CONFIDENCE:.0%} t confidence interval over seeds. `vs best`: the mean difference to "
        "the best method at that L0 and the two-sided paired t-test over seeds (p); with 3 seeds a "
        "p below 0.05 needs a consistent difference. `test/l0`: the L0 each method reached.",
        "",
    ]
    header = ["method", "n", *COMPARED[:3], f"{ERROR_AXIS} vs best", f"{PROBE} vs best", SPARSITY_AXIS]
    for target in sorted({r["target_l0"] for r in table}):
        lines += [
            f"## target L0 {target:g}",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for r in (r for r in table if r["target_l0"] == target):
            cells = [
                r["method"],
                str(r["n"]),
                *(_value_ci(r, m) for m in COMPARED[:3]),
                _versus(r, ERROR_AXIS),
                _versus(r, PROBE),
                _value_ci(r, SPARSITY_AXIS, digits=3),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


CSV_COLUMNS = (
    "target_l0",
    "method",
    "n",
    *(c for m in COMPARED for c in (m, f"{m}_ci")),
    *(c for m in RANKED_ON for c in (f"{m}_best", f"{m}_vs_best", f"{m}_p")),
)
