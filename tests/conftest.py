"""Shared fixtures: a small synthetic fundus set (generated once per session) and CLI helpers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ("dali_fixtures",)  # the `records` fixture of the DALI tests
# keep each test process from grabbing every core: the suite runs on 2-core CI machines
os.environ.setdefault("OMP_NUM_THREADS", "2")


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


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """120 synthetic fundus images at 64 px in the APTOS layout (every class >= 3 samples)."""
    from data_pipeline.synth import generate_synthetic

    out = tmp_path_factory.mktemp("synth") / "aptos"
    generate_synthetic(out, n=120, size=64, seed=0, workers=2, progress=False)
    return out


def tiny_overrides(data_dir: Path, out_dir: Path, name: str, *extra: str) -> list[str]:
    """A run that takes seconds on CPU: tiny CNN, 32 px, few steps."""
    return [f"data.root={data_dir}", "data.format=aptos", "data.backend=torch", "data.image_size=32",
            "data.num_workers=0", "model.arch=tiny", f"run.out_dir={out_dir}", f"run.name={name}",
            "train.batch_size=8", "train.eval_batch_size=16", "train.epochs=2", "train.cpu=true",
            "logging.every_steps=2", *extra]
