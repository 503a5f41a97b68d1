"""`metaloss bench {meta,meta-precision,data,train} [args]`: throughput benchmarks. Numbers go to docs/PERFORMANCE.md
with the command and the machine; no test asserts on wall-clock time.

- meta:  the trainer's StepRunner per meta mode vs a plain step, peak memory per mode (launch/bench_meta.py)
- meta-precision: cosine of the meta-gradient to fp32 per mode under bf16/fp16 (launch/bench_meta_precision.py)
- data:  prepare img/s and DALI vs torch loader img/s (launch/bench_data.py)
- train: end-to-end Trainer img/s on the synthetic backend for a config (no I/O), e.g.
         metaloss bench train configs/aptos_meta.yaml train.max_steps=50
         img/s is the mean over all timed steps (use a max_steps that is a multiple of meta.every: whole cycles);
         peak memory: CUDA max allocated, else this process's peak RSS (one config per process).
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


def bench_train(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="metaloss bench train")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    from trainer.config import load_config
    from trainer.engine.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        # one long epoch (4096 synthetic samples) cut by max_steps: the timing is not diluted by per-epoch evals
        defaults = ["data.backend=synthetic", "data.root=", "data.synthetic_samples=4096", "checkpoint.enabled=false",
                    "logging.tensorboard=false", f"run.out_dir={tmp}", "run.name=bench", "train.epochs=1",
                    "train.max_steps=50"]
        cfg = load_config(args.config, defaults + args.overrides)
        trainer = Trainer(cfg, quiet=True)
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = trainer.fit()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if torch.cuda.is_available() and not cfg.train.cpu:
        peak = {"peak_cuda_max_allocated_mib": round(torch.cuda.max_memory_allocated() / 2 ** 20)}
    else:
        from launch.peak_memory import peak_rss_mib

        peak = {"peak_rss_mib": round(peak_rss_mib())}
    out = {"config": args.config, "overrides": args.overrides, "steps": metrics["steps"],
           "train_img_per_s": round(metrics["train_img_per_s"], 1), "wall_s": round(wall, 1),
           # process CPU time of fit (steps + the final test evaluation): the stable figure on a shared machine
           "cpu_s": round(cpu, 1), **peak,
           "machine": _machine()}
    print(json.dumps(out, indent=2))
    return out


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
