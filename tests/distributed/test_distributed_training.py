"""The whole trainer on two CPU processes (torchrun, gloo): rank invariants, gathered eval, exact resume.

One uninterrupted 2-rank meta run is the reference for every test here (5 steps per epoch per rank, 2 epochs,
checkpoints every 3 steps and at epoch ends: 3, 5, 6, 9, 10):

* after training, φ, φ's Adam state and θ are bit-identical on both ranks (φ is replicated, not DDP-wrapped);
* the test metrics the 2 ranks gathered equal a 1-rank evaluation of the final checkpoint exactly;
* SIGTERM reaching one rank only still stops both at the same step with a checkpoint and exit 0; a SIGKILL
  mid-epoch later, ``--resume auto`` twice (torchrun, then ``accelerate launch``) ends bit-identical to the
  reference; SIGTERM to the torchrun agent (what SLURM does) checkpoints every rank at one step.
"""
import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.support.cli import tiny_overrides
from tests.support.dist import (REPO, SCRIPTS, accelerate_launch, assert_same_tensors, checkpoint_tensors,
                               comparable_metrics, final_checkpoint, free_port, python, subprocess_env,
                               torchrun)
from trainer.engine.checkpoint import list_checkpoints

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _overrides(synth_dir, out_dir, name):
    return tiny_overrides(synth_dir, out_dir, name, "train.loss=meta", "train.deterministic=true",
                          "meta.granularity=class", "checkpoint.every_steps=3", "checkpoint.keep_last=3",
                          "logging.every_steps=2")


@pytest.fixture(scope="module")
def reference(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_ref")
    dump = out / "dump"
    torchrun(str(SCRIPTS / "train_and_dump.py"), str(dump), "configs/demo.yaml", *_overrides(synth_dir, out, "ref"))
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    return out / "ref", ranks


def test_phi_adam_state_and_theta_identical_on_every_rank(reference):
    run_dir, (r0, r1) = reference
    assert r0["metrics"]["steps"] == 10
    assert all(torch.equal(r0["phi"][k], r1["phi"][k]) for k in r0["phi"])
    assert any(not torch.equal(r0["phi"][k], r0["phi_start"][k]) for k in r0["phi"]), "φ never moved"
    s0, s1 = r0["phi_adam"]["state"], r1["phi_adam"]["state"]
    assert s0.keys() == s1.keys() and s0
    for pid in s0:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s0[pid][key], s1[pid][key]), (pid, key)
    assert all(float(s["step"]) == 10 for s in s0.values())  # meta.every=1: one φ update per step
    assert_same_tensors(r0["model"], r1["model"])  # DDP: same θ, and the same BatchNorm buffers
    # the checkpoint holds the state the ranks agree on
    ckpt = checkpoint_tensors(final_checkpoint(run_dir))
    assert all(torch.equal(ckpt[f"phi.{k}"], r0["phi"][k]) for k in r0["phi"])
    assert all(torch.equal(ckpt[f"model.{k}"], r0["model"][k]) for k in r0["model"])


def test_two_rank_test_metrics_equal_one_rank_on_the_same_checkpoint(synth_dir, tmp_path, reference):
    run_dir, _ = reference
    ckpt = final_checkpoint(run_dir)
    out = tmp_path / "eval1.json"
    python(str(SCRIPTS / "evaluate_checkpoint.py"), str(out), str(ckpt), "configs/demo.yaml",
           *_overrides(synth_dir, tmp_path, "eval1"))
    one = json.loads(out.read_text())
    assert one["world"] == 1
    two = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert one["metrics"] == two  # accuracy, F1s, QWK, confusion, n, NLL: exactly
    with open(run_dir / "splits.csv") as f:
        n_test = sum(r["split"] == "test" for r in csv.DictReader(f))
    assert two["n"] == n_test == len(one["ids"]) == len(set(one["ids"]))  # each image once, no padding
    with open(run_dir / "predictions_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["label"]) for r in rows] == one["labels"]
    assert [int(r["pred"]) for r in rows] == [max(range(len(p)), key=p.__getitem__) for p in one["probs"]]


def test_sigterm_on_one_rank_then_sigkill_then_resume_is_bitwise_identical(synth_dir, tmp_path, reference):
    ref_dir, _ = reference
    args = ["-m", "launch.train", "configs/demo.yaml", *_overrides(synth_dir, tmp_path, "chain"), "--quiet"]
    run_dir = tmp_path / "chain"

    # 1. SIGTERM to rank 1 only, after step 3: the ranks agree one step later, checkpoint step 4, exit 0
    proc = torchrun(*args, env={"METALOSS_TEST_FAULT": "term_after_step:3@1"})
    assert json.loads(proc.stdout.strip().splitlines()[-1])["preempted"] is True
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000004", "step_00000003"]

    # 2. resume, then SIGKILL on both ranks after step 8 (mid second epoch): newest is step 6
    proc = torchrun(*args, "--resume", "auto", env={"METALOSS_TEST_FAULT": "kill_after_step:8"}, check=False)
    assert proc.returncode != 0
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000006", "step_00000005", "step_00000004"]
    assert not (run_dir / "metrics.json").exists()

    # 3. resume to the end -- through `accelerate launch` this time: the same bits as the uninterrupted run
    accelerate_launch(*args, "--resume", "auto")
    assert_same_tensors(checkpoint_tensors(final_checkpoint(run_dir)),
                        checkpoint_tensors(final_checkpoint(ref_dir)))
    assert comparable_metrics(run_dir) == comparable_metrics(ref_dir)


def test_sigterm_to_the_torchrun_agent_checkpoints_and_workers_exit_0(synth_dir, tmp_path):
    """What SLURM pre-emption does: SIGTERM to the launcher, which forwards it to every worker (and SIGKILLs them
    30 s later). The workers must agree on a step, checkpoint it and exit 0 well before that."""
    args = ["-m", "launch.train", "configs/demo.yaml",
            *tiny_overrides(synth_dir, tmp_path, "agent", "train.epochs=50", "checkpoint.every_steps=3",
                            "checkpoint.keep_last=5"), "--quiet"]
    run_dir = tmp_path / "agent"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        while not list_checkpoints(run_dir):  # training is under way: the signal handlers are installed
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["preempted"] is True
    newest = list_checkpoints(run_dir)[0]
    assert newest.name == f"step_{summary['step']:08d}"
    assert stderr.count("SIGTERM received") == 2
