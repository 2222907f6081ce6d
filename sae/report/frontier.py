"""The sparsity/error frontier of a sweep: which settings no other beats on both axes."""

from __future__ import annotations

import math
from typing import Any

from sae.names import ERROR_AXIS, FRONTIER_AXES, SPARSITY_AXIS


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): a metric value that can be ranked, averaged or drawn."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def pareto_front(xs: list[float], ys: list[float]) -> list[int]:
    """Indices of the points not dominated when both coordinates are minimised, sorted by x (a
    point equal to a front point is not dominated by it, so it is on the front too)."""
    order = sorted(range(len(xs)), key=lambda i: (xs[i], ys[i]))
    front, best_y = [], float("inf")
    for i in order:
        if ys[i] < best_y or (front and (xs[i], ys[i]) == (xs[front[-1]], ys[front[-1]])):
            front.append(i)
            best_y = ys[i]
    return front


def frontier_ranks(rows: list[dict[str, Any]], axes: tuple[str, str] = FRONTIER_AXES) -> list[int | None]:
    """Per row, its Pareto rank over `axes` (both minimised): 1 for the rows no other row beats on
    both, 2 for those only rank-1 rows beat, and so on; None for a row without both values."""
    ranks: list[int | None] = [None] * len(rows)
    left = [i for i, r in enumerate(rows) if all(is_number(r.get(a)) for a in axes)]
    rank = 1
    while left:
        xs, ys = ([float(rows[i][a]) for i in left] for a in axes)
        front = {left[j] for j in pareto_front(xs, ys)}
        for i in front:
            ranks[i] = rank
        left = [i for i in left if i not in front]
        rank += 1
    return ranks


def frontier_axes(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(L0, the truncated code's test MSE), or (L0, test MSE) for jobs that predate the latter."""
    if any(ERROR_AXIS in row for row in rows):
        return FRONTIER_AXES
    return (SPARSITY_AXIS, "test/mse")
