"""Everything read from a file is input: a checkpoint's values and a run's record of its command are
checked by the rules of the settings they fill, never handed to Hydra's instantiate, and a
malformed file is refused in one line naming it, through every entry point."""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sae.errors import UserError
from sae.training.checkpoints import CheckpointError
from sae.training.evaluate import evaluate
from sae.training.fit import train
from sae.training.resume import RunRecordError
from tests.conftest import LEAN, QUICK_RUN, ROOT, compose_config, compose_train, evaluate_config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, mnist_root) -> Path:
    """A finished one-epoch run whose files each test copies and alters."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(compose_train([*LEAN, "debug=limit", "epochs=1"], run, mnist_root))
    return run


def code_call(marker: Path) -> dict:
    """What Hydra's instantiate would call: open(marker, "w"), which creates the file."""
    return {"_target_": "builtins.open", "file": str(marker), "mode": "w"}


def test_the_crafted_value_is_code_to_hydra(tmp_path):
    """The control: instantiate does run such a mapping, so the tests below can fail."""
    from hydra.utils import instantiate

    marker = tmp_path / "ran"
    instantiate(code_call(marker)).close()
    assert marker.exists()


def _set(ckpt: dict, where: tuple[str, ...], value) -> None:
    node = ckpt
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value


# Where a crafted value goes, and how it is wrapped (nested in a list or in a mapping, or as an
# interpolation that would decode into a mapping).
CRAFTED = {
    "data_seed": (("datamodule_hyper_parameters", "seed"), lambda call: call),
    "data_batch_size": (("datamodule_hyper_parameters", "batch_size"), lambda call: call),
    "data_root": (("datamodule_hyper_parameters", "root"), lambda call: call),
    "model_rho": (("hyper_parameters", "sparsity", "rho"), lambda call: call),
    "model_sparsity": (("hyper_parameters", "sparsity"), lambda call: call),
    "model_hidden_dims_nested": (("hyper_parameters", "hidden_dims"), lambda call: [call]),
    "model_l0_also_at_nested": (("hyper_parameters", "l0_also_at"), lambda call: {"x": call}),
    "model_activation_interpolation": (
        ("hyper_parameters", "activation"),
        lambda call: "${oc.decode:'" + yaml.safe_dump(call, default_flow_style=True).strip() + "'}",
    ),
    "epochs": (("epochs",), lambda call: call),
}
KEY_NAMED = {
    "data_seed": "datamodule_hyper_parameters.seed",
    "data_batch_size": "datamodule_hyper_parameters.batch_size",
    "data_root": "datamodule_hyper_parameters.root",
    "model_rho": "hyper_parameters.sparsity.rho",
    "model_sparsity": "hyper_parameters.sparsity",
    "model_hidden_dims_nested": "hyper_parameters.hidden_dims",
    "model_l0_also_at_nested": "hyper_parameters.l0_also_at",
    "model_activation_interpolation": "hyper_parameters.activation",
    "epochs": "epochs",
}


def crafted_run(trained_run: Path, tmp_path: Path, field: str, marker: Path) -> Path:
    """A copy of the trained run whose checkpoints carry a crafted value in `field`."""
    run = tmp_path / "crafted"
    shutil.copytree(trained_run, run)
    where, wrap = CRAFTED[field]
    for path in (run / "checkpoints").glob("*.ckpt"):
        ckpt = torch.load(path, weights_only=True)
        _set(ckpt, where, wrap(code_call(marker)))
        torch.save(ckpt, path)
    return run


def compose_command(overrides: list[str], output_dir: Path, data_root: Path):
    """The config of `python train.py <quick settings> <overrides>`, with Hydra's record of the
    command's overrides (what resume= replays the run's own record with)."""
    where = [f"data.root={data_root}", f"output_dir={output_dir}"]
    return compose_config("train", [*QUICK_RUN, *where, *overrides], return_hydra_config=True)


def entry_point(entry: str, run: Path, tmp_path: Path, data_root: Path):
    """The config each entry point runs for `run`'s checkpoint, and the function it calls."""
    ckpt = run / "checkpoints" / "last.ckpt"
    if entry == "evaluate":
        return evaluate, evaluate_config(ckpt, data_root, tmp_path / "eval", "logger=none")
    if entry == "resume":
        return train, compose_command([*LEAN, f"resume={run}"], tmp_path / "cmd", data_root)
    return train, compose_train([*LEAN, "debug=limit", f"ckpt_path={ckpt}"], tmp_path / "new", data_root)


