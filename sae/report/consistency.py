"""Are the features real? Whether seeds of one setting find the same dictionary again.

A unit's direction is what it writes in pixel space (decode(unit on) - decode(all off), the
run's `dictionary.npy`): comparable across seeds, unlike the decoder's weights into a hidden layer,
whose basis each seed chooses anew. Two seeds' units are paired one to one by the Hungarian
algorithm (scipy.optimize.linear_sum_assignment) on their cosine similarity; a setting reports the
mean matched cosine and the fraction of units matched above MATCHED_ABOVE, averaged over every
pair of its seeds.
"""

from __future__ import annotations

from itertools import combinations, product
from pathlib import Path

import numpy as np

from sae.errors import UserError
from sae.names import MATCHED_COSINE, MATCHED_FRACTION
from sae.run.record import DICTIONARY_FILE, RunRecord

MATCHED_ABOVE = float(MATCHED_FRACTION.rsplit("_", 1)[1])  # 0.9


def matched_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cosine similarity of each unit of `a` (rows) with its partner in `b` under the one-to-one
    pairing that maximises their sum. A unit that writes nothing (a zero row) matches at 0."""
    from scipy.optimize import linear_sum_assignment

    def unit(rows: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return np.divide(rows, norms, out=np.zeros_like(rows, dtype=np.float64), where=norms > 0)

    cosine = unit(a.astype(np.float64)) @ unit(b.astype(np.float64)).T
    rows, cols = linear_sum_assignment(cosine, maximize=True)
    return cosine[rows, cols]


def seed_consistency(dictionaries: list[np.ndarray]) -> dict[str, float]:
    """Over every pair of seeds' dictionaries: the mean matched cosine and the fraction of units
    matched above MATCHED_ABOVE (each the mean over pairs); {} for fewer than two."""
    return _over_pairs(list(combinations(dictionaries, 2)))


def between_settings(first: list[np.ndarray], second: list[np.ndarray]) -> dict[str, float]:
    """The same between two settings (e.g. two methods at one L0): over every pair of one run of
    each; {} when either has none or their dictionaries differ in shape."""
    return _over_pairs([(a, b) for a, b in product(first, second) if a.shape == b.shape])


def compare_runs(runs: list[Path]) -> str:
    """For `python evaluate.py compare_runs=[...]`: every pair of the runs, how alike their
    dictionaries are, as a Markdown table; a run without a readable dictionary.npy is a UserError
    naming it."""
    dictionaries = []
    for run in runs:
        dictionary = RunRecord(run).dictionary()
        if dictionary is None:
            raise UserError(
                f"{run} has no readable {DICTIONARY_FILE}: pass run folders (runs write it since 2026-12-04)"
            )
        dictionaries.append(dictionary)
    lines = ["| run | run | matched cosine | matched above 0.9 |", "|---|---|---|---|"]
    for (i, a), (j, b) in combinations(enumerate(dictionaries), 2):
        if a.shape != b.shape:
            raise UserError(
                f"{runs[i]} and {runs[j]} have dictionaries of shapes {a.shape} and {b.shape}: "
                "compare runs of one latent width"
            )
        matched = between_settings([a], [b])
        lines.append(
            f"| {runs[i]} | {runs[j]} | {matched[MATCHED_COSINE]:.3f} | {matched[MATCHED_FRACTION]:.3f} |"
        )
    return "\n".join(lines)


def _over_pairs(pairs_of_dictionaries: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    pairs = [matched_cosines(a, b) for a, b in pairs_of_dictionaries]
    if not pairs:
        return {}
    return {
        MATCHED_COSINE: float(np.mean([p.mean() for p in pairs])),
        MATCHED_FRACTION: float(np.mean([(p > MATCHED_ABOVE).mean() for p in pairs])),
    }
