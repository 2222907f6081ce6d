"""Dead hidden units: how many units of each layer never fire, and what changes it.

    python benchmarks/dead_units.py [--epochs 10] [--seeds 0 1] [--out DIR]

Not a speed benchmark: a measured study of the model that docs/dead_units.md quotes. Each variant
is the default `python train.py` run (10 epochs, 55k training images) with one change; the table
gives, per variant and seed, the fraction of units never active on the 10k test images in each
hidden layer (the run's `test/encoder_1/dead_fraction`, `test/decoder_1/dead_fraction` and
latent `test/dead_fraction`), test MSE, L0, and how the first layer's dead fraction grew over the
epochs (`val/encoder_1/dead_fraction` after epochs 1, 2 and the last).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "default (relu, lr 1e-3)": [],
    "lr 3e-4": ["lr=3e-4"],
    "no penalty (beta 0)": ["beta=0"],
    "leaky_relu hidden": ["model.activation=leaky_relu"],
    "gelu hidden": ["model.activation=gelu"],
}
QUIET = [
    "accelerator=cpu",
    "logger=csv",
    "~callbacks.linear_probe",
    "~callbacks.run_figures",
    "~callbacks.epoch_visuals",
    "~callbacks.hparams_summary",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]


def run(name: str, overrides: list[str], seed: int, epochs: int, out: Path) -> dict:
    folder = out / f"{name.split()[0]}-{abs(hash(name)) % 10000}-seed{seed}"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *QUIET,
        *overrides,
        f"seed={seed}",
        f"epochs={epochs}",
        f"hydra.run.dir={folder}",
    ]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    metrics = json.loads((folder / "metrics.json").read_text())
    with open(folder / "csv" / "metrics.csv") as f:
        per_epoch = [
            float(r["val/encoder_1/dead_fraction"])
            for r in csv.DictReader(f)
            if r.get("val/encoder_1/dead_fraction")
        ]
    return {"metrics": metrics, "per_epoch": per_epoch}


def dead_at_initialisation(seed: int) -> int:
    """First-layer units never active on the 60k training images with the seed's initial weights."""
    import torch

    sys.path.insert(0, str(ROOT))
    from sae.data.mnist import MNISTDataModule
    from sae.training.module import SparseAutoencoderModule

    data = MNISTDataModule(root=os.environ.get("SAE_DATA_DIR", "data"), download=False, val_size=0)
    data.prepare_data()
    data.setup("fit")
    torch.manual_seed(seed)
    module = SparseAutoencoderModule()
    with torch.no_grad():
        hidden = module.net.encoder[0](data.split("train")[0])
    return int((hidden.amax(dim=0) == 0).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=None, help="keep the run folders here")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="dead_units-"))
    for seed in args.seeds:
        print(f"seed {seed}: {dead_at_initialisation(seed)}/128 first-layer units dead at initialisation")
    print(
        "| variant | seed | encoder_1 dead | decoder_1 dead | latent dead | test MSE | L0 "
        "| encoder_1 dead after epoch 1, 2, last |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, overrides in VARIANTS.items():
        for seed in args.seeds:
            result = run(name, overrides, seed, args.epochs, out)
            m, trail = result["metrics"], result["per_epoch"]
            shown = [trail[0], trail[1], trail[-1]] if len(trail) > 2 else trail
            cells = [
                name,
                seed,
                f"{m['test/encoder_1/dead_fraction'] * 128:.0f}/128",
                f"{m['test/decoder_1/dead_fraction'] * 128:.0f}/128",
                f"{m['test/dead_fraction'] * 32:.0f}/32",
                f"{m['test/mse']:.5f}",
                f"{m['test/l0']:.2f}",
                ", ".join(f"{v * 128:.0f}" for v in shown),
            ]
            print(
                "| " + " | ".join(map(str, cells)) + " |",
                flush=True,
            )


if __name__ == "__main__":
    main()
