"""SIGTERM and Ctrl-C as a cluster or a terminal sends them: real signals to every process of a real job.

SLURM signals every process of a job step (the launcher, each rank and each rank's DataLoader workers); a terminal's
Ctrl-C goes to the whole foreground process group. So the 1-process tests start training in its own session and
``os.killpg`` it; the 2-rank tests (torchrun, gloo) signal the launcher's group *and* every process below it, as
SLURM does. The job must agree on a step, checkpoint it and exit 0 (SIGTERM, leaving ``checkpoints/PREEMPTED``) or
130 (Ctrl-C) with one line -- never "DataLoader worker ... killed by signal" or a traceback.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cli import tiny_overrides
from tests.support.dist import REPO, SCRIPTS, free_port, python, subprocess_env
from trainer.engine.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow
UNDER_WAY_S = 90  # generous on a loaded 2-core machine; a healthy run is training after ~5-10 s
EXIT_S = 40


def _overrides(data_dir, out_dir, name, backend, *extra):
    fmt = "prepared" if backend == "dali" else "aptos"
    return tiny_overrides(data_dir, out_dir, name, f"data.backend={backend}", f"data.format={fmt}",
                          "data.num_workers=2", "train.epochs=500", "checkpoint.every_steps=2",
                          "checkpoint.keep_last=2", "logging.every_steps=2", *extra)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc): the ranks and their loader workers."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


class Job:
    """A training command in its own session, with its output in files (a pipe could fill up and block it)."""

    def __init__(self, cmd: list[str], tmp_path: Path, env: dict | None = None):
        self.out, self.err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with self.out.open("w") as o, self.err.open("w") as e:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(env), stdout=o, stderr=e,
                                         start_new_session=True)

    def wait_for_training(self, run_dir: Path) -> None:
        """Until the first checkpoint exists: the signal handlers are installed and the loader workers run."""
        deadline = time.monotonic() + UNDER_WAY_S
        while not list_checkpoints(run_dir):
            assert self.proc.poll() is None, self.err.read_text()[-4000:]
            assert time.monotonic() < deadline, "training did not start in time"
            time.sleep(0.1)

    def signal_group(self, sig: int, *, every_process: bool = False) -> None:
        below = _descendants(self.proc.pid) if every_process else []
        os.killpg(self.proc.pid, sig)
        for pid in below:  # as SLURM does: ranks in their own sessions (torchrun) get it too, and so do workers
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def finish(self) -> tuple[int, str, str]:
        try:
            rc = self.proc.wait(timeout=EXIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError("did not exit after the signal:\n" + self.err.read_text()[-4000:]) from None
        return rc, self.out.read_text(), self.err.read_text()


@pytest.fixture(scope="module")
def prepared_dir(synth_dir, tmp_path_factory):
    """The synthetic set through `metaloss prepare`, for the DALI backend."""
    pytest.importorskip("nvidia.dali")
    out = tmp_path_factory.mktemp("prepared") / "p"
    python("-m", "launch.cli", "prepare", "--dataset", "aptos", "--src", str(synth_dir), "--out", str(out),
           "--size", "48", "--workers", "1", "--quiet")
    return out


def _data(backend, request):
    return request.getfixturevalue("prepared_dir" if backend == "dali" else "synth_dir")


def _assert_clean(stderr: str) -> None:
    assert "Traceback" not in stderr and "killed by signal" not in stderr, stderr[-4000:]


def _assert_preempted(run_dir: Path, stdout: str, signal_name: str) -> int:
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["preempted"] is True and summary["signal"] == signal_name
    assert list_checkpoints(run_dir)[0].name == f"step_{summary['step']:08d}"  # the agreed step is checkpointed
    assert not (run_dir / "metrics.json").exists()
    return summary["step"]


@pytest.mark.parametrize("backend", ["torch", "dali", "synthetic"])
def test_sigterm_to_the_process_group_checkpoints_and_exits_0(backend, request, tmp_path):
    run_dir = tmp_path / "term"
    job = Job([sys.executable, "-m", "launch.train", "configs/demo.yaml",
               *_overrides(_data(backend, request), tmp_path, "term", backend)], tmp_path)
    job.wait_for_training(run_dir)
    job.signal_group(signal.SIGTERM)
    rc, out, err = job.finish()
    assert rc == 0, err[-4000:]
    _assert_clean(err)
    step = _assert_preempted(run_dir, out, "SIGTERM")
    assert json.loads((run_dir / "checkpoints" / "PREEMPTED").read_text())["step"] == step
    assert err.count("pre-empted (SIGTERM): checkpointed step") == 1
    if backend != "torch":
        return
    # the requeued job: resumes, and the marker goes (this run is no longer a pre-empted one)
    proc = python("-m", "launch.train", "configs/demo.yaml",
                  *_overrides(_data(backend, request), tmp_path, "term", backend, f"train.max_steps={step + 1}"),
                  "--resume", "auto", "--quiet")
    assert f"(step {step}," in proc.stderr
    assert not (run_dir / "checkpoints" / "PREEMPTED").exists()
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == step + 1


def test_ctrl_c_checkpoints_and_exits_130_with_one_line(synth_dir, tmp_path):
    run_dir = tmp_path / "int"
    job = Job([sys.executable, "-m", "launch.train", "configs/demo.yaml",
               *_overrides(synth_dir, tmp_path, "int", "torch")], tmp_path)
    job.wait_for_training(run_dir)
    job.signal_group(signal.SIGINT)
    rc, out, err = job.finish()
    assert rc == 130, err[-4000:]
    _assert_clean(err)
    assert "KeyboardInterrupt" not in err
    _assert_preempted(run_dir, out, "SIGINT")
    assert err.count("interrupted (Ctrl-C): checkpointed step") == 1
    assert not (run_dir / "checkpoints" / "PREEMPTED").exists()  # an interrupted run is not requeued


def test_a_second_ctrl_c_exits_at_once(synth_dir, tmp_path):
    run_dir = tmp_path / "int2"
    # step 3 hangs (as a stuck step would): the first Ctrl-C waits for a step boundary that does not come soon
    job = Job([sys.executable, "-m", "launch.train", "configs/demo.yaml",
               *_overrides(synth_dir, tmp_path, "int2", "torch")], tmp_path,
              env={"METALOSS_TEST_FAULT": "hang_after_step:2"})
    job.wait_for_training(run_dir)
    job.signal_group(signal.SIGINT)
    time.sleep(1.5)
    t0 = time.monotonic()
    job.signal_group(signal.SIGINT)
    rc, out, err = job.finish()
    assert rc == 130 and time.monotonic() - t0 < 10, err[-4000:]
    assert "second Ctrl-C: exiting now" in err and "KeyboardInterrupt" not in err
    assert "preempted" not in out
    assert [c.name for c in list_checkpoints(run_dir)] == ["step_00000002"]


@pytest.mark.distributed
@pytest.mark.parametrize("backend,name", [("torch", "SIGTERM"), ("dali", "SIGTERM"), ("synthetic", "SIGTERM"),
                                          ("torch", "SIGINT")])
def test_two_ranks_signalled_like_slurm_agree_checkpoint_and_exit(backend, name, request, tmp_path):
    """Every process gets the signal (launcher, ranks, loader workers), and the launcher forwards it once more."""
    sig = getattr(signal, name)
    run_dir, logs = tmp_path / "dist", tmp_path / "logs"
    codes = tmp_path / "codes"
    job = Job([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "--log-dir", str(logs), "--redirects", "3",
               str(SCRIPTS / "exit_code.py"), str(codes), "configs/demo.yaml",
               *_overrides(_data(backend, request), tmp_path, "dist", backend)], tmp_path)
    job.wait_for_training(run_dir)
    job.signal_group(sig, every_process=True)
    job.finish()  # the launcher's own status is the launcher's (it re-raises the signal it got): not asserted
    expected = 0 if sig == signal.SIGTERM else 130
    assert [int((codes / f"rank{r}").read_text()) for r in (0, 1)] == [expected, expected]
    outs = {r: next(logs.rglob(f"attempt_0/{r}/stdout.log")).read_text() for r in (0, 1)}
    errs = {r: next(logs.rglob(f"attempt_0/{r}/stderr.log")).read_text() for r in (0, 1)}
    for r in (0, 1):
        _assert_clean(errs[r])
    _assert_preempted(run_dir, outs[0], name)
    assert "preempted" not in outs[1]  # rank 0 reports for the job
    assert sum("checkpointed step" in errs[r] for r in (0, 1)) == 1
    assert (run_dir / "checkpoints" / "PREEMPTED").exists() == (sig == signal.SIGTERM)
