"""Atomic checkpoints through ``accelerator.save_state`` and resume that survives a kill mid-write.

Layout: ``RUN/checkpoints/step_00000123/`` (complete ones only) plus a ``COMPLETE`` marker written last. A save goes
to ``.tmp-step_.../`` first and is renamed by the main process after every rank has written its part, so a SIGKILL
at any moment leaves either the old set of checkpoints or the old set plus one complete new one -- never a half one
under a real name. ``--resume auto`` walks complete checkpoints newest first and falls back, with a warning, past
one that fails to load.

What a checkpoint holds (``accelerator.save_state`` + the objects the Trainer registers): model, classifier
optimiser, LR scheduler, GradScaler (fp16), every rank's RNG states, and -- saved by the main process, identical on
every rank -- ``TrainState`` (step/epoch/history), the train and meta stream positions and the meta-reweighter
(φ and its Adam state). Under DeepSpeed the engine writes its own (per-rank, ZeRO-partitioned) files.

``FaultInjection`` is a test hook (``METALOSS_TEST_FAULT``) that lets the crash-consistency tests kill a real
training process at an exact point; it does nothing unless that variable is set.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from common.errors import UserError

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
PREEMPTED = "PREEMPTED"  # in RUN/checkpoints/: the run stopped on SIGTERM with a checkpoint (removed on resume)


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint (or a write that failed, e.g. disk full); names the path."""


class TrainState:
    """Loop position and fault counters; registered with Accelerate so it travels in every checkpoint."""

    def __init__(self, world_size: int = 1):
        self.step = 0          # real optimisation steps done
        self.epoch = 0         # current epoch (0-based)
        self.world_size = world_size  # ranks that wrote the state: stream positions are per-rank shard positions
        self.history: list[dict] = []
        self.step_history: list[dict] = []
        self.bad_steps = 0
        self.images_seen = 0
        self.train_seconds = 0.0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def mark_preempted(run_dir: Path, step: int) -> None:
    """A pre-empted run exits 0 like a finished one; this file is how a requeue script tells them apart."""
    path = checkpoint_dir(run_dir) / PREEMPTED
    path.write_text(json.dumps({"step": step, "signal": "SIGTERM"}) + "\n")
    _fsync_path(path)


def clear_preempted(run_dir: Path) -> None:
    (checkpoint_dir(run_dir) / PREEMPTED).unlink(missing_ok=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / MARKER).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]), reverse=True)


def save_checkpoint(accelerator, run_dir: Path, step: int, keep_last: int, before_rename=None) -> Path:
    """Every rank calls this (save_state is collective under DeepSpeed, and each rank saves its own RNG state)."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):  # left by a kill mid-write: never loaded, only in the way
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=False)
    except OSError as e:
        # disk full or similar: the previous checkpoints are untouched; drop the partial one and say where
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {tmp}: {e}; previous checkpoints are kept") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)  # the data must be on disk before the marker and the rename say it is complete
        (tmp / MARKER).write_text(json.dumps({"step": step, "world_size": accelerator.num_processes}))
        _fsync_path(tmp)
        if before_rename is not None:  # test hook: lets a test kill the process at this exact point
            before_rename(tmp)
        old = None
        if final.exists():  # same step saved twice (epoch end on an every_steps boundary): keep it until replaced
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_path(root)
        for old in list_checkpoints(run_dir)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` (written by any rank on this file system) and the directories holding them."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _fsync_path(path: Path) -> None:
    """Best effort: some file systems (and directories on some OSes) refuse fsync; that must not fail a save."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def resolve_resume(run_dir: Path, resume: str | None) -> list[Path]:
    """Candidates to try in order: ``auto`` -> complete checkpoints newest first; a path -> just that one."""
    if not resume:
        return []
    if resume == "auto":
        return list_checkpoints(run_dir)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
    if not (path / MARKER).is_file():
        raise CheckpointError(f"--resume {resume}: checkpoint is incomplete (no {MARKER} marker)")
    return [path]


def written_by_ranks(path: Path) -> int | None:
    """How many ranks wrote the checkpoint (from its marker); None for a marker without the field."""
    try:
        return int(json.loads((Path(path) / MARKER).read_text()).get("world_size"))
    except (OSError, ValueError, TypeError):
        return None


def load_latest(accelerator, candidates: list[Path]) -> Path | None:
    """Load the first candidate that loads; warn about (and skip) broken ones. None when there is none."""
    for path in candidates:
        try:
            accelerator.load_state(str(path))
            return path
        except Exception as e:  # a truncated/corrupt file can raise anything from pickle, zip or safetensors
            log.warning("checkpoint %s is unreadable (%s: %s); trying the one before", path, type(e).__name__, e)
    if candidates:
        error = CheckpointError(f"no loadable checkpoint among {[str(c) for c in candidates]}")
        error.same_on_every_rank = False  # each rank loads its own RNG (and ZeRO) files: it may be this rank alone
        raise error
    return None


class FaultInjection:
    """Test hook: ``METALOSS_TEST_FAULT=ACTION:STEP[@RANK]`` kills or signals this process at an exact point.

    ``kill_after_step:N``   SIGKILL once step N (and its checkpoint, if one is due) is done -- a crash mid-epoch;
    ``term_after_step:N``   SIGTERM at the same point -- a pre-emption, through the real signal handler;
    ``hang_after_step:N``   sleep for a minute at the same point -- a stuck step (signals still reach the handler);
    ``kill_before_rename:N`` SIGKILL inside the checkpoint of step N, after every file is written but before the
                            rename that publishes it -- the worst moment for a checkpoint write;
    ``term_during_start:0`` SIGTERM while the trainer is being built (run dir written, training not started) -- a
                            pre-emption during a long start-up.
    ``@RANK`` limits it to one rank (default: every rank). Unset (always, outside tests): every method is a no-op.
    """

    ACTIONS = ("kill_after_step", "term_after_step", "hang_after_step", "kill_before_rename", "term_during_start")

    def __init__(self, spec: str | None, rank: int):
        self.action, self.step = None, -1
        if not spec:
            return
        try:
            action, rest = spec.split(":", 1)
            step, _, only_rank = rest.partition("@")
            self.step = int(step)
            if only_rank and int(only_rank) != rank:
                return
        except ValueError:
            raise ValueError(f"METALOSS_TEST_FAULT={spec!r}: expected ACTION:STEP[@RANK]") from None
        if action not in self.ACTIONS:
            raise ValueError(f"METALOSS_TEST_FAULT={spec!r}: action must be one of {', '.join(self.ACTIONS)}")
        self.action = action

    @classmethod
    def from_env(cls, rank: int) -> "FaultInjection":
        return cls(os.environ.get("METALOSS_TEST_FAULT"), rank)

    def during_start(self) -> None:
        if self.action == "term_during_start":
            os.kill(os.getpid(), signal.SIGTERM)

    def after_step(self, step: int) -> None:
        if step != self.step:
            return
        if self.action == "kill_after_step":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.action == "term_after_step":
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.action == "hang_after_step":
            time.sleep(60)

    def before_rename(self, step: int):
        if self.action == "kill_before_rename" and step == self.step:
            return lambda tmp: os.kill(os.getpid(), signal.SIGKILL)
        return None