@pytest.mark.parametrize("entry", ["evaluate", "resume", "ckpt_path"])
@pytest.mark.parametrize("field", list(CRAFTED))
def test_a_crafted_checkpoint_value_is_refused_naming_the_file_and_key(
    trained_run, mnist_root, tmp_path, entry, field
):
    marker = tmp_path / "code-ran"
    run = crafted_run(trained_run, tmp_path, field, marker)
    command, cfg = entry_point(entry, run, tmp_path, mnist_root)
    with pytest.raises(CheckpointError) as err:
        command(cfg)
    message = str(err.value)
    assert "\n" not in message and str(run / "checkpoints") in message
    assert f"{KEY_NAMED[field]}=" in message, message
    assert not marker.exists()


def record_command(run: Path, overrides: list[str]) -> None:
    """Write what Hydra records of the command that started a run (in-process runs write none)."""
    (run / ".hydra").mkdir(exist_ok=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))


def crafted_records(marker: Path) -> dict[str, object]:
    call = "{_target_:builtins.open,file:'" + str(marker) + "',mode:w}"
    return {
        "added_mapping": ["debug=limit", f"+trainer.plugins=[{call}]"],
        "mapping_value": [f"seed={call}"],
        "nested_mapping": [f"model.hidden_dims=[{call}]"],
        "decoded_interpolation": ['seed="${oc.decode:' + call.replace("'", "") + '}"'],
        "target_key": ["model._target_=builtins.print"],
        "hydra_key": ["hydra.job.chdir=true"],
        "sweep": ["beta=1e-3,5e-3"],
        "not_a_list": {"seed": 1},
        "unparsable": ["seed=[1,"],
    }


@pytest.mark.parametrize("case", list(crafted_records(Path("m"))))
def test_a_crafted_record_of_the_runs_command_is_refused(trained_run, mnist_root, tmp_path, case):
    marker = tmp_path / "code-ran"
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    record_command(run, crafted_records(marker)[case])
    cfg = compose_command([*LEAN, f"resume={run}"], tmp_path / "cmd", mnist_root)
    with pytest.raises(RunRecordError) as err:
        train(cfg)
    assert str(run / ".hydra" / "overrides.yaml") in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


# Checkpoints broken in ways a crash, a bad copy or an older/other program leaves them; each is
# one line at every entry point that reads that part (evaluate.py reads only the weights).
def _first_checkpoint_callback(ckpt: dict) -> dict:
    return next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))


MALFORMED = {
    "missing_weight": (
        lambda c: c["state_dict"].pop("net.encoder.0.0.weight"),
        "missing net.encoder.0.0.weight",
    ),
    "weight_shape": (
        lambda c: c["state_dict"].__setitem__("net.encoder.0.0.weight", torch.zeros(3, 3)),
        "state_dict.net.encoder.0.0.weight is (3, 3)",
    ),
    "weight_not_a_tensor": (
        lambda c: c["state_dict"].__setitem__("net.encoder.0.0.weight", 5),
        "state_dict.net.encoder.0.0.weight is int",
    ),
    "hyper_parameters_list": (
        lambda c: c.__setitem__("hyper_parameters", [1, 2]),
        "hyper_parameters is a list, not a mapping",
    ),
    "unknown_hyperparameter": (
        lambda c: c["hyper_parameters"].__setitem__("lrr", 0.1),
        "hyper_parameters.lrr is not a setting of the model; did you mean lr?",
    ),
    "unknown_method_setting": (
        lambda c: c["hyper_parameters"]["sparsity"].__setitem__("bta", 0.1),
        "hyper_parameters.sparsity.bta=0.1 must be absent: kl's settings are rho, beta",
    ),
    "no_loop_state": (lambda c: c.pop("loops"), "holds no training progress"),
    "loop_counter_text": (
        lambda c: c["loops"]["fit_loop"]["epoch_progress"]["current"].__setitem__("completed", "x"),
        "loops.fit_loop.epoch_progress.current.completed='x' must be an integer >= 0",
    ),
    "loop_part_missing": (
        lambda c: c["loops"]["fit_loop"].pop("epoch_progress"),
        "holds no training progress (loops.fit_loop.epoch_progress is missing)",
    ),
    "optimizer_moment_shape": (
        lambda c: c["optimizer_states"][0]["state"][0].__setitem__("exp_avg", torch.zeros(2)),
        "its optimizer state does not fit the model (exp_avg of parameter 0 is (2,))",
    ),
    "no_optimizer": (lambda c: c.__setitem__("optimizer_states", []), "0 optimizer states, not one"),
    "loop_state_type": (
        lambda c: c["loops"]["fit_loop"].__setitem__("epoch_loop.state_dict", [1]),
        "Lightning cannot restore its training state",
    ),
    "timer_text": (
        lambda c: c["callbacks"].__setitem__("Timer", {"time_elapsed": {"train": "x"}}),
        "callbacks.Timer.time_elapsed",
    ),
    "checkpoint_state_type": (
        lambda c: _first_checkpoint_callback(c).__setitem__("best_model_path", 5),
        "Lightning cannot restore its training state",
    ),
}
WEIGHTS_ONLY = (
    "missing_weight",
    "weight_shape",
    "weight_not_a_tensor",
    "hyper_parameters_list",
    "unknown_hyperparameter",
    "unknown_method_setting",
)


