"""Checkpoint + exact resume on one CPU process, through the real CLI and real signals.

Every scenario is compared with one uninterrupted run of the same config: the final weights, the classifier's Adam
state, φ and its Adam state must be bit-identical and metrics.json equal except for wall-clock fields. That holds
only if the checkpoint carries everything (model, both optimisers, scheduler, RNG states, step/epoch/history, the
train and meta stream positions) and the torch backend's per-sample augmentation seeds make a mid-epoch restart
draw the same pixels.

The faults are injected with METALOSS_TEST_FAULT (trainer/engine/checkpoint.py ``FaultInjection``) so they hit an exact
step: 10 steps per epoch, 2 epochs, a checkpoint every 4 steps and at each epoch end (4, 8, 10, 12, 16, 20).
"""
import json

import pytest

from tests.support.cli import tiny_overrides
from tests.support.dist import (assert_same_tensors, checkpoint_tensors, comparable_metrics,
                               final_checkpoint, python, torchrun)
from trainer.engine.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow


def _args(synth_dir, out_dir, name):
    return ["-m", "launch.train", "configs/demo.yaml",
            *tiny_overrides(synth_dir, out_dir, name, "train.loss=meta", "train.deterministic=true",
                            "checkpoint.every_steps=4", "checkpoint.keep_last=3", "logging.every_steps=3"),
            "--quiet"]


def _steps(run_dir):
    return [int(p.name.split("_")[1]) for p in list_checkpoints(run_dir)]


@pytest.fixture(scope="module")
def reference(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume_ref")
    python(*_args(synth_dir, out, "ref"))
    run_dir = out / "ref"
    assert comparable_metrics(run_dir)["steps"] == 20
    return run_dir


def _assert_matches_reference(run_dir, reference):
    assert_same_tensors(checkpoint_tensors(final_checkpoint(run_dir)), checkpoint_tensors(final_checkpoint(reference)))
    assert comparable_metrics(run_dir) == comparable_metrics(reference)


@pytest.mark.distributed  # also tries (and must be refused) a 2-process resume of the 1-process checkpoint
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(synth_dir, tmp_path, reference):
    args = _args(synth_dir, tmp_path, "killed")
    proc = python(*args, env={"METALOSS_TEST_FAULT": "kill_after_step:14"}, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    run_dir = tmp_path / "killed"
    assert _steps(run_dir) == [12, 10, 8]  # keep_last=3; step 12 is two steps into the second epoch
    assert not (run_dir / "metrics.json").exists()
    # the position "2 batches into epoch 2" means other samples on 2 ranks: refused, naming the checkpoint
    proc = torchrun(*args, "--resume", "auto", check=False)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("metaloss: error:")]
    assert len(errors) == 1 and all("step_00000012 was written mid-epoch by 1 rank(s), this run has 2" in e
                                    for e in errors)  # one line (rank 0 reports for the job), no worker traceback
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    proc = python(*args, "--resume", "auto")
    assert "resumed from" in proc.stderr and "step_00000012" in proc.stderr
    _assert_matches_reference(run_dir, reference)


def test_sigterm_checkpoints_exits_0_and_resume_continues(synth_dir, tmp_path, reference):
    args = _args(synth_dir, tmp_path, "term")
    proc = python(*args, env={"METALOSS_TEST_FAULT": "term_after_step:5"})  # check=True: exit status 0
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"run_dir": str(tmp_path / "term"),
                                                         "preempted": True, "step": 5, "signal": "SIGTERM"}
    run_dir = tmp_path / "term"
    assert _steps(run_dir) == [5, 4]  # the pre-emption checkpoint is taken at the step the signal arrived in
    assert not (run_dir / "metrics.json").exists()
    python(*args, "--resume", "auto")
    _assert_matches_reference(run_dir, reference)


def test_sigterm_during_start_up_is_kept_until_the_first_step_boundary(synth_dir, tmp_path, reference):
    # the signal arrives while the trainer is being built (before fit() installs its handler): without the deferral
    # the default action would kill the run with no PREEMPTED marker, and a requeue script would not requeue it
    args = _args(synth_dir, tmp_path, "early")
    proc = python(*args, env={"METALOSS_TEST_FAULT": "term_during_start:0"})  # check=True: exit status 0
    assert "signal 15 arrived during start-up" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["preempted"] is True
    run_dir = tmp_path / "early"
    assert _steps(run_dir) == [1] and (run_dir / "checkpoints" / "PREEMPTED").is_file()
    python(*args, "--resume", "auto")
    assert not (run_dir / "checkpoints" / "PREEMPTED").exists()
    _assert_matches_reference(run_dir, reference)


def test_kill_during_checkpoint_write_keeps_the_previous_one(synth_dir, tmp_path, reference):
    args = _args(synth_dir, tmp_path, "midwrite")
    proc = python(*args, env={"METALOSS_TEST_FAULT": "kill_before_rename:8"}, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    run_dir = tmp_path / "midwrite"
    ckpt_root = run_dir / "checkpoints"
    # every file of step 8 was written, but it was never published under its real name
    assert (ckpt_root / ".tmp-step_00000008" / "pytorch_model.bin").is_file()
    assert _steps(run_dir) == [4]
    proc = python(*args, "--resume", "auto")
    assert "step_00000004" in proc.stderr
    assert not list(ckpt_root.glob(".tmp-*"))  # the next save cleared the debris
    _assert_matches_reference(run_dir, reference)


def test_unreadable_newest_checkpoint_falls_back_to_the_one_before(synth_dir, tmp_path, reference):
    args = _args(synth_dir, tmp_path, "corrupt")
    proc = python(*args, env={"METALOSS_TEST_FAULT": "kill_after_step:9"}, check=False)
    assert proc.returncode == -9
    run_dir = tmp_path / "corrupt"
    assert _steps(run_dir) == [8, 4]
    weights = run_dir / "checkpoints" / "step_00000008" / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:100])  # a torn file, as a full disk or a bad copy leaves it
    proc = python(*args, "--resume", "auto")
    assert "unreadable" in proc.stderr and "step_00000004" in proc.stderr
    _assert_matches_reference(run_dir, reference)
