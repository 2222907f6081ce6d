"""Bad config values fail before any data is read or a model is built, with one line naming them."""

import subprocess
import sys

import pytest

from sae.config import ConfigError, validate_train_config
from tests.conftest import ROOT, compose_train
from train import train

BAD = [
    ("rho=1.5", "rho=1.5 must be a number in (0, 1)"),
    ("rho=0", "rho=0 must be a number in (0, 1)"),
    ("rho=abc", "rho='abc' must be a number in (0, 1)"),
    ("beta=-1e-3", "beta=-0.001 must be a number >= 0"),
    ("lr=0", "lr=0 must be a number > 0"),
    ("latent_dim=0", "latent_dim=0 must be an integer >= 1"),
    ("epochs=2.5", "epochs=2.5 must be an integer >= 1"),
    ("batch_size=-3", "batch_size=-3 must be an integer >= 1"),
    ("data.val_size=60000", "data.val_size=60000 must be an integer in [0, 60000)"),
    ("model.recon_loss=mae", "model.recon_loss='mae' must be one of mse, bce"),
    ("model.activation=swish", "model.activation='swish' must be one of relu, sigmoid"),
    ("model.hidden_dims=[128,0]", "model.hidden_dims=[128, 0] must be integers >= 1"),
    ("seed=abc", "seed='abc' must be an integer (or null)"),
    ("model.l0_threshold=2", "model.l0_threshold=2 must be a number in [0, 1]"),
    ("data.eval_batch_size=0", "data.eval_batch_size=0 must be an integer >= 1"),
    ("data.num_workers=-1", "data.num_workers=-1 must be an integer >= 0"),
    ("data.split_seed=1.5", "data.split_seed=1.5 must be an integer"),
    ("model.hidden_dims=128", "model.hidden_dims=128 must be a list, e.g. [128]"),
    ("model.sparsity_layers=latent", "model.sparsity_layers='latent' must be a list, e.g. [latent]"),
    ("model.sparsity_layers=[encoder_2]", "encoder_2 not in this model's layers encoder_1, latent"),
    ("data.batches_per_step=0", "data.batches_per_step=0 must be an integer >= 1"),
    ("threads=0", "threads=0 must be an integer >= 1 (or null)"),
    ("+trainer.strategy=ddp", "data.batches_per_step=16 with trainer.strategy=ddp: DDP averages"),
    ("+trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val=1.0 is not supported: the module steps"),
    ("+trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches=2 is not supported"),
]


def test_defaults_and_presets_are_valid(mnist_root, tmp_path):
    for overrides in ([], ["experiment=seed_notebook"], ["experiment=all_layers"], ["debug=limit"]):
        validate_train_config(compose_train(overrides, tmp_path, mnist_root))


@pytest.mark.parametrize("override, message", BAD, ids=[b[0] for b in BAD])
def test_invalid_value_fails_before_data_is_read(tmp_path, override, message):
    # A data root that does not exist: the config error must come first.
    cfg = compose_train([override], tmp_path / "run", tmp_path / "no-data")
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing written


def train_cli_error(tmp_path, override: str) -> str:
    """What `python train.py <override>` prints to stderr; it must exit 1."""
    command = [sys.executable, str(ROOT / "train.py"), override, f"hydra.run.dir={tmp_path}/out"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    return proc.stderr.strip()


def test_cli_config_error_is_one_line(tmp_path):
    assert train_cli_error(tmp_path, "rho=1.5") == "config error: rho=1.5 must be a number in (0, 1)"


def test_cli_unknown_trainer_argument_is_one_line(tmp_path):
    lines = train_cli_error(tmp_path, "+trainer.max_epoch=3").splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: ")
    assert "unexpected keyword argument 'max_epoch'" in lines[0]
