"""Which scaled-dot-product-attention kernels support forward-mode AD here (the ``exact`` look-ahead's dual pass)?

    python -m launch.check_sdpa_forward_ad [--device cuda] [--dtype bfloat16]

The trainer runs the dual pass under the MATH kernel (trainer/meta/exact.py), which supports it everywhere; this
prints, per kernel, whether a dual-number SDPA call works and its tangent's difference to MATH's, so a faster
kernel can be allowed where it does. Used by launch/gpu_checks.sh.
"""
from __future__ import annotations

import argparse

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def tangent(backend: SDPBackend, q, k, v, dq) -> torch.Tensor:
    with torch.no_grad(), fwAD.dual_level(), sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(fwAD.make_dual(q, dq), k, v)
        return fwAD.unpack_dual(out).tangent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    q, k, v, dq = (torch.randn(2, 4, 64, 32, generator=gen).to(args.device, dtype) for _ in range(4))
    reference = tangent(SDPBackend.MATH, q, k, v, dq).float()
    for name in ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "OVERRIDEABLE"):
        backend = getattr(SDPBackend, name)
        try:
            diff = (tangent(backend, q, k, v, dq).float() - reference).abs().max().item()
            print(f"{name:<22} forward AD ok, max |tangent - MATH| = {diff:.2e}")
        except Exception as e:  # not implemented / kernel not available for this device, dtype or shape
            print(f"{name:<22} {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
