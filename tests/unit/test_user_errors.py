"""Every error a user can fix shares one base class, and the CLI turns exactly those into one line + exit 2."""
from __future__ import annotations

import errno

import pytest

from common.errors import UserError
from data_pipeline.image_ops import ImageError
from data_pipeline.prepare import PrepareAborted
from data_pipeline.records import DataError
from launch.errors import UsageError, is_user_error, user_errors_exit
from trainer.components.losses import LossError
from trainer.components.models import ModelError
from trainer.config import ConfigError
from trainer.engine.checkpoint import CheckpointError
from trainer.engine.run_dir import RunDirError
from trainer.engine.trainer import TrainingStopped
from trainer.reporting.report import ReportInputError

USER_ERRORS = (DataError, ImageError, PrepareAborted, ConfigError, ModelError, RunDirError, CheckpointError,
               ReportInputError, TrainingStopped, LossError, UsageError)


@pytest.mark.parametrize("cls", USER_ERRORS, ids=lambda c: c.__name__)
def test_user_errors_subclass_the_base_and_keep_their_builtin_base(cls):
    assert issubclass(cls, UserError)
    assert is_user_error(cls("x"))
    # callers that catch ValueError / RuntimeError still catch them
    assert issubclass(cls, (ValueError, RuntimeError)) or cls is UsageError


def test_bugs_are_not_user_errors():
    assert not is_user_error(ValueError("a bug"))
    assert not is_user_error(KeyError("k"))
    assert not is_user_error(OSError(errno.EIO, "I/O error"))
    assert is_user_error(FileNotFoundError("f"))
    assert is_user_error(OSError(errno.ENOSPC, "No space left on device"))


def test_cli_entry_point_prints_one_line_and_exits_2(capsys):
    @user_errors_exit
    def entry(*, debug=False):
        raise DataError("bad.csv: line 3: label 'x' is not an integer")

    with pytest.raises(SystemExit) as exit_info:
        entry()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "metaloss: error: bad.csv: line 3: label 'x' is not an integer\n"
