"""sae.run.handoff: work runs at once outside a sweep; in one, in a worker process, waited for at
the sweep's end, and a failure there is reported with its label instead of stopping the sweep."""

from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

from sae.run import handoff


def write_marker(path: Path, text: str) -> None:
    path.write_text(text)


def fail(message: str) -> None:
    raise RuntimeError(message)


def test_outside_a_sweep_the_work_runs_at_once(tmp_path):
    assert not handoff.more_jobs_follow()  # train(cfg) called directly: no Hydra multirun
    marker = tmp_path / "done"
    assert handoff.run_or_hand_off("job", write_marker, marker, "now") is False
    assert marker.read_text() == "now"


def test_in_a_sweep_the_work_is_handed_off_and_failures_are_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(handoff, "more_jobs_follow", lambda: True)
    marker = tmp_path / "done"
    assert handoff.run_or_hand_off("job 0", write_marker, marker, "later") is True
    assert handoff.run_or_hand_off("job 1", fail, "no space left on device") is True
    failures = handoff.wait_for_hand_offs()
    assert marker.read_text() == "later"  # written by the worker process
    assert failures == ["job 1: no space left on device"]
    assert "warning: background work failed: job 1: no space left on device" in capsys.readouterr().out
    assert not handoff.is_pending("job 0") and handoff.wait_for_hand_offs() == []


@pytest.mark.parametrize("launcher, follow", [("BasicLauncher", True), ("JoblibLauncher", False)])
def test_only_launchers_that_run_jobs_in_this_process_hand_off(monkeypatch, launcher, follow):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    hydra = OmegaConf.create({"mode": RunMode.MULTIRUN, "launcher": {"_target_": f"some.module.{launcher}"}})
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hydra))
    assert handoff.more_jobs_follow() is follow


def test_a_dead_worker_is_replaced_and_without_one_the_work_runs_here(tmp_path, monkeypatch):
    class Broken:
        def submit(self, *args):
            raise BrokenProcessPool("the worker died")

    monkeypatch.setattr(handoff, "more_jobs_follow", lambda: True)
    monkeypatch.setattr(handoff, "_worker", Broken())
    marker = tmp_path / "done"
    assert handoff.run_or_hand_off("job", write_marker, marker, "replaced") is True  # a new worker
    assert handoff.wait_for_hand_offs() == [] and marker.read_text() == "replaced"

    class Spawner:  # every new worker is broken too
        def __init__(self, *args, **kwargs):
            pass

        submit = Broken.submit

    monkeypatch.setattr(handoff, "ProcessPoolExecutor", Spawner)
    monkeypatch.setattr(handoff, "_worker", Broken())
    assert handoff.run_or_hand_off("job", write_marker, marker, "here") is False
    assert marker.read_text() == "here"
    assert handoff.wait_for_hand_offs() == []  # ran here: nothing left to record


def test_where_shared_memory_refuses_the_data_the_work_is_done_here_said_once(tmp_path, monkeypatch, capsys):
    """A container's small /dev/shm: torch cannot move a tensor there. The sweep goes on with that
    work done in the job (recorded as a hand-off is), after one warning naming the fix."""
    import torch

    def refuse(tensor):
        raise RuntimeError("unable to write to file </torch_1_2>: No space left on device (28)")

    monkeypatch.setattr(handoff, "more_jobs_follow", lambda: True)
    monkeypatch.setattr(handoff, "_sharing_refused", False)
    monkeypatch.setattr(torch.Tensor, "share_memory_", refuse)
    recorded = []
    for x in (2.0, 3.0):
        handed = handoff.run_or_hand_off(f"job {x}", scale, torch.full((4,), x), then=recorded.append)
        assert handed is False and recorded == []  # done here; recorded when collected, as a hand-off
    assert handoff.wait_for_hand_offs() == []
    assert [r.tolist() for r in recorded] == [[4.0] * 4, [9.0] * 4]
    said = capsys.readouterr().out
    assert said.count("warning: ") == 1 and "No space left on device" in said and "--shm-size" in said


def scale(tensor):
    return tensor * tensor[0]


def square(x: float) -> float:
    return x * x


def test_results_are_recorded_here_after_the_job_in_the_order_handed_off(monkeypatch):
    recorded = []
    assert handoff.run_or_hand_off("now", square, 2.0, then=recorded.append) is False
    assert recorded == [4.0]  # outside a sweep: at once

    monkeypatch.setattr(handoff, "more_jobs_follow", lambda: True)
    for x in (3.0, 4.0):
        assert handoff.run_or_hand_off(f"job {x}", square, x, then=recorded.append) is True
    assert recorded == [4.0]  # never during the job that handed it off
    assert handoff.is_pending("job 3.0")
    handoff.wait_for_hand_offs()
    assert recorded == [4.0, 9.0, 16.0] and not handoff.is_pending("job 3.0")


def test_collect_finished_records_what_is_done_and_does_not_wait(tmp_path, monkeypatch):
    recorded = []
    monkeypatch.setattr(handoff, "more_jobs_follow", lambda: True)
    handoff.run_or_hand_off("quick", square, 5.0, then=recorded.append)
    handoff._pending[0].future.result(timeout=120)  # the worker is done with it
    gate = tmp_path / "gate"
    handoff.run_or_hand_off("waits", wait_for_file, str(gate), then=recorded.append)
    assert handoff.collect_finished() == [] and recorded == [25.0]
    assert handoff.is_pending("waits")  # still running: left for later
    (tmp_path / "gate.tmp").write_text("go")
    (tmp_path / "gate.tmp").rename(gate)  # at once: the worker polls, and could read a file still empty
    handoff.wait_for_hand_offs()
    assert recorded == [25.0, "go"]


def test_a_failing_record_is_reported_and_the_rest_are_recorded(monkeypatch, capsys):
    recorded = []

    def refuse(result):
        raise OSError(f"metrics.json is read-only ({result})")

    monkeypatch.setattr(handoff, "more_jobs_follow", lambda: True)
    handoff.run_or_hand_off("job 0", square, 2.0, then=refuse)
    handoff.run_or_hand_off("job 1", square, 3.0, then=recorded.append)
    assert handoff.wait_for_hand_offs() == ["job 0: metrics.json is read-only (4.0)"]
    assert recorded == [9.0]
    assert "warning: background work failed: job 0: metrics.json is read-only" in capsys.readouterr().out


def wait_for_file(path: str) -> str:
    import time

    while not Path(path).exists():
        time.sleep(0.05)
    return Path(path).read_text()


def test_a_hand_off_leaves_the_callers_tensors_where_they_were(monkeypatch):
    """The worker reads a copy in shared memory; the caller's tensor (a data split the next job
    reads) is not moved under it."""
    import torch

    monkeypatch.setattr(handoff, "more_jobs_follow", lambda: True)
    data = torch.arange(4.0)
    recorded = []
    assert handoff.run_or_hand_off("job 0", scale, data, then=recorded.append) is True
    assert not data.is_shared()
    assert handoff.wait_for_hand_offs() == []
    assert recorded[0].tolist() == [0.0, 0.0, 0.0, 0.0] and data.tolist() == [0.0, 1.0, 2.0, 3.0]
