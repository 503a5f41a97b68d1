"""launch/trainer_wheels.py: which wheels a torch-only GPU host needs (closure of the trainer's imports minus what
ships with torch), and the part format launch/gpu_checks.py assembles."""
from __future__ import annotations

import zipfile

import launch.trainer_wheels as tw
from launch.gpu_checks import assemble_wheels


def test_closure_pins_installed_versions_and_leaves_out_what_the_host_has():
    pins = tw.closure(["accelerate", "scikit-learn"])
    assert {"accelerate", "huggingface-hub", "psutil", "safetensors", "scikit-learn", "scipy", "joblib"} <= set(pins)
    assert not {"torch", "numpy", "triton"} & set(pins) and not any(k.startswith("nvidia-") for k in pins)
    import importlib.metadata as md
    assert pins["accelerate"] == md.version("accelerate")


def test_split_parts_reassemble_with_the_harness(tmp_path, monkeypatch):
    monkeypatch.setattr(tw, "PART_BYTES", 300)  # several parts from two tiny wheels
    wheels = []
    for name in ("alpha", "beta"):
        path = tmp_path / f"{name}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"{name}/__init__.py", "x = 1\n" * 40)
        wheels.append(path)
    parts = tw.split_tar(wheels, tmp_path / "carried")
    assert len(parts) > 2
    got = assemble_wheels(tmp_path / "carried", tmp_path / "work")
    assert sorted(w.name for w in got) == sorted(w.name for w in wheels)
    assert all(g.read_bytes() == w.read_bytes() for g, w in zip(sorted(got), sorted(wheels)))
