"""Bad config values fail before any data is read or a model is built, with one line naming them."""

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from sae.config import MIRRORS, RENAMED, ConfigError, validate_train_config
from sae.training.fit import train
from tests.conftest import ROOT, compose_config, compose_train, run_script

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
    ("seed=abc", "seed='abc' must be an integer in [0, 4294967295]"),
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
    (
        "model.sparsity.rho=1.5",
        "model.sparsity.rho=1.5: model.sparsity.rho follows the top-level knob rho, so set rho=1.5 instead",
    ),
    (
        "model.sparsity.beta=-1",
        "model.sparsity.beta=-1: model.sparsity.beta follows the top-level knob beta, so set beta=-1 instead",
    ),
    ("model.lr=0.01", "model.lr=0.01: model.lr follows the top-level knob lr, so set lr=0.01 instead"),
    ("model.latent_dim=64", "model.latent_dim=64: model.latent_dim follows the top-level knob latent_dim"),
    ("data.seed=3", "data.seed=3: data.seed follows the top-level knob seed, so set seed=3 instead"),
    ("data.batch_size=64", "data.batch_size=64: data.batch_size follows the top-level knob batch_size"),
    ("trainer.max_epochs=3", "trainer.max_epochs=3: trainer.max_epochs follows the top-level knob epochs"),
    ("data.batches_per_step=4", "data.batches_per_step was renamed data.batches_per_call: set data.batch"),
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1: trainer.max_epochs follows the top-level knob epochs"),
    # Values the libraries or the training precision cannot take, refused before anything runs.
    ("seed=-1", "seed=-1 must be an integer in [0, 4294967295]"),
    ("seed=4294967296", "seed=4294967296 must be an integer in [0, 4294967295]"),
    # A run's batch order comes from its seed (null made the sampler fail mid-epoch).
    ("seed=null", "seed=None must be an integer in [0, 4294967295]"),
    ("lr=1e300", "lr=1e+300 must be a number in (0, 3.4e+37]"),
    ("lr=3e38", "lr=3e+38 must be a number in (0, 3.4e+37]"),
    ("beta=1e39", "beta=1e+39 must be a number in [0, 3.4e+38]"),
    ("latent_dim=10000000", "latent_dim=10000000 (hidden_dims=[128]) needs about"),
    # Each of these ended in a traceback, or trained on something meaningless.
    ("model.input_dim=100", "model.input_dim=100 must be 784: MNIST images have 28x28 pixels"),
    ("model.sparsity_layers=[]", "model.sparsity_layers=[] must be a list of layer names, e.g. [latent]"),
    ("data.root=123", "data.root=123 must be a folder path (quote one that reads as a number"),
    ("trainer.log_every_n_steps=abc", "trainer.log_every_n_steps='abc' must be an integer >= 0"),
    ("+trainer.limit_test_batches=0", "trainer.limit_test_batches=0 must be an integer >= 1 (batches) or a"),
    ("+trainer.limit_val_batches=-1", "trainer.limit_val_batches=-1 must be an integer >= 0 (batches)"),
    ("trainer.precision=64-true", "trainer.precision='64-true' must be one of 32-true, 32, 16-mixed, bf16"),
    ("trainer.deterministic=maybe", "trainer.deterministic='maybe' must be true, false or warn"),
    ("trainer.devices=3", "data.batches_per_call=16 with trainer.devices=3 (a process each): DDP"),
    ("trainer.max_epochs=null", "trainer.max_epochs=None: trainer.max_epochs follows the top-level knob"),
    (
        "+trainer.max_epoch=3",
        "trainer.max_epoch is not an argument of Lightning's Trainer; did you mean max_epochs?",
    ),
    ("+bta=0.1", "bta is not a setting of train.py; did you mean beta?"),
    (
        "optimized_metric=test/loss",
        "optimized_metric='test/loss' must be a validation metric (val/loss, val/mse, ...) or null: a "
        "sweeper selects on the validation split, never on the test split it reports",
    ),
    ("+model.rhoo=0.1", "model.rhoo is not a setting of the model"),
    ("+model.sparsity.rhoo=0.1", "model.sparsity.rhoo=0.1 must be absent: kl's settings are rho, beta"),
    ("+data.seeed=1", "data.seeed is not a setting of the data; did you mean seed?"),
    (
        "model._target_=builtins.print",
        "model._target_='builtins.print': the model is sae.training.module.SparseAutoencoderModule",
    ),
]
if torch.cuda.device_count() == 0:
    BAD.append(("accelerator=gpu", "trainer.accelerator=gpu but torch sees no GPU: use accelerator=cpu"))


def test_defaults_and_presets_are_valid(mnist_root, tmp_path):
    presets = (
        [],
        ["experiment=seed_notebook"],
        ["experiment=all_layers"],
        ["debug=limit"],
        ["callbacks=none"],
    )
    for overrides in (
        *presets,
        ["logger=none"],
        ["sparsity=topk", "model.sparsity.auxk=true"],
        ["sparsity=l1"],
    ):
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

    def walk(node: dict, prefix: str) -> None:
        for key, raw in node.items():
            if isinstance(raw, dict):
                walk(raw, f"{prefix}{key}.")
            elif isinstance(raw, str) and raw.startswith("${") and raw[2:-1] in knobs:
                found[f"{prefix}{key}"] = raw[2:-1]

    for group in ("model", "data", "trainer"):
        walk(OmegaConf.to_container(cfg[group], resolve=False), f"{group}.")
    return found


