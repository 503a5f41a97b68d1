"""Run a study's runs locally, one process each, in sequence -- resumable, and safe to kill at any moment.

Per run: a run dir with ``metrics.json`` is finished and skipped; anything else starts (or continues) with
``python -m launch.train BASE overrides --resume auto`` -- the trainer's own resume: from the newest complete
checkpoint, or a fresh start when there is none. A failed run is recorded (``study/status.json``: exit code, the
error line, the log file) and the study goes on with the next one. SIGTERM/SIGINT to the study is forwarded to the
running child, which checkpoints at the next step boundary and exits; the study records it as interrupted and
stops. A kill -9 of the study still stops the child (PR_SET_PDEATHSIG sends it SIGTERM), and a second study
process on the same out dir is refused (an flock), so two processes never train the same run dir.
"""
from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common.atomic import atomic_write_text
from common.errors import UserError
from launch.study.spec import RunSpec, Study

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
LOCK_FILE = ".lock"
_PR_SET_PDEATHSIG = 1


class StudyBusy(UserError, RuntimeError):
    """Another study process holds this out dir."""


def is_finished(run_dir: Path) -> bool:
    try:
        return "test" in json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return False


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the study process dies, so a killed study leaves no orphan training."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the study's own SIGTERM handler still forwards the signal
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(study: Study, run: RunSpec) -> list[str]:
    py = sys.executable
    if run.control_of:  # the CE control of a finished meta run: its own config, lr scaled (trainer/comparison)
        meta_dir = study.runs_dir / run.control_of
        train = ["-m", "launch.train", str(meta_dir / "config.yaml"), "--control-of", str(meta_dir),
                 f"run.name={run.name}", "--resume", "auto", "--quiet"]
    else:
        train = ["-m", "launch.train", str(study.base), *study.overrides(run), "--resume", "auto", "--quiet"]
    if run.world_size == 1:
        return [py, *train]
    return [py, "-m", "torch.distributed.run", "--nproc_per_node", str(run.world_size), "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), *train]


def _error_line(log_path: Path) -> str:
    """The user-facing error of a failed run: the `metaloss: error:` line, else the last non-empty log line."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("metaloss: error:")]
    return (errors[-1] if errors else lines[-1] if lines else "")[:500]


class StudyRunner:
    def __init__(self, study: Study, *, retry_failed: bool = False, after_run=None):
        self.study = study
        self.retry_failed = retry_failed
        self.after_run = after_run  # called with (run, run_dir) once a run has finished (hparams logging)
        self.status_path = study.state_dir / STATUS_FILE
        self.status: dict[str, dict] = {}
        self.child: subprocess.Popen | None = None
        self.stop_signal: int | None = None

    # --- state ------------------------------------------------------------------------------------------------------
    def _load_status(self) -> None:
        try:
            self.status = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            self.status = {}

    def _save_status(self) -> None:
        atomic_write_text(self.status_path, json.dumps(self.status, indent=2, sort_keys=True) + "\n")

    def _record(self, run: RunSpec, **fields) -> None:
        entry = self.status.setdefault(run.name, {"attempts": 0})
        entry.update(fields)
        self._save_status()

    # --- signals ----------------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum
        if self.child is not None and self.child.poll() is None:
            log.warning("study: signal %d, asking the running training (pid %d) to checkpoint and stop", signum,
                        self.child.pid)
            self.child.send_signal(signal.SIGTERM)

    # --- the loop ---------------------------------------------------------------------------------------------------
    def run(self, runs: list[RunSpec] | None = None) -> dict[str, dict]:
        """The study's runs (or ``runs``, e.g. the controls chosen after them), in order."""
        runs = self.study.runs if runs is None else runs
        self.study.state_dir.mkdir(parents=True, exist_ok=True)
        (self.study.state_dir / "logs").mkdir(exist_ok=True)
        lock = open(self.study.state_dir / LOCK_FILE, "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise StudyBusy(f"{self.study.out}: another `metaloss study` is running on this out dir; wait for it or "
                            "stop it (SIGTERM) first") from None
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._load_status()
            for i, run in enumerate(runs, 1):
                if self.stop_signal is not None:
                    break
                self._one(run, i, len(runs))
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            lock.close()
        return self.status

    def _one(self, run: RunSpec, index: int, total: int) -> None:
        run_dir = self.study.runs_dir / run.name
        entry = self.status.get(run.name, {})
        if is_finished(run_dir):
            if entry.get("status") != "done":  # finished before the status could say so (killed in between)
                self._record(run, status="done", error="")
            log.info("study [%d/%d] %s: finished, skipped", index, total, run.name)
            return
        if entry.get("status") == "failed" and not self.retry_failed:
            log.warning("study [%d/%d] %s: failed before (%s), skipped (--retry-failed runs it again)", index,
                        total, run.name, entry.get("error", ""))
            return
        resuming = run_dir.is_dir() and (run_dir / "checkpoints").is_dir()
        log.info("study [%d/%d] %s: %s", index, total, run.name, "resuming" if resuming else "starting")
        log_path = self.study.state_dir / "logs" / f"{run.name}.log"
        self._record(run, status="running", attempts=entry.get("attempts", 0) + 1, log=str(log_path),
                     world_size=run.world_size)
        t0 = time.time()
        with open(log_path, "a") as log_file:
            log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(train_command(self.study, run))}\n")
            log_file.flush()
            self.child = subprocess.Popen(train_command(self.study, run), stdout=log_file, stderr=subprocess.STDOUT,
                                          preexec_fn=_die_with_parent)
            if self.stop_signal is not None:  # the signal arrived between the check above and the start
                self.child.send_signal(signal.SIGTERM)
            rc = self.child.wait()
            self.child = None
        wall = round(time.time() - t0, 3)
        wall_total = round(entry.get("wall_s", 0.0) + wall, 3)
        if is_finished(run_dir):
            self._record(run, status="done", error="", exit_code=rc, wall_s=wall_total)
            if self.after_run is not None:
                try:
                    self.after_run(run, run_dir)
                except Exception as e:  # noqa: BLE001 -- bookkeeping (hparams) must not stop the study
                    log.warning("study: %s finished, but its post-run step failed: %s", run.name, e)
            log.info("study [%d/%d] %s: done in %.0f s", index, total, run.name, wall)
        elif self.stop_signal is not None or rc == 0:  # rc 0 without metrics: the training was pre-empted
            self._record(run, status="interrupted", error="", exit_code=rc, wall_s=wall_total)
            log.warning("study [%d/%d] %s: interrupted; run the same command to continue from its checkpoint",
                        index, total, run.name)
        else:
            error = _error_line(log_path) or f"exit code {rc}"
            self._record(run, status="failed", error=error, exit_code=rc, wall_s=wall_total)
            log.error("study [%d/%d] %s: failed (exit %d): %s -- the study goes on; log: %s", index, total,
                      run.name, rc, error, log_path)
