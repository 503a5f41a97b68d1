"""Time one training step per meta look-ahead mode, side by side in one process.

    python -m launch.bench_meta --arch resnet18 --image-size 64 --batch 32 --steps 5 --warmup 2

Modes: ``plain`` (forward + backward + Adam step, no meta-learning), ``head``, ``exact`` (forward-mode
directional derivatives), ``exact_fd`` (exact with the central-difference directional), ``second_order``. A meta
mode's step is ``meta_gradient`` + ``update`` + the real weighted step. The modes run interleaved (step 1 of every
mode, then step 2, ...) so slow drifts of the machine hit all of them alike; the median step time is reported.
Synthetic random images: the timing does not depend on the pixel values.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from trainer.config import ModelConfig
from trainer.meta import MetaReweighter
from trainer.meta.modes import GRANULARITIES
from trainer.components.models import build_model, check_arch, to_memory_format

MODES = ("plain", "head", "exact", "exact_fd", "second_order")
NUM_CLASSES = 5


def _precision(precision: str, device: str):
    """(autocast factory or None, GradScaler or None)."""
    if precision == "fp32":
        return None, None
    if precision == "bf16":
        return (lambda: torch.autocast(device, dtype=torch.bfloat16)), None
    if precision == "fp16":
        return (lambda: torch.autocast(device, dtype=torch.float16)), torch.amp.GradScaler(device)
    raise ValueError(f"precision: {precision!r} is not one of fp32, bf16, fp16")


class _Runner:
    """One model + optimiser (+ reweighter) for one mode; ``step()`` is one full training step."""

    def __init__(self, mode: str, arch: str, device: str, precision: str, granularity: str, seed: int,
                 detach_features: bool = False, image_size: Optional[int] = None):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        torch.manual_seed(seed)
        self.mode = mode
        cfg = ModelConfig(arch=arch, num_classes=NUM_CLASSES)
        lookahead = {"plain": None, "exact_fd": "exact"}.get(mode, mode)
        self.model = build_model(cfg, image_size=image_size, lookahead=lookahead).to(device).train()
        self.model = to_memory_format(self.model, cfg, torch.device(device))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.autocast, self.scaler = _precision(precision, device)
        self.rw: Optional[MetaReweighter] = None
        if mode != "plain":
            lookahead = "exact" if mode == "exact_fd" else mode
            self.rw = MetaReweighter.from_dict(
                {"granularity": granularity, "lookahead": lookahead, "detach_features": detach_features,
                 "directional": "fd" if mode == "exact_fd" else "forward_ad"}, NUM_CLASSES).to(device)

    def _ctx(self):
        return self.autocast() if self.autocast is not None else contextlib.nullcontext()

    def step(self, train, meta) -> None:
        x, y = train
        if self.rw is not None:
            grads = self.rw.meta_gradient(self.model, train, meta, 1e-4, optimizer=self.opt,
                                          autocast=self.autocast, grad_scaler=self.scaler)
            self.rw.update(grads)
        with self._ctx():
            logits = self.model(x)
        losses = F.cross_entropy(logits.float(), y, reduction="none")
        loss = self.rw.weighted_loss(losses, y)[0] if self.rw is not None else losses.mean()
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()


def bench_meta_step(arch: str = "resnet18", image_size: int = 64, batch: int = 32,
                    modes: Sequence[str] = ("plain", "head", "exact", "second_order"), steps: int = 5,
                    warmup: int = 2, precision: str = "fp32", device: str = "cpu", granularity: str = "batch",
                    seed: int = 0, detach_features: bool = False, log: Optional[Callable[[str], None]] = None
                    ) -> dict[str, dict[str, float]]:
    """{mode: {"ms_per_step", "ratio_vs_plain"}} (median over ``steps`` timed steps after ``warmup``)."""
    modes = list(modes)
    runners = {m: _Runner(m, arch, device, precision, granularity, seed, detach_features, image_size) for m in modes}
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 3, image_size, image_size)
    train = (torch.randn(shape, generator=gen).to(device), torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device))
    meta = (torch.randn(shape, generator=gen).to(device), torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device))
    if device == "cuda":
        train = (train[0].contiguous(memory_format=torch.channels_last), train[1])
        meta = (meta[0].contiguous(memory_format=torch.channels_last), meta[1])
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(warmup + steps):
        for m in modes:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            runners[m].step(train, meta)
            if device == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times[m].append(dt)
            if log:
                log(f"step {i} {m}: {dt:.1f} ms{' (warmup)' if i < warmup else ''}")
    med = {m: statistics.median(times[m]) for m in modes}
    base = med.get("plain")
    return {m: {"ms_per_step": med[m], "ratio_vs_plain": (med[m] / base) if base else float("nan")} for m in modes}


def format_table(results: dict[str, dict[str, float]]) -> str:
    lines = [f"{'mode':<14}{'ms/step':>10}{'x plain':>10}"]
    for m, r in results.items():
        lines.append(f"{m:<14}{r['ms_per_step']:>10.1f}{r['ratio_vs_plain']:>10.2f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet18", help="tiny or any torchvision classifier (model.arch)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--modes", default="plain,head,exact,second_order",
                    help=f"comma-separated, from {','.join(MODES)}")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--granularity", default="batch", choices=list(GRANULARITIES))
    ap.add_argument("--detach-features", action="store_true", help="meta.detach_features=true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--verbose", action="store_true", help="print every step's time")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    try:
        check_arch(args.arch)
    except ValueError as e:
        ap.error(str(e))
    results = bench_meta_step(args.arch, args.image_size, args.batch, modes, args.steps, args.warmup,
                              args.precision, args.device, args.granularity, detach_features=args.detach_features,
                              log=(lambda s: print(s, file=sys.stderr)) if args.verbose else None)
    print(f"# {args.arch} {args.image_size}px batch {args.batch} {args.precision} on {args.device} "
          f"({torch.get_num_threads()} threads), granularity {args.granularity}"
          f"{', detached features' if args.detach_features else ''}, median of {args.steps} steps")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
