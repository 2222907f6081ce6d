"""One writer per run folder: a second train.py is refused in one line, and a killed run leaves no
stale lock."""

import signal
import subprocess
import sys

import pytest

from sae.run.folder import FolderInUse, lock_run_folder, unlock_run_folder, writing_run_folder
from sae.training.fit import train
from tests.conftest import LEAN, QUICK_RUN, ROOT, compose_train, run_script

QUICK = [*QUICK_RUN, *LEAN]

HOLD = """
import sys, time
from sae.run.folder import lock_run_folder
lock_run_folder(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def hold_lock(folder) -> subprocess.Popen:
    """Another process holding the folder's lock until it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_stale_lock(mnist_root, tmp_path):
    run = tmp_path / "run"
    holder = hold_lock(run)
    cfg = compose_train([*LEAN, "debug=limit", "epochs=1"], run, mnist_root)
    with pytest.raises(FolderInUse, match=f"{run} is being written by another process") as err:
        train(cfg)
    assert "\n" not in str(err.value)
    assert not (run / "metrics.json").exists() and not (run / "checkpoints").exists()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert train(cfg)["fit/epochs"] == 1  # the operating system released the killed holder's lock


def test_the_lock_is_reentrant_in_one_process_and_released_after_use(tmp_path):
    with writing_run_folder(tmp_path):
        assert lock_run_folder(tmp_path) is False  # already held here: no second lock, no error
        with writing_run_folder(tmp_path):
            pass
        assert lock_run_folder(tmp_path) is False  # the inner block did not release the outer's
    assert lock_run_folder(tmp_path) is True  # released: taken afresh
    unlock_run_folder(tmp_path)


@pytest.mark.slow
def test_cli_second_run_into_a_busy_folder_is_one_line_and_writes_nothing(mnist_root, tmp_path):
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        proc = run_script("train.py", f"data.root={mnist_root}", f"hydra.run.dir={run}", timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {run} is being written by another process")
    assert not (run / ".hydra").exists()  # refused before Hydra wrote its config there


def test_evaluate_takes_the_lock_of_its_output_folder(mnist_root, tmp_path):
    """Two evaluations writing one folder: the second is refused in one line and writes nothing."""
    from sae.training.evaluate import evaluate
    from tests.conftest import evaluate_config

    metrics = train(compose_train([*LEAN, "debug=limit", "epochs=1"], tmp_path / "run", mnist_root))
    out = tmp_path / "eval"
    holder = hold_lock(out)
    try:
        cfg = evaluate_config(metrics["ckpt_path"], mnist_root, out, "logger=none", "callbacks=none")
        with pytest.raises(FolderInUse, match=f"{out} is being written by another process"):
            evaluate(cfg)
        assert not (out / "metrics.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert "test/mse" in evaluate(cfg)  # once the other is gone


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount a tmpfs of a given size (root only: a container's or a laptop's small /tmp)."""
    mounted = []

    def mount(size: str):
        folder = tmp_path / f"tmpfs-{size}"
        folder.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("size", ["8k", "2600k"], ids=["hydra_cannot_write", "checkpoints_do_not_fit"])
def test_cli_an_output_folder_too_small_is_one_line_before_training(mnist_root, small_tmpfs, size):
    """8k: Hydra itself cannot write .hydra/; 2.6 MB: the run's checkpoints (2.5 MB each) would not
    fit, refused before training instead of failing at the first checkpoint."""
    run = small_tmpfs(size) / "run"
    proc = run_script("train.py", *QUICK, f"data.root={mnist_root}", "debug=limit", f"hydra.run.dir={run}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    if size == "8k":
        full = "the disk is full (0.0 MiB free); free some space, or write elsewhere"
        assert lines[0] == f"error: cannot write {run}: {full}"
    else:
        assert lines[0].startswith(f"error: {run} has 2.5 MiB free; this run writes about ")
        assert "(checkpoints of 2.5 MiB, figures, TensorBoard)" in lines[0]
        assert "epoch" not in proc.stdout  # nothing trained