# evaluate.py reads a checkpoint's settings and weights only; resume= and ckpt_path= all of it.
MALFORMED_CASES = [
    (entry, case)
    for case in MALFORMED
    for entry in ("evaluate", "resume", "ckpt_path")
    if entry != "evaluate" or case in WEIGHTS_ONLY
]


@pytest.mark.parametrize("entry, case", MALFORMED_CASES)
def test_a_malformed_checkpoint_is_one_line(trained_run, mnist_root, tmp_path, entry, case):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    last = run / "checkpoints" / "last.ckpt"
    alter, message = MALFORMED[case]
    ckpt = torch.load(last, weights_only=True)
    alter(ckpt)
    torch.save(ckpt, last)
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    command, cfg = entry_point(entry, run, tmp_path, mnist_root)
    with pytest.raises(UserError) as err:
        command(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(last) in str(err.value)
    after = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # nothing of the run was changed


@pytest.mark.slow
def test_crafted_checkpoints_through_the_command_lines(trained_run, mnist_root, tmp_path):
    """The scripts themselves: one line on stderr, exit 1, and the crafted call never made."""
    import subprocess

    marker = tmp_path / "code-ran"
    run = crafted_run(trained_run, tmp_path, "data_seed", marker)
    ckpt = run / "checkpoints" / "last.ckpt"
    quick = [*QUICK_RUN, f"data.root={mnist_root}", *LEAN]
    commands = {
        "evaluate.py": ["evaluate.py", f"ckpt_path={ckpt}", "accelerator=cpu", f"hydra.run.dir={tmp_path}/e"],
        "train.py resume=": ["train.py", *quick, f"resume={run}", f"hydra.run.dir={tmp_path}/r"],
        "train.py ckpt_path=": ["train.py", *quick, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path}/c"],
    }
    for name, command in commands.items():
        proc = subprocess.run(
            [sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, (name, proc.stderr)
        assert lines[0].startswith(f"error: {ckpt}: datamodule_hyper_parameters.seed={{'_target_'"), name
        assert not marker.exists(), name


def test_the_unaltered_run_passes_every_check(trained_run, mnist_root, tmp_path):
    """The control for the tests above: the same entry points accept the run as written."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for entry in ("evaluate", "ckpt_path"):
        command, cfg = entry_point(entry, run, tmp_path / entry, mnist_root)
        assert "test/mse" in command(copy.deepcopy(cfg))


def test_a_checkpoint_stopped_during_validation_resumes(trained_run, mnist_root, tmp_path):
    """Lightning's Timer records a negative validation time when a run is stopped mid-validation
    (seen on a SLURM requeue): a real checkpoint, so not refused."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["callbacks"]["Timer"]["time_elapsed"]["validate"] = -0.12
    torch.save(ckpt, last)
    cfg = compose_command([*LEAN, f"resume={run}", "epochs=2"], tmp_path / "cmd", mnist_root)
    assert train(cfg)["fit/epochs"] == 2
