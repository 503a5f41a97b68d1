"""Check the Docker image without building it (needs the package registry and a minute; not part of `make test`).

    python launch/check_image.py [--dali-wheels ../shared/gpu/dali_wheels.sh] [--json out.json]

1. Every path the Dockerfile COPYs exists, and every package pyproject.toml ships is copied.
2. The Python version agrees: Dockerfile ``ARG PYTHON``, the README's Docker line, dali_wheels.sh's --python-version.
3. Every pin in requirements.txt has a binary wheel for that Python on manylinux x86-64 (``pip install --dry-run
   --no-deps --only-binary=:all: --python-version X.Y``, nothing downloaded but metadata); packages published only as
   source (deepspeed) are checked to exist as that version instead.
4. The pins resolve together for that Python, dependencies included (``pip install --dry-run --report``), with the
   source-only packages replaced by their declared dependencies (read from the installed distribution when present).
Exit 0 when all pass, 1 otherwise; each check prints PASS/FAIL and a reason.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_ONLY = ("deepspeed",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def check_copies(dockerfile: Path) -> tuple[bool, str]:
    missing, copied = [], set()
    for word, rest in _instructions(dockerfile):
        if word not in ("COPY", "ADD"):
            continue
        args = [a for a in rest.split() if not a.startswith("--")]
        for src in args[:-1]:
            copied.add(src.rstrip("/"))
            if not list(REPO.glob(src)):
                missing.append(src)
    pyproject = (REPO / "pyproject.toml").read_text()
    include = re.search(r"include\s*=\s*\[([^\]]*)\]", pyproject)
    packages = [p.strip(' "*') for p in include.group(1).split(",")] if include else []
    not_copied = [p for p in packages if p and (REPO / p).is_dir() and p not in copied]
    ok = not missing and not not_copied
    return ok, (f"{len(copied)} COPY sources exist, every package copied" if ok else
                f"missing COPY sources {missing}; packages not copied {not_copied}")


def python_version(dockerfile: Path) -> str | None:
    for word, rest in _instructions(dockerfile):
        if word == "ARG" and rest.startswith("PYTHON="):
            return rest.split("=", 1)[1]
    return None


def check_versions(py: str | None, dali_wheels: Path) -> tuple[bool, str]:
    problems = []
    if py is None:
        return False, "Dockerfile has no ARG PYTHON=X.Y"
    readme = (REPO / "README.md").read_text()
    if f"Docker image: Python {py}" not in readme:
        problems.append(f"README does not say 'Docker image: Python {py}'")
    if dali_wheels.is_file():
        found = re.search(r"--python-version\s+(\d+\.\d+)", dali_wheels.read_text())
        if not found or found.group(1) != py:
            problems.append(f"{dali_wheels} fetches wheels for Python {found.group(1) if found else '?'}")
    note = "" if dali_wheels.is_file() else f" ({dali_wheels} not found: not compared)"
    return not problems, ("; ".join(problems) if problems else f"Python {py} everywhere{note}")


def _pins() -> list[str]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


def _pip(args: list[str], py: str) -> subprocess.CompletedProcess:
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    abi = "cp" + py.replace(".", "")
    with tempfile.TemporaryDirectory() as target:  # --target: pip allows foreign-platform dry runs only there
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--target",
               target, "--python-version", py, "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi",
               "none", *plat, "--only-binary=:all:", *args]
        return subprocess.run(cmd, capture_output=True, text=True)


def _last_error(proc: subprocess.CompletedProcess) -> str:
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")]
    return errors[0] if errors else proc.stderr.strip()[-300:]


def check_wheels(py: str) -> tuple[bool, str]:
    bad = []
    for pin in _pins():
        name = re.split(r"[=<>!~ ]", pin)[0]
        if name in SOURCE_ONLY:
            proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True,
                                  text=True)
            if pin.split("==")[1] not in proc.stdout:
                bad.append(f"{pin}: not on the index")
            continue
        proc = _pip(["--no-deps", pin], py)
        if proc.returncode:
            bad.append(f"{pin}: {_last_error(proc)}")
    return not bad, ("every pin has a wheel (or sdist) for cp" + py.replace(".", "") if not bad else " | ".join(bad))


def check_resolution(py: str, report: Path) -> tuple[bool, str]:
    import importlib.metadata as md

    reqs = []
    for pin in _pins():
        name = re.split(r"[=<>!~ ]", pin)[0]
        if name in SOURCE_ONLY:
            try:  # its own dependencies, binary-only (the source package itself is built in the image)
                reqs += [r for r in (md.requires(name) or []) if "extra ==" not in r]
            except md.PackageNotFoundError:
                pass
        else:
            reqs.append(pin)
    proc = _pip(["--report", str(report), *reqs], py)
    if proc.returncode:
        return False, _last_error(proc)
    n = len(json.loads(report.read_text())["install"])
    return True, f"{n} distributions resolve together for cp{py.replace('.', '')}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dali-wheels", type=Path, default=REPO.parent / "shared" / "gpu" / "dali_wheels.sh")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--offline", action="store_true", help="only the checks that need no registry (1, 2)")
    args = ap.parse_args(argv)
    dockerfile = REPO / "Dockerfile"
    py = python_version(dockerfile)
    checks = {"copy_paths": check_copies(dockerfile), "python_version": check_versions(py, args.dali_wheels)}
    if py and not args.offline:
        checks["wheels_per_pin"] = check_wheels(py)
        with tempfile.TemporaryDirectory() as tmp:
            checks["resolution"] = check_resolution(py, Path(tmp) / "report.json")
    for name, (ok, why) in checks.items():
        print(f"{'PASS' if ok else 'FAIL'} {name}: {why}")
    if args.json:
        args.json.write_text(json.dumps({k: {"ok": ok, "detail": why} for k, (ok, why) in checks.items()}, indent=2))
    return 0 if all(ok for ok, _ in checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
