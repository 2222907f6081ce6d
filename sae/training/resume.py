"""resume=RUN_DIR: continue a run with the settings it was trained with, and only the changes that
do not alter what it trains.

Two records in the run folder say what the run trained: the command that started it
(`.hydra/overrides.yaml`: its presets, e.g. `debug=limit`, and every key it set) and its
checkpoint (the model's and the data's settings, and the epochs it was set to train). Both are
files, so both are input: the overrides are parsed and checked as a command line is (no Hydra
internals, no `_target_`, no mapping, no interpolation), the config is composed again from this
project's own config files with them, and the checkpoint's values pass the rule of the key each
fills (sae.training.checkpoints.saved_settings) before they touch the config. Nothing read from the run
folder is ever handed to Hydra's instantiate: the model and data module are built from checked
plain settings (sae.config.model_settings), and the trainer, loggers and callbacks come from this
project's config files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from sae.config import (
    DATA_EXECUTION_SETTINGS,
    MIRRORS,
    ConfigError,
    compose_train_config,
    override_key,
    plain_value,
)
from sae.errors import UserError, one_line
from sae.training.checkpoints import SavedSettings, last_checkpoint, read_checkpoint, saved_settings

# Data settings a resumed run keeps (what its checkpoint's weights were trained on); the rest of
# the data group (where the files are, evaluation batches, workers) may change on resume.
KEPT_DATA_SETTINGS = ("seed", "batch_size", "val_size", "split_seed")
# What a resume command may change: where and how the run executes, what it logs, and how long it
# trains (`epochs`, applied for real and recorded in metrics.json as `resumed_with`). Any other
# difference, from a key or from a config group (`sparsity=l1`, `experiment=...`), is refused.
CHANGEABLE_ON_RESUME = (
    "epochs",
    "trainer.max_epochs",
    "resume",
    "output_dir",
    "trainer.default_root_dir",
    "threads",
    "cuda_graph",
    "optimized_metric",
    *DATA_EXECUTION_SETTINGS,
    "logger",
    "callbacks",
    "trainer.accelerator",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
)
RECORDED_ON_RESUME = ("epochs",)
# Overrides of the recorded command that the resume itself decides.
NOT_REPLAYED = ("resume", "ckpt_path", "output_dir")


class RunRecordError(UserError, ValueError):
    """A run folder's record of its command cannot be read or holds what a command cannot say."""


def resumed_config(cfg: DictConfig, command: list[str] | None) -> tuple[DictConfig, dict[str, Any]]:
    """The config that continues the run in cfg.resume, and the settings the resume changes.

    `command` are the resume command's overrides (None: an in-process caller, whose cfg counts as
    meant in full). With the run's recorded command (`.hydra/overrides.yaml`), the config is
    composed again from it, then the resume command's overrides; a change beyond
    CHANGEABLE_ON_RESUME is refused in one line. Then the checkpoint's own settings: one the
    command does not set is taken from it, one it sets to another value is refused (but epochs).
    """
    run = Path(cfg.resume)
    path = last_checkpoint(run)
    saved = saved_settings(path, read_checkpoint(path))
    recorded = run / ".hydra" / "overrides.yaml"
    if command is not None and recorded.is_file():
        restated = {override_key(o) for o in command}  # the command's own value replaces the record's
        cfg = _replayed(cfg, run, recorded_overrides(recorded, restated), command)
    keys = None if command is None else [override_key(o) for o in command]
    return cfg, _take_saved_settings(cfg, saved, keys)


def recorded_overrides(path: Path, restated: set[str] = frozenset()) -> list[str]:
    """A run's `.hydra/overrides.yaml`, checked as input: a list of overrides Hydra can parse, none
    of them a sweep, a Hydra setting, an underscored key (`_target_`, ...), a mapping or an
    interpolation; else a one-line RunRecordError naming the file and the override. Returned
    without the ones a resume decides itself (NOT_REPLAYED: resume, ckpt_path, output_dir). Those whose
    key is in `restated` (the resume command sets it again, and its value is the one used) are not
    checked: a run started with a callback of the researcher's own (`+callbacks.x._target_=...`)
    resumes when the resume command says it again. They are returned all the same, to compose the
    run's config only to compare it, never to build from."""
    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    fix = (
        "it records the command that started the run: if that command said it, say it again on the "
        "resume command; else restore the file, or start a new run"
    )
    try:
        items = yaml.safe_load(path.read_text()) or []
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise RunRecordError(f"cannot read {path}: {one_line(err)}; {fix}") from err
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise RunRecordError(f"{path} is not a list of overrides; {fix}")
    checked = [item for item in items if override_key(item) not in restated]
    try:
        parsed = OverridesParser.create().parse_overrides(checked)
    except HydraException as err:
        raise RunRecordError(f"{path}: {one_line(err)}; {fix}") from err
    for item, override in zip(checked, parsed, strict=True):
        key = override.key_or_group
        segments = re.split(r"[./@]", key)
        why = ""
        if override.is_sweep_override():
            why = "is a sweep, not one run's setting"
        elif segments[0] == "hydra" or any(s.startswith("_") for s in segments):
            why = "sets Hydra's own or an underscored key"
        elif not override.is_delete() and not plain_value(override.value()):
            why = "is not a plain value (a mapping, or an interpolation)"
        if why:
            raise RunRecordError(f"{path}: {item!r} {why}, which no run records; {fix}")
    return [item for item in items if override_key(item) not in NOT_REPLAYED]


