"""`metaloss bench {meta,meta-precision,data,train} [args]`: throughput benchmarks. Numbers go to docs/PERFORMANCE.md
with the command and the machine; no test asserts on wall-clock time.

- meta:  the trainer's StepRunner per meta mode vs a plain step, peak memory per mode (launch/bench_meta.py)
- meta-precision: cosine of the meta-gradient to fp32 per mode under bf16/fp16 (launch/bench_meta_precision.py)
- data:  prepare img/s and DALI vs torch loader img/s (launch/bench_data.py)
- train: end-to-end Trainer img/s for a config, on the synthetic backend (no I/O) unless the overrides pick a data
         set; train.max_steps ends the run and the steady-state rate leaves out the first --warmup-steps, e.g.
         metaloss bench train configs/aptos_meta.yaml train.max_steps=100 --warmup-steps 40
         with meta.every=k use logging.every_steps and --warmup-steps that are multiples of k (whole cycles);
         cpu_s = process CPU time of fit (the stable figure on a shared CPU); peak: CUDA max allocated, else this
         process's peak RSS (one config per process).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch


def _machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}"


def steady_rate(intervals: list[dict], warmup_steps: int) -> float | None:
    """Median img/s of the logging intervals that start after ``warmup_steps`` (pipeline build, shuffle-buffer fill,
    cuDNN autotuning and compilation all land in the first steps), or None when no interval is left."""
    rates = sorted(iv["img_per_s"] for iv in intervals if iv["step"] - iv["steps"] >= warmup_steps)
    return rates[len(rates) // 2] if rates else None


def bench_train(argv: list[str], on_trainer=None) -> dict:
    """``on_trainer(trainer)``: called once the Trainer is built, before fit (the GPU harness hooks in there)."""
    p = argparse.ArgumentParser(prog="metaloss bench train")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--warmup-steps", type=int, default=20, help="steps left out of the steady-state rate")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_intermixed_args(argv)
    from trainer.config import load_config
    from trainer.engine.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        # train.max_steps ends the run: epochs are unbounded (a prepared set's epoch may be a few steps on a big
        # batch) and the meta-split evaluation runs once, at the end, outside the timed intervals
        defaults = ["data.backend=synthetic", "data.root=", "data.synthetic_samples=4096", "checkpoint.enabled=false",
                    "logging.tensorboard=false", f"run.out_dir={tmp}", "run.name=bench", "train.epochs=1000000",
                    "eval.every_epochs=1000000", "train.max_steps=50"]
        cfg = load_config(args.config, defaults + args.overrides)
        trainer = Trainer(cfg, quiet=True)
        if on_trainer is not None:
            on_trainer(trainer)
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = trainer.fit()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    intervals = trainer.logger.intervals
    steady = steady_rate(intervals, args.warmup_steps)
    out = {"config": args.config, "overrides": args.overrides, "steps": metrics["steps"],
           "bad_steps": metrics["bad_steps"],
           "train_img_per_s": round(metrics["train_img_per_s"], 1),
           "steady_img_per_s": round(steady, 1) if steady is not None else None,
           "steady_after_steps": args.warmup_steps,
           "steady_data_wait_frac": _median([iv["data_wait_frac"] for iv in intervals
                                             if iv["step"] - iv["steps"] >= args.warmup_steps]),
           "intervals": [{k: round(v, 4) if isinstance(v, float) else v for k, v in iv.items()} for iv in intervals],
           "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
           "peak_rss_mib": None if torch.cuda.is_available() else round(_peak_rss_mib()),
           "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "machine": _machine()}
    print(json.dumps({k: v for k, v in out.items() if k != "intervals"}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


def _peak_rss_mib() -> float:
    from launch.peak_memory import peak_rss_mib

    return peak_rss_mib()


def _median(values: list[float]) -> float | None:
    return round(sorted(values)[len(values) // 2], 4) if values else None


def run_bench(args) -> None:
    if args.what == "meta":
        from launch.bench_meta import main
    elif args.what == "meta-precision":
        from launch.bench_meta_precision import main
    elif args.what == "data":
        from launch.bench_data import main
    else:
        main = bench_train
    main(args.rest)
