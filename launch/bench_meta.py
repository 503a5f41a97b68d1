"""Time the trainer's own training step (``trainer.engine.steps.StepRunner``) per meta mode, side by side.

    metaloss bench meta --arch resnet18 --image-size 64 --batch 32 --steps 7 --warmup 2 --threads 1 --memory

Every mode is the real ``StepRunner`` built from the same builders the ``Trainer`` uses (model, fused optimiser,
scheduler, loss, ``MetaReweighter``, Accelerate), fed fixed synthetic batches (the timing does not depend on pixel
values). A mode is a set of config overrides on top of ``--set`` (see ``MODES``); ``plain`` is ``train.loss=ce``.

Timing: the modes run interleaved, one *cycle* of each per round, so slow drifts of a shared machine hit all of them
alike. A cycle is ``meta.every`` steps (1 for most modes): with ``meta.every: 4`` one cycle = one meta step + three
plain steps, and its time / 4 is the mean step cost (the median of mixed steps would read as a plain step). The
reported figure is the median over ``--steps`` cycles, per step; the spread (min-max over cycles) is printed too.
Besides wall-clock time the process CPU time of each cycle is recorded: with ``--threads 1`` on a shared machine it
is the stable figure (other processes' load stretches the wall clock, not the CPU work of the step).

Memory (``--memory``): each mode runs again in its own subprocess (1 warm-up + 2 steps) and reports its peak: CUDA
``max_memory_allocated``, CPU the process's peak RSS (``VmHWM``; a process's peak covers its whole life, hence one
process per mode; ``ru_maxrss`` would not do: Linux carries the parent's peak across fork + exec). ``idle`` is a
process that builds everything and takes no step (the RSS floor).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

import torch

from trainer.meta.modes import GRANULARITIES

NUM_CLASSES = 5
# name -> config overrides ("HALF" = half the train batch). Defaults: batch granularity, exact, forward_ad.
MODES: dict[str, dict] = {
    "plain": {"train.loss": "ce"},
    "head": {"meta.lookahead": "head"},
    "head_half": {"meta.lookahead": "head", "meta.meta_batch_size": "HALF"},
    "exact": {"meta.lookahead": "exact"},
    "exact_every4": {"meta.lookahead": "exact", "meta.every": 4},
    "exact_fd": {"meta.lookahead": "exact", "meta.directional": "fd"},
    "exact_unshared": {"meta.lookahead": "exact", "meta.share_forward": False},
    "exact_dualpass": {"meta.lookahead": "exact", "meta.reuse_activations": False},
    "head_unshared": {"meta.lookahead": "head", "meta.share_forward": False},
    "exact_detached": {"meta.lookahead": "exact", "meta.detach_features": True},
    "exact_lag": {"meta.lookahead": "exact", "meta.detach_features": True, "meta.real_step": "lagged"},
    "exact_fp32": {"meta.lookahead": "exact", "meta.precision": "fp32"},
    "head_fp32": {"meta.lookahead": "head", "meta.precision": "fp32"},
    "second_order": {"meta.lookahead": "second_order"},
}


def _config(mode: str, arch: str, image_size: int, batch: int, device: str, extra: Sequence[str]):
    from trainer.config import config_from_dict, parse_override

    overrides = {"model.arch": arch, "data.image_size": image_size, "train.batch_size": batch,
                 "model.num_classes": NUM_CLASSES, "train.loss": "meta", "train.cpu": device == "cpu",
                 "logging.tensorboard": False, "checkpoint.enabled": False}
    overrides.update(dict(parse_override(s) for s in extra))
    overrides.update({k: (batch // 2 if v == "HALF" else v) for k, v in MODES[mode].items()})
    nested: dict = {}
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        nested.setdefault(section, {})[key] = value
    return config_from_dict(nested)


class _Feed:
    """Endless fixed batches shaped like a stream's (``images``, ``labels``)."""

    def __init__(self, n: int, image_size: int, seed: int):
        from data_pipeline.types import Batch

        gen = torch.Generator().manual_seed(seed)
        self.batch = Batch(torch.randn(n, 3, image_size, image_size, generator=gen),
                           torch.randint(0, NUM_CLASSES, (n,), generator=gen), torch.arange(n))

    def __iter__(self):
        return self

    def __next__(self):
        return self.batch


