"""A user error under torchrun: one line (from rank 0), every rank exits 2 by itself, no abort, no traceback.

torchrun's own summary (``ChildFailedError`` with each worker's exit code, and the launcher's traceback) is the
launcher's and is printed whenever a worker exits non-zero; the test reads the workers' own output from
``--log-dir``/``--redirects`` and their exit codes from that summary (-15 would be a worker the launcher had to
SIGTERM, -6 an abort).
"""
import re
import subprocess
import sys

import pytest

from tests.support.cli import tiny_overrides
from tests.support.dist import REPO, free_port, subprocess_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_a_user_error_under_torchrun_is_one_line_and_exit_2_on_every_rank(synth_dir, tmp_path):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "metrics.json").write_text("{}")  # a finished run of that name: refused without flags
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--log-dir", str(logs), "--redirects", "3",
           "-m", "launch.train", "configs/demo.yaml", *tiny_overrides(synth_dir, tmp_path, "done")]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    codes = [int(c) for c in re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", proc.stderr, flags=re.M)]
    assert sorted(codes) == [2, 2], proc.stderr[-3000:]  # each rank exited 2 itself: not -15 (killed), not -6
    err = {r: next(logs.rglob(f"attempt_0/{r}/stderr.log")).read_text() for r in (0, 1)}
    lines = [ln for ln in err[0].splitlines() if ln.startswith("metaloss: error:")]
    assert len(lines) == 1 and "already exists" in lines[0], err[0]
    assert "metaloss: error" not in err[1]
    for text in err.values():
        assert "Traceback" not in text and "terminate called" not in text, text
