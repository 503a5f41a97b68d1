"""User-facing errors: one line on stderr and exit code 2; the traceback only with --debug."""
from __future__ import annotations

import errno
import functools
import logging
import os
import re
import sys

from common.errors import UserError

# OSErrors about the machine, not the program: the user fixes them (free space, permissions), a traceback won't help
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# torch's DataLoader re-raises a worker's exception with the worker's traceback inside the message
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Stopped): ")


class UsageError(UserError):
    """A command-line value the parser cannot check by itself (e.g. a limit defined by a package)."""


def is_user_error(e: BaseException) -> bool:
    """Every layer's user errors subclass ``common.errors.UserError``; a missing input file is one too."""
    if isinstance(e, (UserError, FileNotFoundError)):
        return True
    return isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS


def user_message(e: BaseException) -> str:
    """The message a user sees: the exception's own text, without a worker's traceback wrapped into it.

    A DataLoader worker's DataError arrives as "Caught DataError in DataLoader worker process 0.\\nOriginal
    Traceback ...\\ndata_pipeline.records.DataError: <message>": the user gets <message> (the traceback, with
    --debug). Everything else is passed through; a message that is only whitespace becomes the class name."""
    msg = str(e).strip()
    if _WORKER_TRACEBACK in msg:
        tail = msg.split(_WORKER_TRACEBACK, 1)[1]
        # the last "pkg.Class: message" line of the traceback starts the original message (which may be multi-line)
        starts = [m.start() for m in re.finditer(_EXCEPTION_LINE.pattern, tail, flags=re.M)]
        if starts:
            msg = _EXCEPTION_LINE.sub("", tail[starts[-1]:].strip(), count=1)
    if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS and e.filename:
        # "[Errno 28] No space left on device: '/x'" -> name the file first, as every other error does
        msg = f"cannot write {e.filename}: {e.strerror}" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) \
            else f"{e.filename}: {e.strerror}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            msg += " (disk full: free some space or choose another output folder, then run the same command again)"
    return msg or type(e).__name__


def setup_logging(debug: bool = False) -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("matplotlib", "PIL", "urllib3", "DeepSpeed", "torch.distributed", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_EXIT_KEY = "metaloss/user_error_exits"
_EXIT_WAIT_S = 30.0


def _leave_process_group(every_rank: bool) -> None:
    """Leave the job so that every rank exits 2 by itself, without an abort.

    The launcher SIGTERMs the other workers as soon as one exits non-zero: a rank still on its way out would die of
    that signal (exit -15) instead of reporting 2. So a rank that is exiting ignores SIGTERM, and when every rank
    raised the error, rank 0 leaves last (counted on the launcher's store). Then the process group is torn down:
    exiting with a live gloo/nccl group lets its C++ threads be destroyed unjoined ("terminate called without an
    active exception", SIGABRT).
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return
    import signal
    import time

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if every_rank:
            store = dist.distributed_c10d._get_default_store()
            store.add(_EXIT_KEY, 1)
            if dist.get_rank() == 0:
                deadline = time.monotonic() + _EXIT_WAIT_S
                while store.add(_EXIT_KEY, 0) < dist.get_world_size() and time.monotonic() < deadline:
                    time.sleep(0.05)
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 -- best effort on the way out; the user error is what matters
        pass


def user_errors_exit(fn):
    """Decorator for CLI entry points: known user errors -> one message + exit 2 (traceback with debug=True).

    Under a launcher every rank exits 2, but an error every rank raised alike (``same_on_every_rank``: a config,
    a run dir, a data set all ranks read) is reported by rank 0 alone; a rank's own error names the rank."""
    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        try:
            return fn(*args, debug=debug, **kwargs)
        except Exception as e:
            if debug or not is_user_error(e):
                raise
            rank = int(os.environ.get("RANK", "0") or 0)
            every_rank = bool(getattr(e, "same_on_every_rank", False))
            if rank == 0:
                print(f"metaloss: error: {user_message(e)}", file=sys.stderr)
            elif not every_rank:
                print(f"metaloss: error: [rank {rank}] {user_message(e)}", file=sys.stderr)
            sys.stderr.flush()
            _leave_process_group(every_rank)
            sys.exit(2)
    return wrapper
