"""Classifier optimiser and learning-rate schedule (paper: Adam 1e-4, constant)."""
from __future__ import annotations

import math

import torch


def build_optimizer(cfg, params, *, fused: bool = False) -> torch.optim.Optimizer:
    """``cfg`` is an ``OptimConfig``.

    fused=True picks the fused Adam/AdamW/SGD kernels (CPU and CUDA): faster, and they read ``optimizer.found_inf`` so a
    non-finite step can be skipped on the device without a host sync (see steps.py).
    """
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           fused=fused or None)


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, total_steps: int):
    """Linear warm-up then constant / cosine / step (x0.1 at 2/3 of training). Stepped once per real step."""
    warmup = max(0, cfg.warmup_steps)
    total = max(1, total_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.scheduler == "step":
            return 0.1 if step >= (2 * total) // 3 else 1.0
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
