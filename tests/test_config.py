"""Bad config values fail before any data is read or a model is built, with one line naming them."""

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from sae.config import MIRRORS, RENAMED, ConfigError, validate_train_config
from sae.training import train
from tests.conftest import compose_config, compose_train, run_script

BAD = [
    ("rho=1.5", "rho=1.5 must be a number in (0, 1)"),
    ("rho=0", "rho=0 must be a number in (0, 1)"),
    ("rho=abc", "rho='abc' must be a number in (0, 1)"),
    ("beta=-1e-3", "beta=-0.001 must be a number in [0, 3.4e+38]"),
    ("lr=0", "lr=0 must be a number in (0, 3.4e+37]"),
    ("latent_dim=0", "latent_dim=0 must be an integer >= 1"),
    ("epochs=2.5", "epochs=2.5 must be an integer >= 1"),
    ("batch_size=-3", "batch_size=-3 must be an integer >= 1"),
    ("data.val_size=60000", "data.val_size=60000 must be an integer in [0, 60000)"),
    ("model.recon_loss=mae", "model.recon_loss='mae' must be one of mse, bce"),
    ("model.activation=swish", "model.activation='swish' must be one of relu, leaky_relu, sigmoid"),
    ("model.hidden_dims=[128,0]", "model.hidden_dims=[128, 0] must be a list of integers >= 1"),
    ("seed=abc", "seed='abc' must be an integer in [0, 4294967295] (or null)"),
    ("model.l0_threshold=2", "model.l0_threshold=2 must be a number in [0, 1]"),
    ("model.dense_density=-1", "model.dense_density=-1 must be a number in [0, 1]"),
    ("model.l0_also_at=[0.5,3]", "model.l0_also_at=[0.5, 3] must be a list of numbers in [0, 1]"),
    ("data.eval_batch_size=0", "data.eval_batch_size=0 must be an integer >= 1"),
    ("data.num_workers=-1", "data.num_workers=-1 must be an integer >= 0"),
    ("data.split_seed=1.5", "data.split_seed=1.5 must be an integer"),
    ("model.hidden_dims=128", "model.hidden_dims=128 must be a list of integers >= 1, e.g. [128]"),
    ("model.sparsity_layers=latent", "model.sparsity_layers='latent' must be a list of layer names"),
    ("model.sparsity_layers=[encoder_2]", "encoder_2 not in this model's layers encoder_1, latent"),
    ("data.batches_per_call=0", "data.batches_per_call=0 must be an integer >= 1"),
    ("threads=0", "threads=0 must be an integer >= 1 (or null)"),
    ("+trainer.strategy=ddp", "data.batches_per_call=16 with trainer.strategy=ddp: DDP averages"),
    ("trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val=1.0 is not supported: the module steps"),
    ("trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches=2 is not supported"),
    # One spelling per knob: a group's copy of a top-level knob cannot be set on its own, even to
    # a valid value (the records would show the top-level one), and a renamed key names the new one.
    ("model.rho=1.5", "model.rho=1.5: model.rho follows the top-level knob rho, so set rho=1.5 instead"),
    ("model.beta=-1", "model.beta=-1: model.beta follows the top-level knob beta, so set beta=-1 instead"),
    ("model.lr=0.01", "model.lr=0.01: model.lr follows the top-level knob lr, so set lr=0.01 instead"),
    ("model.latent_dim=64", "model.latent_dim=64: model.latent_dim follows the top-level knob latent_dim"),
    ("data.seed=3", "data.seed=3: data.seed follows the top-level knob seed, so set seed=3 instead"),
    ("data.batch_size=64", "data.batch_size=64: data.batch_size follows the top-level knob batch_size"),
    ("trainer.max_epochs=3", "trainer.max_epochs=3: trainer.max_epochs follows the top-level knob epochs"),
    ("data.batches_per_step=4", "data.batches_per_step was renamed data.batches_per_call: set data.batch"),
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1: trainer.max_epochs follows the top-level knob epochs"),
    # Values the libraries or the training precision cannot take, refused before anything runs.
    ("seed=-1", "seed=-1 must be an integer in [0, 4294967295] (or null)"),
    ("seed=4294967296", "seed=4294967296 must be an integer in [0, 4294967295] (or null)"),
    ("lr=1e300", "lr=1e+300 must be a number in (0, 3.4e+37]"),
    ("lr=3e38", "lr=3e+38 must be a number in (0, 3.4e+37]"),
    ("beta=1e39", "beta=1e+39 must be a number in [0, 3.4e+38]"),
    ("latent_dim=10000000", "latent_dim=10000000 (hidden_dims=[128]) needs about"),
]
if torch.cuda.device_count() == 0:
    BAD.append(("accelerator=gpu", "trainer.accelerator=gpu but torch sees no GPU: use accelerator=cpu"))


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


def top_level_interpolations(cfg: DictConfig) -> dict[str, str]:
    """Every group setting written as `${knob}` of a top-level knob, as dotted key -> knob."""
    knobs = {k for k, v in cfg.items() if not isinstance(v, DictConfig)}
    found = {}
    for group in ("model", "data", "trainer"):
        for key, raw in OmegaConf.to_container(cfg[group], resolve=False).items():
            if isinstance(raw, str) and raw.startswith("${") and raw[2:-1] in knobs:
                found[f"{group}.{key}"] = raw[2:-1]
    return found


def test_every_copy_of_a_knob_is_declared_and_follows_it(mnist_root, tmp_path):
    """sae.config.MIRRORS is the YAML's list, so no copy escapes the one-spelling check."""
    cfg = compose_train([], tmp_path, mnist_root)
    assert top_level_interpolations(cfg) == MIRRORS
    # The records read the knob: what the model and data module receive is the knob's value.
    cfg = compose_train(["rho=0.1", "beta=0.02", "lr=3e-3", "seed=4", "epochs=3"], tmp_path, mnist_root)
    assert (cfg.model.rho, cfg.model.beta, cfg.model.lr) == (0.1, 0.02, 3e-3)
    assert (cfg.data.seed, cfg.trainer.max_epochs) == (4, 3)
    assert cfg.callbacks.hparams_summary.params.rho == 0.1
    for old in RENAMED:
        assert OmegaConf.select(cfg, old) is None  # kept only to name its new spelling


def test_evaluate_config_needs_no_training_knobs():
    cfg = compose_config("evaluate", ["output_dir=out"])
    assert not {"seed", "batch_size", "rho", "beta", "lr"} & set(cfg)
    OmegaConf.resolve(cfg)  # every interpolation resolves without them
    assert (cfg.data.seed, cfg.data.batch_size) == (None, None)  # the checkpoint's, at evaluation


def train_cli_error(tmp_path, override: str) -> str:
    """What `python train.py <override>` prints to stderr; it must exit 1."""
    proc = run_script("train.py", override, f"hydra.run.dir={tmp_path}/out", timeout=120)
    assert proc.returncode == 1
    return proc.stderr.strip()


@pytest.mark.slow
def test_cli_config_error_is_one_line(tmp_path):
    # One command: every other refusal takes the same path to the console (tested in-process above).
    assert train_cli_error(tmp_path, "rho=1.5") == "config error: rho=1.5 must be a number in (0, 1)"


@pytest.mark.slow
def test_cli_unknown_trainer_argument_is_one_line(tmp_path):
    lines = train_cli_error(tmp_path, "+trainer.max_epoch=3").splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: ")
    assert "unexpected keyword argument 'max_epoch'" in lines[0]
