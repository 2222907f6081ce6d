"""A callback for benchmarks/epoch_time.py: prints the wall clock at the first training step, then exits.

Added to a real `python train.py` run from the command line
(`+callbacks.first_step._target_=benchmarks.first_step.FirstStepClock`), so everything before the
first step (interpreter, imports, config composition, data setup) is what it measures.
"""

import os
import sys
import time

import lightning as L


class FirstStepClock(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        print(f"FIRST_STEP {time.time():.6f}", flush=True)
        sys.stderr.flush()
        os._exit(0)  # the rest of the run is not what is measured
