"""Run the CLI the way a user would, and the config overrides of a run that takes seconds on a CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args`` the way a user would; returns the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-4000:]}")
    return proc


def tiny_overrides(data_dir: Path, out_dir: Path, name: str, *extra: str) -> list[str]:
    """A run that takes seconds on CPU: tiny CNN, 32 px, few steps."""
    return [f"data.root={data_dir}", "data.format=aptos", "data.backend=torch", "data.image_size=32",
            "data.num_workers=0", "model.arch=tiny", f"run.out_dir={out_dir}", f"run.name={name}",
            "train.batch_size=8", "train.eval_batch_size=16", "train.epochs=2", "train.cpu=true",
            "logging.every_steps=2", *extra]
