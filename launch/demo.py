"""`make demo`: synthetic fundus set -> baseline and meta-reweighted ResNet-18 on CPU -> metrics + report.

Each training run is its own process (as a user would run it): Accelerate's state is per process.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from launch.errors import setup_logging

RUNS = (("demo_baseline", "configs/demo.yaml"), ("demo_meta", "configs/demo_meta.yaml"))


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        sys.exit(f"demo: step failed (exit {rc}): {' '.join(cmd)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.demo")
    p.add_argument("--data", default="demo_data/synthetic")
    p.add_argument("--runs", default="runs")
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs of both runs")
    args = p.parse_args(argv)
    setup_logging()
    t0 = time.time()
    py = sys.executable
    if not (Path(args.data) / "train.csv").is_file():
        _run([py, "-m", "launch.cli", "synth", "--out", args.data, "--n", str(args.n), "--size", str(args.size)])
    run_dirs = []
    for name, config in RUNS:
        extra = [f"data.root={args.data}", f"run.out_dir={args.runs}", f"run.name={name}"]
        if args.epochs:
            extra.append(f"train.epochs={args.epochs}")
        _run([py, "-m", "launch.train", config, *extra, "--overwrite"])
        run_dirs.append(str(Path(args.runs) / name))
    out = Path(args.runs) / "demo_report" / "report.md"
    _run([py, "-m", "launch.cli", "report", *run_dirs, "--out", str(out)])
    print(f"\ndemo finished in {time.time() - t0:.0f} s; metrics in {', '.join(d + '/metrics.json' for d in run_dirs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
