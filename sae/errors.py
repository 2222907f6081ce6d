"""Errors a researcher can fix, said in one line: the base of every package (imports nothing of sae).

An error the researcher can fix (a bad config value, missing data, a foreign checkpoint, a run
that diverged) is a `UserError`: the entry scripts print its message as one line, without a
traceback, and exit non-zero. In a sweep the job prints the same line and fails alone
(`JobFailed`); the sweep goes on with the others and ends with a count of the failed jobs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class UserError(Exception):
    """An error whose message names the key, value or file at fault and the fix."""

    kind = "error"  # the word the one-line report starts with


class CheckpointError(UserError, RuntimeError):
    """A checkpoint path that is missing, unreadable, or not one of this project's checkpoints."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """ "; did you mean X?" for the known name nearest to name, or ""."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def one_line(err: BaseException, limit: int = 200) -> str:
    """An exception's message folded onto one line, for errors reported without a traceback."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class JobFailed:
    """What a sweep job whose error the user can fix returns instead of raising: the sweep goes on,
    sae.report.summary marks the job failed with `error`, and the sweep ends with a count of failures."""

    error: str

    def __str__(self) -> str:  # what a sweeper that expects a number (Optuna) reports
        return f"failed: {self.error}"
