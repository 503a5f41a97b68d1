"""Disk full while `prepare` writes: a clear error naming the path, exit 2, earlier outputs intact and usable, no
temp files left, the same command resumes once there is space; --debug shows the traceback, the default does not.

The disk is filled by a `sitecustomize` module on PYTHONPATH that swaps `common.atomic`'s `os` for a proxy
whose `fdopen` returns a file that writes part of the data and then raises ENOSPC -- what a full disk does. Being
loaded at interpreter start-up, it is in force in prepare's worker processes too, whatever their start method.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from tests.support.cli import REPO, run_cli
from data_pipeline.synth import generate_synthetic

_SITECUSTOMIZE = textwrap.dedent('''
    import errno, os, types
    import common.atomic as atomic
    import data_pipeline.prepare as prepare

    _FAIL_ON = os.environ.get("METALOSS_TEST_ENOSPC")   # substring of the temp file name whose write fails
    _DIE_ON = os.environ.get("METALOSS_TEST_DIE")               # a source path substring that kills its worker

    class _FullDiskFile:
        def __init__(self, f):
            self._f = f
        def write(self, data):
            self._f.write(bytes(data[: len(data) // 2]))   # a partial write lands, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self._f.close()
        def __getattr__(self, name):
            return getattr(self._f, name)

    def _fdopen(fd, *args, **kwargs):
        f = os.fdopen(fd, *args, **kwargs)
        return _FullDiskFile(f) if _FAIL_ON and _FAIL_ON in os.readlink(f"/proc/self/fd/{fd}") else f

    proxy = types.ModuleType("os")
    proxy.__dict__.update(vars(os))
    proxy.fdopen = _fdopen
    atomic.os = proxy   # every atomic write of prepare (images, state, manifest, report) goes through it

    if _DIE_ON:   # the OOM killer, as far as the pool can tell
        _real_prepare_image = prepare.prepare_image
        def _dying_prepare_image(path, *args, **kwargs):
            if _DIE_ON in path:
                os._exit(137)
            return _real_prepare_image(path, *args, **kwargs)
        prepare.prepare_image = _dying_prepare_image
''')


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("disk") / "aptos"
    generate_synthetic(out, n=20, size=64, seed=3, workers=1, progress=False)
    return out


def _prepare(raw: Path, out: Path, size: int, fail_on: str | None, tmp: Path, *flags: str, die_on: str = ""):
    env = {}
    if fail_on is not None or die_on:
        site = tmp / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        env = {"PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "METALOSS_TEST_ENOSPC": fail_on or "",
               "METALOSS_TEST_DIE": die_on}
    return run_cli("-m", "launch.cli", "prepare", "--dataset", "aptos", "--src", str(raw), "--out", str(out),
                   "--workers", "2", "--size", str(size), "--quiet", *flags, env=env, check=False)


def _snapshot(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("metaloss: error:")]


def test_disk_full_on_an_image_leaves_the_previous_run_intact(raw, tmp_path):
    out = tmp_path / "prepared"
    assert _prepare(raw, out, 48, None, tmp_path).returncode == 0
    before = _snapshot(out)

    proc = _prepare(raw, out, 40, ".jpg.", tmp_path)   # a new size: every image must be rewritten
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = _error_lines(proc.stderr)
    assert f"cannot write {out / 'images'}/" in line and "No space left on device" in line, line
    assert _snapshot(out) == before   # manifest, report, state and every image byte-identical; no temp file
    with open(out / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            with Image.open(out / row["path"]) as im:
                assert min(im.size) == 48

    debug = _prepare(raw, out, 40, ".jpg.", tmp_path, "--debug")
    assert debug.returncode not in (0, 2)
    assert "Traceback" in debug.stderr and "No space left on device" in debug.stderr
    assert _snapshot(out) == before


def test_disk_full_on_the_manifest_names_it_and_the_rerun_resumes(raw, tmp_path):
    out = tmp_path / "prepared"
    proc = _prepare(raw, out, 48, ".manifest.csv.", tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = _error_lines(proc.stderr)
    assert f"cannot write {out / 'manifest.csv'}: No space left on device" in line
    assert not (out / "manifest.csv").exists()            # never half a manifest
    assert not [p for p in out.rglob("*.tmp")]
    n_images = len(list((out / "images").glob("*.jpg")))
    assert n_images == 20

    again = _prepare(raw, out, 48, None, tmp_path)         # space freed: the same command finishes the job
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["counts"]["skipped_existing"] == 20 and report["counts"]["written"] == 0
    with open(out / "manifest.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 20


def test_a_dying_worker_is_one_line_and_the_rerun_resumes(raw, tmp_path):
    out = tmp_path / "prepared"
    victim = sorted((raw / "train_images").glob("*.png"))[-1]
    proc = _prepare(raw, out, 48, None, tmp_path, die_on=victim.name)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = _error_lines(proc.stderr)
    assert "worker process died" in line and "re-run the same command" in line
    assert not (out / "manifest.csv").exists()
    again = _prepare(raw, out, 48, None, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["counts"]["written"] + report["counts"]["skipped_existing"] == 20