def test_every_copy_of_a_knob_is_declared_and_follows_it(mnist_root, tmp_path):
    """sae.config.MIRRORS is the YAML's list, so no copy escapes the one-spelling check."""
    found = {}
    for method in sorted(p.stem for p in (ROOT / "conf" / "sparsity").glob("*.yaml")):
        found |= top_level_interpolations(compose_train([f"sparsity={method}"], tmp_path, mnist_root))
    assert found == MIRRORS
    # The records read the knob: what the model and data module receive is the knob's value.
    cfg = compose_train(["rho=0.1", "beta=0.02", "lr=3e-3", "seed=4", "epochs=3"], tmp_path, mnist_root)
    assert (cfg.model.sparsity.rho, cfg.model.sparsity.beta, cfg.model.lr) == (0.1, 0.02, 3e-3)
    assert (cfg.data.seed, cfg.trainer.max_epochs) == (4, 3)
    assert cfg.callbacks.hparams_summary.params.rho == 0.1
    for old in RENAMED:
        assert OmegaConf.select(cfg, old) is None  # kept only to name its new spelling


@pytest.mark.parametrize(
    ("metric", "direction"),
    [("val/loss", "minimize"), ("val/mse", "minimize"), ("val/probe_accuracy", "maximize")],
)
def test_the_optuna_study_direction_follows_the_metric(metric, direction):
    """The preset writes no direction of its own: accuracy is maximised, errors minimised."""
    from sae.names import register_resolvers

    register_resolvers()  # as train.py does before Hydra composes

    cfg = compose_config(
        "train", ["hparams_search=optuna", f"optimized_metric={metric}"], return_hydra_config=True
    )
    assert cfg.hydra.sweeper.direction == direction


def test_evaluate_config_needs_no_training_knobs():
    cfg = compose_config("evaluate", ["output_dir=out"])
    assert not {"seed", "batch_size", "rho", "beta", "lr"} & set(cfg)
    OmegaConf.resolve(cfg)  # every interpolation resolves without them
    assert (cfg.data.seed, cfg.data.batch_size) == (None, None)  # the checkpoint's, at evaluation


BAD_EVALUATE = [
    ("threads=abc", "threads='abc' must be an integer >= 1 (or null)"),
    ("data.eval_batch_size=-1", "data.eval_batch_size=-1 must be an integer >= 1"),
    (
        "trainer.precision=64-true",
        "trainer.precision='64-true' must be one of 32-true, 32, 16-mixed, bf16-mixed",
    ),
    ("+trainer.limit_test_batches=0", "trainer.limit_test_batches=0 must be an integer >= 1 (batches)"),
    ("data.root=123", "data.root=123 must be a folder path"),
    ("+bta=1", "bta is not a setting of evaluate.py"),
    ("+data.seeed=1", "data.seeed is not a setting of the data; did you mean seed?"),
    ("callbacks.linear_probe.max_iter=abc", "callbacks.linear_probe.max_iter='abc' must be an integer >= 1"),
]


@pytest.mark.parametrize("override, message", BAD_EVALUATE, ids=[b[0] for b in BAD_EVALUATE])
def test_evaluate_checks_its_config_before_reading_anything(tmp_path, override, message):
    from sae.training.evaluate import evaluate

    cfg = compose_config(
        "evaluate", [f"ckpt_path={tmp_path / 'missing.ckpt'}", f"output_dir={tmp_path / 'e'}", override]
    )
    with pytest.raises(ConfigError) as err:
        evaluate(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "e").exists()


def train_cli_error(tmp_path, override: str) -> str:
    """What `python train.py <override>` prints to stderr; it must exit 1."""
    proc = run_script("train.py", override, f"hydra.run.dir={tmp_path}/out", timeout=120)
    assert proc.returncode == 1
    return proc.stderr.strip()


@pytest.mark.slow
def test_cli_config_error_is_one_line(tmp_path):
    # One command: every other refusal takes the same path to the console (tested in-process above).
    assert train_cli_error(tmp_path, "rho=1.5") == "config error: rho=1.5 must be a number in (0, 1)"


def test_a_refused_command_leaves_nothing_behind(tmp_path):
    """A config error removes the run folder Hydra made for the command (and the parents made
    with it), and writes nothing into a folder that was there before."""
    proc = run_script("train.py", "rho=1.5", f"hydra.run.dir={tmp_path}/outputs/day/time", timeout=120)
    assert (proc.returncode, proc.stderr.strip()) == (1, "config error: rho=1.5 must be a number in (0, 1)")
    assert list(tmp_path.iterdir()) == []

    earlier = tmp_path / "earlier"  # another run's folder
    earlier.mkdir()
    (earlier / "status.json").write_text('{"status": "ok", "error": ""}')
    proc = run_script("train.py", "rho=1.5", f"hydra.run.dir={earlier}", timeout=120)
    assert proc.returncode == 1 and earlier.is_dir()
    assert (earlier / "status.json").read_text() == '{"status": "ok", "error": ""}'


