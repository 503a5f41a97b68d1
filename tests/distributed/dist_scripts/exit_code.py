"""``exit_code.py DIR CONFIG [overrides...]``: run ``launch.train`` and write this rank's exit status to DIR/rank<R>.

torchrun does not report its workers' exit codes after it was signalled itself (it re-raises the signal), so the
signal tests read them from here. The training runs in this process, exactly as ``python -m launch.train`` would.
"""
import os
import sys
from pathlib import Path

out = Path(sys.argv[1])
code = 1  # an exception escaping main (a bug, not a user error) -- Python's own status for it
try:
    from launch.train import main

    code = main(sys.argv[2:])
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
finally:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ.get('RANK', '0')}").write_text(str(code))
sys.exit(code)
