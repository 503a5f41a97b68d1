"""`metaloss study --jobs N`: which hardware each concurrent run gets (launch/study/runner.py)."""
import pytest

from common.errors import UserError
from launch.study.runner import StudyRunner, slot_environments, visible_gpus
from launch.study.spec import RunSpec


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


def test_zero_jobs_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--jobs 0"):
        StudyRunner(study=None, jobs=0)
