"""Test a checkpoint, or summarise a sweep folder.

    python evaluate.py ckpt_path=PATH [data.root=...]   test metrics, figures, metrics.json
    python evaluate.py sweep_dir=PATH                    summary.csv, summary.md, pareto.png

The work is in sae.evaluation; this wrapper composes the config and reports errors in one line.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from sae.console import run_command
from sae.evaluation import evaluate, summarise


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    if cfg.sweep_dir:
        run_command(lambda: summarise(cfg.sweep_dir))
    elif cfg.ckpt_path:
        run_command(lambda: evaluate(cfg))
    else:
        sys.exit("error: pass ckpt_path=<run>/checkpoints/<name>.ckpt or sweep_dir=<multirun folder>")


if __name__ == "__main__":
    main()
