"""The one-GPU check harness: installs the carried wheels, runs every GPU check and timing time-boxed, and writes
one JSON summary after every step (a run cut off by its caller still reports what it did).

    python -m launch.gpu_checks --out $OUT [--wheels DIR ...] [--budget 290]   # on a lent GPU machine
    python -m launch.gpu_checks --dry-run --out /tmp/gpu_dry                     # CPU, tiny model, < 60 s

``launch/gpu_checks.sh`` is the same with the environment variables of the old script. The steps themselves are
in ``launch/gpu_steps.py`` (list and meaning: ``STEPS`` there, docs/PERFORMANCE.md). They run in ONE child process
(imports once); each step gets ``min(its own limit, what is left of --budget)`` seconds: SIGALRM inside the child,
and a kill from here if the child does not come back (a hang inside CUDA or DALI), after which the child is
restarted for the remaining steps. Every step ends PASS, FAIL or SKIP with a number; the summary is
``OUT/summary.json``, the logs ``OUT/log.txt``.

Only those two files (and gpu.txt from the shell script) go to OUT: a lent GPU machine ships back at most 8 files
from $OUT, two folders deep, so the installed wheels, the synthetic data and the per-step files live in ``--work``
(default: a fresh temp dir, removed at the end; name one to keep it).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from common.atomic import atomic_write_text

# after a step's limit: SIGALRM had its chance (it cannot interrupt a hang inside C++), kill the child
GRACE_S = float(os.environ.get("METALOSS_GPU_CHECKS_GRACE_S", "15"))


# --- carried wheels -------------------------------------------------------------------------------------------------
def _part_number(path: Path) -> int:
    digits = re.findall(r"\d+", path.name)
    return int(digits[-1]) if digits else -1


def assemble_wheels(src: Path, work: Path) -> list[Path]:
    """Wheels from ``src``: split tar parts (part1..partN, concatenated in numeric order -- part10 after part9 --
    checked against SHA256 when present) and/or plain ``*.whl`` files. Raises with a reason on a bad set."""
    work.mkdir(parents=True, exist_ok=True)
    wheels = sorted(src.glob("*.whl"))
    parts = sorted((p for p in src.glob("part*") if p.is_file()), key=_part_number)
    if parts:
        tar = work / f"{src.name}.tar"
        digest = hashlib.sha256()
        with tar.open("wb") as out:
            for part in parts:
                data = part.read_bytes()
                digest.update(data)
                out.write(data)
        sums = src / "SHA256"
        if sums.is_file():
            expected = sums.read_text().split()[0]
            if expected != digest.hexdigest():
                raise RuntimeError(f"{src}: the {len(parts)} parts do not match SHA256 (missing or truncated part?)")
        dest = work / f"{src.name}_whl"
        with tarfile.open(tar) as t:
            t.extractall(dest, filter="data")
        wheels += sorted(dest.rglob("*.whl"))
    if not wheels:
        raise RuntimeError(f"{src}: no *.whl and no part* files")
    return wheels


def compatible(wheels: list[Path]) -> tuple[list[Path], list[Path]]:
    """(wheels this interpreter can install, the others) by their tags -- dali_wheels.sh fetches cp312 wheels."""
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:  # a bare GPU host: pip always carries a copy
        from pip._vendor.packaging.tags import sys_tags
        from pip._vendor.packaging.utils import parse_wheel_filename

    ours = set(sys_tags())
    ok, other = [], []
    for w in wheels:
        (ok if ours & set(parse_wheel_filename(w.name)[3]) else other).append(w)
    return ok, other


def install_wheels(dirs: list[Path], site: Path, work: Path) -> dict:
    """Assemble, filter by tag, ``pip install --no-index --no-deps --target site``; exit codes checked."""
    wheels = [w for d in dirs for w in assemble_wheels(d, work)]
    ok, other = compatible(wheels)
    result = {"wheels": len(wheels), "installed": [w.name for w in ok], "incompatible": [w.name for w in other],
              "python": f"cp{sys.version_info.major}{sys.version_info.minor}"}
    if ok:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                               "--target", str(site), *map(str, ok)], capture_output=True, text=True)
        result["pip_rc"] = proc.returncode
        if proc.returncode:
            result["pip_error"] = proc.stderr[-2000:]
    result["status"] = "PASS" if ok and not other and result.get("pip_rc") == 0 else "FAIL"
    if other:
        result["hint"] = (f"{len(other)} wheel(s) do not fit {result['python']}: fetch them for this Python "
                          "(dali_wheels.sh pins --python-version 3.12) or run the harness with python3.12")
    return result


# --- the driver -----------------------------------------------------------------------------------------------------
class Summary:
    def __init__(self, out: Path, meta: dict):
        self.path, self.data = out / "summary.json", {**meta, "steps": {}, "started": time.strftime("%FT%TZ")}
        self.save()

    def record(self, name: str, result: dict) -> None:
        self.data["steps"][name] = result
        line = f"{result.get('status', 'FAIL'):4s} {name}: {result.get('value')} {result.get('unit', '')}".rstrip()
        if result.get("error"):
            line += f"  ({result['error'][:300]})"
        print(line, flush=True)
        self.save()

    def save(self) -> None:
        self.data["updated"] = time.strftime("%FT%TZ")
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")


def _reader(stream, q: queue.Queue, log) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        q.put(line.rstrip("\n"))
    q.put(None)


def run_steps(names: list[str], limits: dict[str, int], args, summary: Summary, env: dict) -> None:
    deadline = time.monotonic() + args.budget
    pending = list(names)
    with (args.out / "log.txt").open("a") as log:
        while pending:
            left = deadline - time.monotonic()
            if left < 5:
                for name in pending:
                    summary.record(name, {"status": "SKIP", "value": None, "error": "out of the time budget"})
                return
            cmd = [sys.executable, "-m", "launch.gpu_steps", "--out", str(args.work), "--steps", ",".join(pending),
                   "--budget", str(int(left))] + (["--dry-run"] if args.dry_run else [])
            child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)
            q: queue.Queue = queue.Queue()
            threading.Thread(target=_reader, args=(child.stdout, q, log), daemon=True).start()
            current, step_deadline = None, time.monotonic() + 120  # imports before the first step
            started = False
            while True:
                try:
                    line = q.get(timeout=max(0.1, step_deadline - time.monotonic()))
                except queue.Empty:
                    line = "@@timeout"
                if line is None or line == "@@timeout":
                    if line == "@@timeout":
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(child.pid, 9)
                    child.wait()
                    if current is not None and current in pending:
                        why = ("killed: over its time limit" if line == "@@timeout"
                               else f"child exited {child.returncode}")
                        summary.record(current, {"status": "FAIL", "value": None, "error": why})
                        pending.remove(current)
                    elif not started and pending:
                        # the child died before starting any step (import error): nothing more can run
                        for name in pending:
                            summary.record(name, {"status": "FAIL", "value": None,
                                                  "error": f"step runner exited {child.returncode} before the step"})
                        pending.clear()
                    break
                if line.startswith("@@start "):
                    current, started = line.split()[1], True
                    step_deadline = time.monotonic() + min(limits[current], deadline - time.monotonic()) + GRACE_S
                elif line.startswith("@@result "):
                    result = json.loads(line[len("@@result "):])
                    name = result.pop("name")
                    summary.record(name, result)
                    pending.remove(name)
                    current, step_deadline = None, time.monotonic() + 60


def main(argv: list[str] | None = None) -> int:
    from launch.gpu_steps import STEPS, step_limits

    p = argparse.ArgumentParser(prog="python -m launch.gpu_checks", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench_out/gpu"))
    p.add_argument("--wheels", type=Path, nargs="*", default=[], help="folders of carried wheels (parts or *.whl)")
    p.add_argument("--budget", type=float, default=290.0, help="seconds for all steps together (default 290)")
    p.add_argument("--steps", default="", help="comma-separated subset of: " + ",".join(STEPS))
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model: checks the harness itself")
    p.add_argument("--work", type=Path, default=None,
                   help="scratch (installed wheels, data, per-step files); default: a temp dir, removed at the end")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    keep_work = args.work is not None
    args.work = args.work or Path(tempfile.mkdtemp(prefix="metaloss_gpu_"))
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(p, args)
    finally:
        if not keep_work:
            shutil.rmtree(args.work, ignore_errors=True)


def _run(p: argparse.ArgumentParser, args) -> int:
    from launch.gpu_steps import STEPS, step_limits

    names = [s for s in args.steps.split(",") if s] or list(STEPS)
    unknown = [s for s in names if s not in STEPS]
    if unknown:
        p.error(f"unknown step(s) {unknown}; choose from {', '.join(STEPS)}")
    summary = Summary(args.out, {"dry_run": args.dry_run, "budget_s": args.budget, "python": sys.version.split()[0],
                                 "work": str(args.work)})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    if args.wheels:
        site = args.work / "site"
        shutil.rmtree(site, ignore_errors=True)
        try:
            result = install_wheels(args.wheels, site, args.work / "wheels_work")
        except Exception as e:  # noqa: BLE001 -- any failure here is the step's result
            result = {"status": "FAIL", "error": f"{type(e).__name__}: {e}"}
        result["value"] = len(result.get("installed", []))
        result["unit"] = "wheels installed"
        summary.record("wheels", result)
        env["PYTHONPATH"] = os.pathsep.join([str(site.resolve()), os.getcwd(), env.get("PYTHONPATH", "")])
    args.budget -= time.monotonic() - t0
    run_steps(names, step_limits(args.dry_run), args, summary, env)
    statuses = [r.get("status") for r in summary.data["steps"].values()]
    summary.data["passed"] = statuses.count("PASS")
    summary.data["failed"] = statuses.count("FAIL")
    summary.data["skipped"] = statuses.count("SKIP")
    summary.data["wall_s"] = round(time.monotonic() - t0, 1)
    summary.save()
    print(f"summary: {summary.path} ({summary.data['passed']} PASS, {summary.data['failed']} FAIL, "
          f"{summary.data['skipped']} SKIP, {summary.data['wall_s']} s)")
    return 1 if summary.data["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