def test_trainer_arguments_are_the_installed_lightnings():
    """sae.config lists the Trainer's arguments so that a config is checked without importing
    Lightning: a Lightning release that adds or drops one fails here, not in a user's run."""
    import inspect

    from lightning.pytorch import Trainer

    from sae.config import TRAINER_ARGUMENTS

    assert list(TRAINER_ARGUMENTS) == [n for n in inspect.signature(Trainer).parameters if n != "self"]


CHECK_WITHOUT_LIBRARIES = """
import sys
from sae.config import ConfigError, compose_train_config, validate_train_config
for overrides in (["beta=-1"], ["sparsity=topk", "k=0"], ["+trainer.max_epoch=3"], ["lr=0"]):
    try:
        validate_train_config(compose_train_config(overrides))
    except ConfigError as err:
        print(err)
heavy = [m for m in ("torch", "lightning", "torchvision", "torchmetrics", "matplotlib") if m in sys.modules]
print("imported:", heavy)
"""


def test_a_config_is_checked_without_torch_or_lightning():
    """What makes a config error answer at once: sae.config (and what it reads of the model and
    the methods, sae.core.settings) imports none of torch, Lightning, torchvision or matplotlib."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", CHECK_WITHOUT_LIBRARIES], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "beta=-1 must be a number in [0, 3.4e+38]",
        "k=0 must be an integer in [1, latent_dim=32]: units kept per input",
        "trainer.max_epoch is not an argument of Lightning's Trainer; did you mean max_epochs?",
        "lr=0 must be a number in (0, 3.4e+37]",
        "imported: []",
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, line",
    [
        ("bta=0.1", "config error: bta is not a setting of train.py; did you mean beta?"),
        (
            "model.activaton=relu",
            "config error: model.activaton is not a setting of train.py; did you mean model.activation?",
        ),
        (
            "sparsity=topc",
            "config error: sparsity=topc: no such option; sparsity is one of batchtopk, jumprelu, kl, "
            "l1, topk, wta; did you mean topk?",
        ),
        (
            "trainer.max_time=00:01:00:00",
            "config error: trainer.max_time is not set in conf/train.yaml: add it with +trainer.max_time=...",
        ),
        (
            "seed=[1,",
            "config error: cannot read the override 'seed=[1,': no viable alternative at input '[1,'",
        ),
    ],
    ids=["knob_typo", "group_key_typo", "group_option", "lightning_argument", "malformed"],
)
def test_cli_a_command_hydra_cannot_compose_is_one_line(tmp_path, override, line):
    """Hydra's own report of these is several lines (and a hint to set HYDRA_FULL_ERROR)."""
    assert train_cli_error(tmp_path, override) == line
    assert not (tmp_path / "out").exists()


def test_the_memory_a_run_needs_is_refused_before_it_trains(monkeypatch, tmp_path):
    """A wide code fits the weights but not the probe (float32 codes of the training split and three
    float64 copies): refused up front on a 24 GiB machine, not killed by the kernel after training."""
    from sae import config

    monkeypatch.setattr(config, "_memory_bytes", lambda: 24 * 2**30)
    cfg = compose_train(["latent_dim=20000"], tmp_path, tmp_path)
    with pytest.raises(
        ConfigError, match=r"latent_dim=20000 \(hidden_dims=\[128\]\) needs about 3\d\.\d GiB"
    ):
        config.check_memory(cfg)
    config.check_memory(compose_train(["latent_dim=20000", "~callbacks.linear_probe"], tmp_path, tmp_path))
    config.check_memory(compose_train(["latent_dim=4096"], tmp_path, tmp_path))


PROBE_PEAK = """
from pathlib import Path
import torch
from sae.report.probe import fit_linear_classifier

def status(key):  # bytes, from Linux's record of this process
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
    return int(line.split()[1]) * 1024

def peak(n, width):  # what a fit adds to the process at its largest, its codes already there
    codes, labels = torch.rand(n, width), torch.randint(0, 10, (n,))
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    before = status("VmRSS:")
    fit_linear_classifier(codes, labels, max_iter=5)
    return status("VmHWM:") - before

peak(2000, 64)  # first use: the libraries' own buffers
print(peak(20000, 512), peak(20000, 1024))
"""


def test_the_probe_needs_no_more_than_the_memory_check_counts():
    """The probe's fit, measured in a fresh process at two code widths: what a unit of width adds
    to its peak, per training image, is within what the memory check counts for it (the float32
    codes' own 4 bytes aside)."""
    import subprocess
    import sys

    from sae.config import PROBE_BYTES_PER_TRAIN_CODE
    from tests.conftest import ROOT

    proc = subprocess.run(
        [sys.executable, "-c", PROBE_PEAK], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    narrow, wide = map(int, proc.stdout.split())
    per_code = (wide - narrow) / (20000 * 512)
    assert 16 <= per_code <= PROBE_BYTES_PER_TRAIN_CODE - 4, per_code
