"""How precise is the meta-gradient under mixed precision? Cosine (and relative norm) to the fp32 one, per mode.

    metaloss bench meta-precision --arch resnet18 --image-size 32 --batch 16 --seeds 0,1,2

Random-init network, random data, batch granularity: the meta-gradient is a small inner product of nearly
orthogonal gradients there, which is the hard case for low precision (a trained network on real data gives larger
inner products). ``bf16`` / ``fp16`` = autocast of the look-ahead's network passes (fp16 with a GradScaler at
2^10), i.e. ``meta.precision: same`` in a bf16 / fp16 run; ``meta.precision: fp32`` is the fp32 column itself
(cosine 1 by definition). On CUDA, ``tf32`` = fp32 with TF32 matmuls/convolutions allowed.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from trainer.components.models import build_model
from trainer.config import ModelConfig
from trainer.meta import MetaReweighter

K = 5
MODES = {"exact": {"lookahead": "exact"}, "exact_fd": {"lookahead": "exact", "directional": "fd"},
         "head": {"lookahead": "head"}, "second_order": {"lookahead": "second_order"}}


def _precisions(device: str) -> dict:
    out = {"bf16": (lambda: torch.autocast(device, dtype=torch.bfloat16), None),
           "fp16": (lambda: torch.autocast(device, dtype=torch.float16), "scaler")}
    if device == "cuda":
        out["tf32"] = (None, None)
    return out


def meta_grad(mode: str, model, train, meta, granularity: str, autocast=None, scaler=None, tf32: bool = False):
    torch.manual_seed(1)
    rw = MetaReweighter.from_dict({**MODES[mode], "granularity": granularity}, K).to(train[1].device)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    grads = rw.meta_gradient(model, train, meta, 1e-2, autocast=autocast, grad_scaler=scaler)
    return torch.cat([g.reshape(-1).float() for g in grads]), rw.last_skipped


def measure(arch: str, image_size: int, batch: int, seeds: Sequence[int], modes: Sequence[str], device: str,
            granularity: str = "batch") -> dict[str, dict[str, list[float]]]:
    """{mode: {precision: [cosine per seed]}} (NaN where an fp16 meta step was skipped)."""
    out: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_model(ModelConfig(arch=arch, num_classes=K)).to(device).train()
        gen = torch.Generator().manual_seed(seed)
        train = (torch.randn(batch, 3, image_size, image_size, generator=gen).to(device),
                 torch.randint(0, K, (batch,), generator=gen).to(device))
        meta = (torch.randn(batch, 3, image_size, image_size, generator=gen).to(device),
                torch.randint(0, K, (batch,), generator=gen).to(device))
        for m in modes:
            ref, _ = meta_grad(m, model, train, meta, granularity)
            for name, (autocast, scaler) in _precisions(device).items():
                gs = torch.amp.GradScaler(device, init_scale=2.0 ** 10) if scaler else None
                low, skipped = meta_grad(m, model, train, meta, granularity, autocast, gs, tf32=name == "tf32")
                cos = float("nan") if skipped else float(F.cosine_similarity(low, ref, dim=0))
                out[m].setdefault(name, []).append(cos)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="metaloss bench meta-precision", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet18", choices=["tiny", "resnet18", "resnet34", "resnet50"])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--granularity", default="batch", choices=["batch", "class", "sample"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    res = measure(args.arch, args.image_size, args.batch, seeds, modes, args.device, args.granularity)
    print(f"# meta-gradient cosine to fp32: {args.arch} {args.image_size}px batch {args.batch} {args.granularity} "
          f"on {args.device}, seeds {args.seeds} (median [min, max])")
    precs = list(next(iter(res.values())))
    print(f"{'mode':<14}" + "".join(f"{p:>26}" for p in precs))
    for m, row in res.items():
        cells = [f"{statistics.median(v):.3f} [{min(v):.3f}, {max(v):.3f}]" for v in row.values()]
        print(f"{m:<14}" + "".join(f"{c:>26}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
