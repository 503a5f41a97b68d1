"""`metaloss study --jobs N` (launch/study/runner.py): which hardware each concurrent run gets, and a stop signal
reaching every running child (real processes, a real SIGTERM)."""
import os
import signal
import sys
import threading
import time

import pytest
import yaml

import launch.study.runner as runner_module
from common.errors import UserError
from launch.study.runner import StudyRunner, runs_use_gpus, slot_environments, visible_gpus
from launch.study.spec import RunSpec, load_study
from tests.support.cli import REPO


def _runs(*world_sizes: int) -> list[RunSpec]:
    return [RunSpec(cell=(), world_size=w, seed=0, name=f"r{i}") for i, w in enumerate(world_sizes)]


def test_one_job_changes_nothing():
    assert slot_environments(1, _runs(1), gpus=["0", "1"], cpus=16) == [{}]


def test_gpu_node_gives_each_slot_a_disjoint_block_sized_for_the_widest_run():
    assert slot_environments(2, _runs(1, 2), gpus=["0", "1", "2", "3"], cpus=64) == [
        {"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    # a remainder GPU stays idle rather than giving one slot more than another
    assert slot_environments(3, _runs(1), gpus=["4", "5", "6", "7"], cpus=64) == [
        {"CUDA_VISIBLE_DEVICES": "4"}, {"CUDA_VISIBLE_DEVICES": "5"}, {"CUDA_VISIBLE_DEVICES": "6"}]


def test_too_few_gpus_is_refused_with_the_jobs_that_would_fit():
    with pytest.raises(UserError, match=r"--jobs 2: 2 visible GPU\(s\).*2 GPU\(s\).*use --jobs 1"):
        slot_environments(2, _runs(1, 2), gpus=["0", "1"], cpus=64)


def test_cpu_node_splits_the_cores_unless_the_user_pinned_the_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert slot_environments(4, _runs(1), gpus=[], cpus=16) == [{"OMP_NUM_THREADS": "4"}] * 4
    assert slot_environments(2, _runs(2), gpus=[], cpus=16) == [{"OMP_NUM_THREADS": "4"}] * 2  # 2 ranks per run
    assert slot_environments(4, _runs(1), gpus=[], cpus=2) == [{"OMP_NUM_THREADS": "1"}] * 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert slot_environments(2, _runs(1), gpus=[], cpus=16) == [{}, {}]


def test_visible_gpus_reads_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert visible_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == []


def test_zero_jobs_is_a_user_error():
    with pytest.raises(UserError, match="--jobs 0"):
        StudyRunner(study=None, jobs=0)


def _study(tmp_path, seeds: int, **data):
    spec = {"name": "s", "base": str(REPO / "configs/demo.yaml"), "out": str(tmp_path / "out"),
            "set": {"data.root": str(tmp_path), **data}, "grid": {"train.loss": ["ce"]}, "seeds": list(range(seeds))}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    return load_study(tmp_path / "s.yaml")


def test_only_runs_that_train_on_a_gpu_are_given_gpus(tmp_path):
    cpu = _study(tmp_path, 1)  # configs/demo.yaml sets train.cpu: true -- threads, not GPUs, even on a GPU node
    assert not runs_use_gpus(cpu, cpu.runs)
    gpu = _study(tmp_path, 1, **{"train.cpu": False})
    assert runs_use_gpus(gpu, gpu.runs)


# a stand-in for a training: marks that it started, and on SIGTERM marks that too and exits 0 (as a pre-empted run)
_CHILD = """
import os, signal, sys, time
run_dir = sys.argv[1]
os.makedirs(run_dir, exist_ok=True)
def stop(signum, frame):
    open(os.path.join(run_dir, "got_sigterm"), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(run_dir, "started"), "w").close()
time.sleep(120)
"""


def test_a_stop_signal_reaches_every_running_child_and_starts_nothing_new(tmp_path, monkeypatch):
    study = _study(tmp_path, 3)
    names = [r.name for r in study.runs]
    monkeypatch.setattr(runner_module, "train_command",
                        lambda st, run: [sys.executable, "-c", _CHILD, str(st.runs_dir / run.name)])

    def stop_once_two_are_running():
        deadline = time.time() + 60
        while time.time() < deadline and not all((study.runs_dir / n / "started").exists() for n in names[:2]):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would: the study process, not its children

    threading.Thread(target=stop_once_two_are_running, daemon=True).start()
    start = time.time()
    handler_before = signal.getsignal(signal.SIGTERM)
    runner = StudyRunner(study, jobs=2)
    status = runner.run()
    assert time.time() - start < 60  # the children's 120 s sleep was cut short
    assert runner.stop_signal == signal.SIGTERM and signal.getsignal(signal.SIGTERM) == handler_before
    for name in names[:2]:
        assert (study.runs_dir / name / "got_sigterm").exists()
        assert status[name]["status"] == "interrupted" and status[name]["exit_code"] == 0
        assert status[name]["finished_at"] >= status[name]["started_at"]
    assert names[2] not in status and not (study.runs_dir / names[2]).exists()