def build_runner(cfg, seed: int = 0):
    """A StepRunner exactly as ``Trainer.__init__`` wires it (minus streams/run dir), and its train feed."""
    from trainer.components.losses import build_loss
    from trainer.components.models import build_model, to_memory_format
    from trainer.components.optim import build_optimizer, build_scheduler
    from trainer.engine.accel import build_accelerator
    from trainer.engine.steps import StepRunner
    from trainer.meta import MetaReweighter

    acc = build_accelerator(cfg)
    torch.manual_seed(seed)
    lookahead = cfg.meta.lookahead if cfg.train.loss == "meta" else None
    model = to_memory_format(build_model(cfg.model, image_size=cfg.data.image_size, lookahead=lookahead),
                             cfg.model, acc.device)
    optimizer = build_optimizer(cfg.optim, model.parameters(), fused=True)
    scheduler = build_scheduler(cfg.optim, optimizer, 10_000)
    loss_fn = build_loss(cfg.train.loss, cfg.loss, [1] * NUM_CLASSES, cfg.train.epochs).to(acc.device)
    rw = None
    if cfg.train.loss == "meta":
        rw = MetaReweighter(cfg.meta, num_classes=NUM_CLASSES).to(acc.device)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    meta_feed = _Feed(cfg.meta.meta_batch_size or cfg.train.batch_size, cfg.data.image_size, seed + 1)
    runner = StepRunner(model=model, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn, reweighter=rw,
                        meta_stream=meta_feed, accelerator=acc, cfg=cfg)
    return runner, _Feed(cfg.train.batch_size, cfg.data.image_size, seed)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_meta_step(arch: str = "resnet18", image_size: int = 64, batch: int = 32,
                    modes: Sequence[str] = ("plain", "head", "exact"), steps: int = 5, warmup: int = 2,
                    device: str = "cpu", extra: Sequence[str] = (), seed: int = 0,
                    log: Optional[Callable[[str], None]] = None, precision: Optional[str] = None,
                    granularity: Optional[str] = None) -> dict[str, dict[str, float]]:
    """{mode: {"ms_per_step", "ratio_vs_plain", "spread_ms", "cpu_ms_per_step", "cpu_ratio_vs_plain", "cycle"}}:
    medians over ``steps`` cycles after ``warmup`` cycles, per step (wall clock and process CPU time).
    ``precision`` / ``granularity``: shorthands for ``train.precision=`` / ``meta.granularity=`` in ``extra``."""
    modes = list(modes)
    extra = [*extra, *([f"train.precision={precision}"] if precision else []),
             *([f"meta.granularity={granularity}"] if granularity else [])]
    runners, cycles, feeds = {}, {}, {}
    for m in modes:
        cfg = _config(m, arch, image_size, batch, device, extra)
        runners[m], feeds[m] = build_runner(cfg, seed)
        cycles[m] = cfg.meta.every if cfg.train.loss == "meta" else 1
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    counters = {m: 0 for m in modes}
    for i in range(warmup + steps):
        for m in modes:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(cycles[m]):
                runners[m](next(feeds[m]), counters[m])
                counters[m] += 1
            _sync(device)
            dt = (time.perf_counter() - t0) * 1e3 / cycles[m]
            if i >= warmup:
                times[m].append(dt)
                cpu[m].append((time.process_time() - c0) * 1e3 / cycles[m])
            if log:
                log(f"round {i} {m}: {dt:.1f} ms/step{' (warmup)' if i < warmup else ''}")
    med = {m: statistics.median(times[m]) for m in modes}
    cmed = {m: statistics.median(cpu[m]) for m in modes}
    base, cbase = med.get("plain"), cmed.get("plain")
    return {m: {"ms_per_step": med[m], "ratio_vs_plain": (med[m] / base) if base else float("nan"),
                "spread_ms": max(times[m]) - min(times[m]), "cpu_ms_per_step": cmed[m],
                "cpu_ratio_vs_plain": (cmed[m] / cbase) if cbase else float("nan"), "cycle": cycles[m]}
            for m in modes}