def recorded_config(run: Path) -> DictConfig:
    """The training config of a run, composed again from its recorded command (checked), with
    output_dir the run folder: what evaluate.py reads to complete a sweep job's results."""
    record = run / ".hydra" / "overrides.yaml"
    if not record.is_file():
        raise RunRecordError(
            f"{run} holds no {record.relative_to(run)}: not the folder of a train.py run or sweep job"
        )
    cfg = compose_train_config(recorded_overrides(record))
    cfg.output_dir = str(run)
    return cfg


def _replayed(cfg: DictConfig, run: Path, recorded: list[str], command: list[str]) -> DictConfig:
    """The run's config composed again from its recorded command, then the resume command's own
    overrides (a key both set: the resume command's); refused if those change what is trained."""
    command = [o for o in command if override_key(o) not in NOT_REPLAYED]
    said = {override_key(o) for o in command}
    own = [o for o in recorded if override_key(o) not in said]
    before = compose_train_config(recorded)
    after = compose_train_config(own + command)
    changes = [
        f"{key} ({_shown(a)} -> {_shown(b)})"
        for key, (a, b) in _differences(before, after).items()
        if not _changeable(key)
    ]
    if changes:
        # Name the overrides the run's record does not hold (the ones that can change something).
        named = [o for o in command if o not in recorded and not _changeable(override_key(o))] or command
        raise ConfigError(
            f"resume={run}: {' '.join(named)} would change what the run trains: {', '.join(changes[:4])}"
            f"{' ...' if len(changes) > 4 else ''}; a resumed run keeps the settings it was trained "
            "with: drop the override, or start a new run"
        )
    after.resume = cfg.resume
    after.output_dir = cfg.output_dir
    return after


def _changeable(key: str) -> bool:
    return any(key == c or key.startswith(c + ".") for c in CHANGEABLE_ON_RESUME)


_ABSENT = "<absent>"  # how a difference shows a key one config lacks
_NOT_THERE = object()


def _differences(a: DictConfig, b: DictConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (value in a, value in b) where they differ, as written (unresolved)."""
    flat_a, flat_b = (
        _flat(OmegaConf.to_container(a, resolve=False)),
        _flat(OmegaConf.to_container(b, resolve=False)),
    )
    return {
        key: (flat_a.get(key, _ABSENT), flat_b.get(key, _ABSENT))
        for key in dict.fromkeys([*flat_a, *flat_b])
        if flat_a.get(key, _ABSENT) != flat_b.get(key, _ABSENT)
    }


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out |= _flat(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: node}


def _shown(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _take_saved_settings(cfg: DictConfig, saved: SavedSettings, command: list[str] | None) -> dict[str, Any]:
    """Set cfg's model and data settings and epochs to the checkpoint's, where the command does not
    set them; a setting the command sets to another value is refused, but epochs, which is
    returned, to be recorded. `command`: the command's override keys (None: all of cfg is meant)."""
    settings = {_config_key("model", k): v for k, v in saved.model.items() if k != "sparsity"}
    # The method's settings one by one (model.sparsity.rho follows the knob rho, ...).
    settings |= {_config_key("model", f"sparsity.{k}"): v for k, v in saved.model["sparsity"].items()}
    settings |= {_config_key("data", k): saved.data[k] for k in KEPT_DATA_SETTINGS if k in saved.data}
    if saved.epochs is not None:
        settings["epochs"] = saved.epochs

    def set_by_command(key: str) -> bool:
        return command is None or any(key == c or key.startswith(c + ".") for c in command)

    changed = {}
    for key, value in settings.items():
        if OmegaConf.select(cfg, key, default=_NOT_THERE) is _NOT_THERE:
            continue
        current = OmegaConf.select(cfg, key)
        if isinstance(current, DictConfig | ListConfig):
            current = OmegaConf.to_container(current)
        if current == value:
            continue
        if not set_by_command(key):
            OmegaConf.update(cfg, key, value, merge=False)  # a checked plain value (saved_settings)
        elif key in RECORDED_ON_RESUME:
            changed[key] = current
        else:
            raise ConfigError(
                f"resume={cfg.resume}: {key}={current} differs from the run's {key}={value}; a resumed run "
                "keeps the settings it was trained with: drop the override, or start a new run"
            )
    return changed


def _config_key(group: str, name: str) -> str:
    """Where a saved hyperparameter lives in the training config: its top-level knob if it has one."""
    key = f"{group}.{name}"
    return MIRRORS.get(key, key)
