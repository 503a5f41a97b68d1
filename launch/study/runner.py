"""Run a study's runs locally, one process each, ``--jobs`` at a time -- resumable, and safe to kill at any moment.

Per run: a run dir with ``metrics.json`` is finished and skipped; anything else starts (or continues) with
``python -m launch.train BASE overrides --resume auto`` -- the trainer's own resume: from the newest complete
checkpoint, or a fresh start when there is none. A failed run is recorded (``study/status.json``: exit code, the
error line, the log file) and the study goes on with the next one. SIGTERM/SIGINT to the study is forwarded to the
running children, which checkpoint at the next step boundary and exit; the study records them as interrupted and
stops. A kill -9 of the study still stops the child (PR_SET_PDEATHSIG sends it SIGTERM), and a second study
process on the same out dir is refused (an flock), so two processes never train the same run dir. With ``--jobs N``
each concurrent run gets its own GPUs (CUDA_VISIBLE_DEVICES) or its share of the CPU threads (OMP_NUM_THREADS).
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
from dataclasses import dataclass
from pathlib import Path
from typing import IO

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


@dataclass
class _Running:
    """One training child in flight, and what finishing it needs."""
    run: RunSpec
    index: int
    total: int
    slot: int
    child: subprocess.Popen
    log_file: IO[str]
    log_path: Path
    started: float
    wall_before: float  # wall seconds of earlier attempts (a resumed run adds to them)
    stopped: bool = False  # SIGTERM already forwarded to it


def usable_cpus() -> int:
    """The cores this process may run on (SLURM, taskset and cgroups restrict it below os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def runs_use_gpus(study: Study, runs: list[RunSpec]) -> bool:
    """Whether any run trains on a GPU (a config with train.cpu=true never does, even on a GPU node)."""
    from trainer.config import load_config

    # a control run carries its meta run's cell, so the same overrides give its device too
    return any(not load_config(study.base, study.overrides(r)).train.cpu for r in runs)


def visible_gpus() -> list[str]:
    """The GPU ids children may use: CUDA_VISIBLE_DEVICES when set, else every device torch sees (none on CPU)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in (x.strip() for x in env.split(",")) if d and d != "-1"]
    try:
        import torch  # only for --jobs > 1: the study process itself never touches a GPU
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 -- no torch/driver: a CPU node
        return []


def slot_environments(jobs: int, runs: list[RunSpec], gpus: list[str], cpus: int) -> list[dict[str, str]]:
    """Per slot, the environment changes that keep ``jobs`` concurrent runs off each other's hardware.

    GPU runs: each slot owns a disjoint block of ``gpus`` (CUDA_VISIBLE_DEVICES), big enough for the widest run.
    CPU runs (``gpus`` empty): each process gets cpus // (jobs x the widest run's ranks) intra-op threads
    (OMP_NUM_THREADS), unless the user set it -- runs each spinning a thread per core would oversubscribe the node
    and run slower together than one after the other.
    """
    if jobs == 1:
        return [{}]
    widest = max((r.world_size for r in runs), default=1)
    if gpus:
        per_slot = len(gpus) // jobs
        if per_slot < widest:
            raise UserError(f"--jobs {jobs}: {len(gpus)} visible GPU(s) cannot give each of {jobs} concurrent runs "
                            f"the {widest} GPU(s) its widest run needs; use --jobs {max(1, len(gpus) // widest)}")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[s * per_slot:(s + 1) * per_slot])} for s in range(jobs)]
    if "OMP_NUM_THREADS" in os.environ:
        return [{} for _ in range(jobs)]
    threads = str(max(1, cpus // (jobs * widest)))
    return [{"OMP_NUM_THREADS": threads} for _ in range(jobs)]


class StudyRunner:
    def __init__(self, study: Study, *, retry_failed: bool = False, after_run=None, jobs: int = 1):
        if jobs < 1:
            raise UserError(f"--jobs {jobs}: needs at least 1 (runs at a time)")
        self.study = study
        self.retry_failed = retry_failed
        self.after_run = after_run  # called with (run, run_dir) once a run has finished (hparams logging)
        self.jobs = jobs
        self.status_path = study.state_dir / STATUS_FILE
        self.status: dict[str, dict] = {}
        self.running: list[_Running] = []
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
        self._forward_stop()

    # --- the loop ---------------------------------------------------------------------------------------------------
    def run(self, runs: list[RunSpec] | None = None) -> dict[str, dict]:
        """The study's runs (or ``runs``, e.g. the controls chosen after them), in order, ``jobs`` at a time."""
        runs = self.study.runs if runs is None else runs
        gpus = visible_gpus() if self.jobs > 1 and runs_use_gpus(self.study, runs) else []
        envs = slot_environments(self.jobs, runs, gpus, usable_cpus())
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
            queue = list(enumerate(runs, 1))
            free = list(range(len(envs)))
            while True:
                while queue and free and self.stop_signal is None:
                    index, run = queue.pop(0)
                    if self._start(run, index, len(runs), free[0], envs[free[0]]):
                        free.pop(0)
                if not self.running:
                    break
                for r in self._reap():
                    self._finish(r)
                    free.append(r.slot)
        finally:
            self._stop_children()  # only after an exception: a normal exit has reaped every child
            for s, handler in previous.items():
                signal.signal(s, handler)
            lock.close()
        return self.status

    def _forward_stop(self) -> None:
        """SIGTERM to every child not yet told (also one started just as the signal arrived)."""
        for r in self.running:
            if not r.stopped and r.child.poll() is None:
                log.warning("study: signal %d, asking the running training %s (pid %d) to checkpoint and stop",
                            self.stop_signal, r.run.name, r.child.pid)
                r.child.send_signal(signal.SIGTERM)
                r.stopped = True

    def _stop_children(self) -> None:
        """An error in the study itself: no trainer may outlive the lock (a re-run would train the same run dir)."""
        for r in self.running:
            if r.child.poll() is None:
                r.child.send_signal(signal.SIGTERM)
        for r in self.running:
            try:
                r.child.wait(timeout=120)  # a checkpoint at the next step boundary, then exit
            except subprocess.TimeoutExpired:
                r.child.kill()
                r.child.wait()
            r.log_file.close()
        self.running = []

    def _reap(self) -> list[_Running]:
        """Block until at least one child has exited; those children, out of ``self.running``."""
        while True:
            if self.stop_signal is not None:  # a child that joined after the handler ran
                self._forward_stop()
            done = [r for r in self.running if r.child.poll() is not None]
            if done:
                self.running = [r for r in self.running if r not in done]
                return done
            if len(self.running) == 1:
                try:  # one child: a plain wait (a signal handler runs during it, and the wait resumes)
                    self.running[0].child.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.2)

    def _start(self, run: RunSpec, index: int, total: int, slot: int, env: dict[str, str]) -> bool:
        """Start ``run`` in ``slot`` (added to ``self.running``); False when it is finished or failed before."""
        run_dir = self.study.runs_dir / run.name
        entry = self.status.get(run.name, {})
        if is_finished(run_dir):
            if entry.get("status") != "done":  # finished before the status could say so (killed in between)
                self._record(run, status="done", error="")
            log.info("study [%d/%d] %s: finished, skipped", index, total, run.name)
            return False
        if entry.get("status") == "failed" and not self.retry_failed:
            log.warning("study [%d/%d] %s: failed before (%s), skipped (--retry-failed runs it again)", index,
                        total, run.name, entry.get("error", ""))
            return False
        resuming = run_dir.is_dir() and (run_dir / "checkpoints").is_dir()
        where = f" (slot {slot}: {' '.join(f'{k}={v}' for k, v in env.items())})" if env else ""
        log.info("study [%d/%d] %s: %s%s", index, total, run.name, "resuming" if resuming else "starting", where)
        log_path = self.study.state_dir / "logs" / f"{run.name}.log"
        self._record(run, status="running", attempts=entry.get("attempts", 0) + 1, log=str(log_path),
                     world_size=run.world_size, started_at=round(time.time(), 3), slot_env=env, error="",
                     finished_at=None, exit_code=None)  # nothing of the previous attempt's ending
        command = train_command(self.study, run)
        log_file = open(log_path, "a")
        try:
            log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
            log_file.flush()
            child = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent, env={**os.environ, **env})
        except BaseException:
            log_file.close()
            raise
        # in self.running before the stop check: a signal from here on reaches it through _forward_stop
        self.running.append(_Running(run, index, total, slot, child, log_file, log_path, time.time(),
                                     entry.get("wall_s", 0.0)))
        if self.stop_signal is not None:  # the signal arrived between the loop's check and the start
            self._forward_stop()
        return True

    def _finish(self, r: _Running) -> None:
        r.log_file.close()
        run, index, total, rc = r.run, r.index, r.total, r.child.returncode
        run_dir = self.study.runs_dir / run.name
        now = time.time()
        wall = round(now - r.started, 3)
        wall_total = round(r.wall_before + wall, 3)
        self.status[run.name]["finished_at"] = round(now, 3)  # saved with the record below
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
            error = _error_line(r.log_path) or f"exit code {rc}"
            self._record(run, status="failed", error=error, exit_code=rc, wall_s=wall_total)
            log.error("study [%d/%d] %s: failed (exit %d): %s -- the study goes on; log: %s", index, total,
                      run.name, rc, error, r.log_path)
