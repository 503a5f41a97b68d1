"""Carry the trainer's Python dependencies to a GPU host that has torch but no package registry.

    python -m launch.trainer_wheels OUTDIR [--python-version 3.12] [--with deepspeed,transformers,tensorboard]

The companion of ``../shared/gpu/dali_wheels.sh`` (DALI only): the same output -- a tar of wheels split into parts of
at most 58 MiB (OUTDIR/part1..partN) and OUTDIR/SHA256 -- so ``launch/gpu_checks.sh`` installs both
(``WHEELS_DIR="dali_whl trainer_whl"``). Which wheels: the closure of what the trainer imports, as installed in THIS
environment (so the versions are ones known to work together), minus what the GPU host already has with torch
(torch, torchvision, triton, the nvidia-* CUDA libraries, numpy, pillow and their own dependencies, listed in
``HOST_HAS``), each pinned to its installed version and downloaded with ``--no-deps --only-binary=:all:`` for the
host's Python (default 3.12, what dali_wheels.sh fetches). Packages published only as source (deepspeed) are built
into a wheel here first (``pip wheel --no-deps --no-build-isolation``).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOTS = ("accelerate", "pyyaml", "tqdm", "scikit-learn", "matplotlib")
OPTIONAL = ("deepspeed", "transformers", "tensorboard")
HOST_HAS = ("torch", "torchvision", "triton", "numpy", "pillow", "filelock", "fsspec", "jinja2", "markupsafe",
            "networkx", "sympy", "mpmath", "typing-extensions", "setuptools")
SOURCE_ONLY = ("deepspeed",)
PART_BYTES = 58 * 2**20
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str], exclude: tuple[str, ...] = HOST_HAS) -> dict[str, str]:
    """{distribution: installed version} for ``roots`` and everything they require (markers evaluated for this
    interpreter on Linux, extras ignored), leaving out ``exclude`` and the nvidia-* CUDA wheels."""
    from packaging.requirements import Requirement

    skip = {_norm(x) for x in exclude}
    out: dict[str, str] = {}
    todo = [_norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in out or name in skip or name.startswith("nvidia-"):
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed here: install the project's requirements first") from None
        out[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": "", "sys_platform": "linux",
                                                          "platform_system": "Linux"}):
                todo.append(_norm(req.name))
    return dict(sorted(out.items()))


def split_tar(wheels: list[Path], out: Path) -> list[Path]:
    """dali_wheels.sh's format: w.tar of the wheels, split into part1..partN, SHA256 of the whole tar."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "w.tar"
        with tarfile.open(tar, "w") as t:
            for w in wheels:
                t.add(w, arcname=w.name)
        data = tar.read_bytes()
    parts = []
    for i in range(0, len(data), PART_BYTES):
        part = out / f"part{len(parts) + 1}"
        part.write_bytes(data[i:i + PART_BYTES])
        parts.append(part)
    (out / "SHA256").write_text(f"{hashlib.sha256(data).hexdigest()}  w.tar\n")
    return parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.trainer_wheels", description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--python-version", default="3.12")
    ap.add_argument("--with", dest="extra", default="", help=f"also: comma-separated from {','.join(OPTIONAL)}")
    ap.add_argument("--list", action="store_true", help="print the pinned list and stop (no download)")
    args = ap.parse_args(argv)
    extra = [x for x in args.extra.split(",") if x]
    pins = closure(list(ROOTS) + extra)
    if args.list:
        print("\n".join(f"{k}=={v}" for k, v in pins.items()))
        return 0
    py = args.python_version
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    with tempfile.TemporaryDirectory() as tmp:
        binary = [f"{k}=={v}" for k, v in pins.items() if k not in SOURCE_ONLY]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", py, "--implementation", "cp", *plat, "-d", tmp, *binary], check=True)
        for name in (k for k in pins if k in SOURCE_ONLY):  # pure Python once built (DS_BUILD_OPS=0)
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", tmp, f"{name}=={pins[name]}"], check=True)
        parts = split_tar(sorted(Path(tmp).glob("*.whl")), args.out)
    print(f"{len(pins)} wheels in {len(parts)} part(s) under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
