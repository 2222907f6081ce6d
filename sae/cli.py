"""What an entry script (train.py, evaluate.py) does first, for its whole process: nothing of this
happens on `import sae`, so a notebook or a test that imports the package keeps its own settings.

Light on purpose: it runs before torch is imported, which is when OpenMP reads its settings.
"""

from __future__ import annotations

import os

# OpenMP, which runs torch's CPU ops on several threads, keeps an idle worker thread spinning for
# a while before it sleeps (libgomp: 300k spins). When other processes hold the cores, that
# spinning takes turns from the threads doing the work, and training slows many times over at
# random (docs/performance.md, "A busy CPU"). A short spin costs nothing measurable on an idle
# machine.
SHORT_SPIN = "1000"


def start_process() -> None:
    """Set the thread environment and the config resolvers an entry script's process needs.

    Before any import of torch: OpenMP reads GOMP_SPINCOUNT when torch loads it (child processes,
    the hand-off worker, joblib, submitit and SLURM jobs, inherit it). A setting of the user's own
    (GOMP_SPINCOUNT or OMP_WAIT_POLICY) is left as it is.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SHORT_SPIN)
    from sae.names import register_resolvers

    register_resolvers()
