"""User-facing errors: one line on stderr and exit code 2; the traceback only with --debug."""
from __future__ import annotations

import functools
import logging
import os
import sys

USER_ERRORS: tuple[type[BaseException], ...] = ()


def _user_errors() -> tuple[type[BaseException], ...]:
    # imported lazily so `metaloss --help` stays fast
    from data_pipeline.records import DataError
    from trainer.checkpoint import CheckpointError
    from trainer.config import ConfigError
    from trainer.models import ModelError
    from trainer.run_dir import RunDirError
    from trainer.report import ReportInputError
    from trainer.trainer import TrainingStopped

    return (DataError, ConfigError, ModelError, RunDirError, CheckpointError, TrainingStopped,
            ReportInputError, FileNotFoundError)


def setup_logging(debug: bool = False) -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("matplotlib", "PIL", "urllib3", "DeepSpeed", "torch.distributed", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def user_errors_exit(fn):
    """Decorator for CLI entry points: known user errors -> one line + exit 2 (traceback with debug=True)."""
    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        try:
            return fn(*args, debug=debug, **kwargs)
        except _user_errors() as e:
            if debug:
                raise
            msg = str(e).strip() or type(e).__name__
            print(f"metaloss: error: {msg}", file=sys.stderr)
            sys.exit(2)
    return wrapper
