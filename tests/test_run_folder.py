"""One writer per run folder: a second train.py is refused in one line, and a killed run leaves no
stale lock."""

import signal
import subprocess
import sys

import pytest

from sae.run_folder import FolderInUse, lock_run_folder, unlock_run_folder, writing_run_folder
from sae.training import train
from tests.conftest import LEAN, ROOT, compose_train, run_script

HOLD = """
import sys, time
from sae.run_folder import lock_run_folder
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