def peak_memory_mib(mode: str, arch: str, image_size: int, batch: int, device: str, extra: Sequence[str],
                    steps: int = 2) -> float:
    """This process's peak for one mode (call in a fresh process): CUDA max allocated, else peak RSS."""
    cfg = _config("plain" if mode == "idle" else mode, arch, image_size, batch, device, extra)
    runner, feed = build_runner(cfg)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if mode != "idle":
        for s in range(1 + steps * cfg.meta.every):
            runner(next(feed), s)
    _sync(device)
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    from launch.peak_memory import peak_rss_mib

    return peak_rss_mib()


def _memory_in_subprocesses(args, modes: Sequence[str]) -> dict[str, float]:
    out = {}
    for m in ["idle", *modes]:
        cmd = [sys.executable, "-m", "launch.bench_meta", "--peak-of", m, "--arch", args.arch,
               "--image-size", str(args.image_size), "--batch", str(args.batch), "--device", args.device,
               "--threads", str(args.threads), *sum((["--set", s] for s in args.set), [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[m] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
    return out


def format_table(results: dict[str, dict[str, float]], peaks: Optional[dict[str, float]] = None) -> str:
    unit = "peak MiB"
    lines = [f"{'mode':<16}{'ms/step':>10}{'x plain':>9}{'spread':>9}{'cpu ms':>9}{'cpu x':>7}"
             + (f"{unit:>11}" if peaks else "")]
    for m, r in results.items():
        row = (f"{m:<16}{r['ms_per_step']:>10.1f}{r['ratio_vs_plain']:>9.2f}{r['spread_ms']:>9.0f}"
               f"{r['cpu_ms_per_step']:>9.1f}{r['cpu_ratio_vs_plain']:>7.2f}")
        lines.append(row + (f"{peaks[m]:>11.0f}" if peaks else ""))
    if peaks and "idle" in peaks:
        lines.append(f"{'idle (no step)':<60}{peaks['idle']:>11.0f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="metaloss bench meta", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet18", help="tiny or any torchvision classifier (model.arch)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--modes", default="plain,head,head_half,exact,exact_every4",
                    help=f"comma-separated, from {','.join(MODES)}")
    ap.add_argument("--steps", type=int, default=5, help="timed cycles per mode")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every mode, e.g. --set meta.granularity=class --set train.precision=bf16")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="= --set train.precision=...")
    ap.add_argument("--granularity", choices=list(GRANULARITIES), help="= --set meta.granularity=...")
    ap.add_argument("--detach-features", action="store_true", help="= --set meta.detach_features=true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--memory", action="store_true", help="also report each mode's peak memory (one process each)")
    ap.add_argument("--peak-of", default="", help=argparse.SUPPRESS)
    ap.add_argument("--verbose", action="store_true", help="print every cycle's time")
    args = ap.parse_args(argv)
    args.set += [f"train.precision={args.precision}"] * bool(args.precision)
    args.set += [f"meta.granularity={args.granularity}"] * bool(args.granularity)
    args.set += ["meta.detach_features=true"] * args.detach_features
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.peak_of:
        print(json.dumps({"mode": args.peak_of, "peak_mib": peak_memory_mib(
            args.peak_of, args.arch, args.image_size, args.batch, args.device, args.set)}))
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    from trainer.components.models import check_arch

    try:
        check_arch(args.arch)
    except ValueError as e:
        ap.error(str(e))
    results = bench_meta_step(args.arch, args.image_size, args.batch, modes, args.steps, args.warmup, args.device,
                              args.set, log=(lambda s: print(s, file=sys.stderr)) if args.verbose else None)
    peaks = _memory_in_subprocesses(args, modes) if args.memory else None
    settings = " ".join(args.set) or "defaults"
    print(f"# StepRunner, {args.arch} {args.image_size}px batch {args.batch} on {args.device} "
          f"({torch.get_num_threads()} threads), {settings}; median of {args.steps} cycles per mode, interleaved; "
          f"peak = {'CUDA max allocated' if args.device == 'cuda' else 'peak RSS, one process per mode'}")
    print(format_table(results, peaks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
