"""The GPU check harness in CPU dry-run mode (launch/gpu_checks.sh --dry-run): every step runs (tiny model, DALI CPU
mode), the summary JSON holds each step's status and number, the carried-wheel path (split parts, checksum,
install) works, and bench train honours max_steps beyond one epoch. A GPU run uses the same code with ResNet-50."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.cli import REPO
from launch.gpu_checks import assemble_wheels, compatible
from launch.gpu_steps import DRY, SKIPPED_IN_DRY_RUN, STEPS


def _fake_wheel(folder: Path, name: str = "metaloss_fake_whl", tag: str = "py3-none-any") -> Path:
    path = folder / f"{name}-0.1-{tag}.whl"
    dist = f"{name}-0.1.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
             f"{dist}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n"}
    files[f"{dist}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def _carried(tmp_path: Path, parts: int) -> Path:
    """What ../shared/gpu/dali_wheels.sh makes: a tar of wheels split into part1..partN, and SHA256 of the tar."""
    src = tmp_path / "build"
    src.mkdir()
    _fake_wheel(src)
    subprocess.run(["tar", "cf", "w.tar", "metaloss_fake_whl-0.1-py3-none-any.whl"], cwd=src, check=True)
    data = (src / "w.tar").read_bytes()
    out = tmp_path / "carried"
    out.mkdir()
    size = -(-len(data) // parts)
    for i in range(parts):
        (out / f"part{i + 1}").write_bytes(data[i * size:(i + 1) * size])
    (out / "SHA256").write_text(f"{hashlib.sha256(data).hexdigest()}  w.tar\n")
    return out


def test_parts_are_joined_in_numeric_order_and_checked(tmp_path):
    carried = _carried(tmp_path, 11)  # part10 and part11 sort before part2 as text
    wheels = assemble_wheels(carried, tmp_path / "work")
    assert [w.name for w in wheels] == ["metaloss_fake_whl-0.1-py3-none-any.whl"]
    (carried / "part11").unlink()
    with pytest.raises(RuntimeError, match="do not match SHA256"):
        assemble_wheels(carried, tmp_path / "work2")


def test_wheels_for_another_python_are_reported_not_installed(tmp_path):
    ok = _fake_wheel(tmp_path)
    other = _fake_wheel(tmp_path, "other", "cp27-cp27mu-manylinux1_x86_64")
    assert compatible([ok, other]) == ([ok], [other])


@pytest.mark.slow
def test_dry_run_writes_a_summary_for_every_step(tmp_path):
    out, work = tmp_path / "gpu", tmp_path / "work"
    proc = subprocess.run(["bash", "launch/gpu_checks.sh", "--dry-run", "--work", str(work)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OUT": str(out), "PYTHON": sys.executable,
                                            "WHEELS_DIR": str(_carried(tmp_path, 3))})
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(steps) == ["wheels", *STEPS]
    for name, res in steps.items():
        expected = "SKIP" if name in SKIPPED_IN_DRY_RUN else "PASS"
        assert res["status"] == expected, (name, res)
        assert f"{expected:4s} {name}:" in proc.stdout  # each step prints its verdict and number
    assert (work / "site" / "metaloss_fake_whl" / "__init__.py").is_file()
    # a lent GPU machine ships back at most 8 files of $OUT: wheels, data and per-step files stay in the work dir
    assert sorted(p.name for p in out.rglob("*")) == sorted({"summary.json", "log.txt"} | (
        {"gpu.txt"} if (out / "gpu.txt").exists() else set()))
    # bench train runs max_steps, not one epoch: the DALI set is 8 batches per epoch, the run 12 steps
    for name in ("train_synthetic_a", "train_dali", "train_synthetic_b", "compile"):
        assert steps[name]["steps"] == DRY.steps and steps[name]["value"] > 0
        assert all(iv["step"] > DRY.warmup for iv in steps[name]["intervals"][-2:])
    synthetic = (steps["train_synthetic_a"]["value"] + steps["train_synthetic_b"]["value"]) / 2
    assert steps["dali_ratio"]["value"] == pytest.approx(steps["train_dali"]["value"] / synthetic, rel=1e-3)
    graphs = steps["compile"]["graphs_after_each_eval"]
    assert [s for s, _ in graphs] == ["meta", "test"] and graphs[0][1] == graphs[1][1] > 0
    assert steps["dali_decode"]["value"] == 0.0 and steps["grad_cosine"]["value"] > 0.999
    assert summary["failed"] == 0 and summary["passed"] == len(STEPS) + 1 - len(SKIPPED_IN_DRY_RUN)


@pytest.mark.slow
def test_a_hung_step_is_killed_reported_and_the_rest_still_runs(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "METALOSS_TEST_FAULT": "gpu_step_hang:env", "METALOSS_GPU_CHECKS_GRACE_S": "1"}
    proc = subprocess.run([sys.executable, "-m", "launch.gpu_checks", "--dry-run", "--out", str(out),
                           "--steps", "env,imports"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert proc.returncode == 1
    assert steps["env"]["status"] == "FAIL" and "over its time limit" in steps["env"]["error"]
    assert steps["imports"]["status"] == "PASS"  # a fresh step runner took over
