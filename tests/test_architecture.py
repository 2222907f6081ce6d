"""The house's rules (docs/design.md): packages in layers, each importing only its own layer and the
layers below; no import circle; importing sae leaves the process as it found it."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lowest first. A module imports from its own layer and the layers below, never above.
LAYERS = (
    ("sae.errors", "sae.names", "sae.internals"),  # leaves: each imports nothing of sae
    ("sae.core",),
    ("sae.config",),
    ("sae.run",),
    ("sae.data",),
    ("sae.report",),
    ("sae.training",),
    ("sae.sweep",),
    ("sae.cli",),
)
LEAVES = LAYERS[0]


def modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "sae").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def owner(module: str) -> str | None:
    """The layer entry (package or module) a module belongs to."""
    for layer in LAYERS:
        for entry in layer:
            if module == entry or module.startswith(entry + "."):
                return entry
    return None


def rank(module: str) -> int:
    entry = owner(module)
    return next(i for i, layer in enumerate(LAYERS) if entry in layer)


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The sae modules a file imports, at its top or inside a function (a late import still ties
    the two together)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("sae.") and name != "sae":
                found.add(name)
    return found


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if m != "sae" and owner(m) is None]
    assert unplaced == [], "add these to LAYERS (and to docs/design.md)"


def test_no_module_imports_a_higher_layer():
    known = modules()
    upward = []
    for module, path in known.items():
        if module == "sae":
            continue
        for target in imports(path, known):
            if rank(target) > rank(module):
                upward.append(f"{module} -> {target}")
            if owner(module) in LEAVES and owner(target) != owner(module):
                upward.append(f"{module} -> {target} (a leaf imports nothing of sae)")
    assert upward == []


def test_no_import_circle():
    known = modules()
    graph = {m: {t for t in imports(p, known) if t != m} for m, p in known.items()}
    circles = []

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph.get(node, ()))
        return False

    for module, targets in graph.items():
        circles += [f"{module} <-> {t}" for t in targets if reaches(t, module)]
    assert circles == []


def third_party_roots(known: dict[str, Path]) -> list[str]:
    """The libraries sae imports (torch, lightning, hydra, ...): some set variables of their own at
    import (Lightning: PYTORCH_NVML_BASED_CUDA_CHECK), which is not ours to test."""
    roots = set()
    for path in known.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots.add(node.module.split(".")[0])
    return sorted(r for r in roots if r not in sys.stdlib_module_names and r not in ("sae", "__future__"))


def test_importing_every_module_changes_no_environment_variable_and_chooses_no_backend():
    """A notebook or a test that imports sae keeps its own thread settings and plotting backend:
    the entry scripts set the process up (sae.cli.start_process), the figures draw without pyplot."""
    known = modules()
    names = sorted(m for m in known if m != "sae")
    probe = (
        "import importlib, json, os, sys\n"
        f"for name in {third_party_roots(known)!r}: importlib.import_module(name)\n"
        "before = dict(os.environ)\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "import matplotlib\n"
        "backend = dict.__getitem__(matplotlib.rcParams, 'backend')\n"
        "print(json.dumps({'changed': sorted(k for k in set(before) | set(os.environ)"
        " if before.get(k) != os.environ.get(k)), 'backend_chosen': isinstance(backend, str)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["changed"] == []
    assert seen["backend_chosen"] is False


def test_the_run_record_is_the_one_owner_of_its_files():
    """metrics.json and status.json are named (as file names, not in prose) only in sae.run.record:
    every other module reads and writes them through RunRecord."""
    owners = {}
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in ("metrics.json", "status.json"):
                owners.setdefault(node.value, set()).add(module)
    assert owners == {"metrics.json": {"sae.run.record"}, "status.json": {"sae.run.record"}}


MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_a_screen():
    """A function a researcher reads in one view (docstring included): at most MAX_FUNCTION_LINES."""
    long = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert long == []


def test_hydra_finding_our_plugins_loads_neither_torch_nor_lightning():
    """Hydra imports every hydra_plugins module as it starts (train.py --help, a config error):
    ours must not make that pay for torch or Lightning (sae.internals imports Lightning for
    annotations only)."""
    probe = (
        "import sys, hydra_plugins.sae_submitit_launchers.submitit_launchers, "
        "hydra_plugins.sae_vectorized_launcher.vectorized_launcher; "
        "print(sorted(m for m in ('torch', 'lightning', 'matplotlib') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
