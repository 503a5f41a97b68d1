"""Shared fixtures: a small synthetic fundus set (generated once per session) and the DALI test images.

Helpers are plain modules under ``tests/support`` (``from tests.support.cli import run_cli``); tests are grouped
by layer: ``unit/``, ``integration/`` (CLI end to end), ``distributed/`` (real processes, with their scripts).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.dali_fixtures import records  # noqa: F401 -- the `records` fixture of the DALI tests

# keep each test process from grabbing every core: the suite runs on 2-core CI machines
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """120 synthetic fundus images at 64 px in the APTOS layout (every class >= 3 samples)."""
    from data_pipeline.synth import generate_synthetic

    out = tmp_path_factory.mktemp("synth") / "aptos"
    generate_synthetic(out, n=120, size=64, seed=0, workers=2, progress=False)
    return out
