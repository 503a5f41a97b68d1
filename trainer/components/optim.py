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


def apply_optim_config(optimizer, scheduler, cfg) -> list[str]:
    """After a checkpoint load: make the classifier optimiser and schedule follow ``cfg`` (an ``OptimConfig``).

    A checkpoint restores the optimiser's hyper-parameters as they were saved, so a resume with a changed
    ``optim.lr`` would go on at the old rate while config.yaml says the new one, and a changed ``optim.name`` would
    step an SGD with Adam's parameter groups (``KeyError: 'momentum'``). The trainer refuses such resumes unless
    ``--force``; then this applies the config and returns one line per change, for the log.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper
    sched = getattr(scheduler, "scheduler", scheduler)
    probe = build_optimizer(cfg, [torch.zeros(1, requires_grad=True)])  # the defaults this config asks for
    changes = []
    if any(k not in group for group in inner.param_groups for k in probe.defaults):
        # another optimiser's groups (and state: Adam's moments mean nothing to SGD): start this one fresh
        inner.state.clear()
        for group in inner.param_groups:
            for k, v in probe.defaults.items():
                group.setdefault(k, v)
        changes.append(f"optim.name: the checkpoint's optimiser state is not {cfg.name}'s; {cfg.name} starts with "
                       "empty state")
    for key in ("weight_decay", "momentum"):
        if key not in probe.defaults:
            continue
        old = inner.param_groups[0].get(key)
        if old != probe.defaults[key]:
            changes.append(f"optim.{key}: {old} -> {probe.defaults[key]}")
        for group in inner.param_groups:
            group[key] = probe.defaults[key]
    old_lr = inner.param_groups[0].get("initial_lr", inner.param_groups[0]["lr"])
    if old_lr != cfg.lr:
        changes.append(f"optim.lr: {old_lr} -> {cfg.lr} (the schedule continues from the new base rate)")
    # the schedule's shape comes from cfg (its lambdas are rebuilt, not saved); its base rate was saved
    sched.base_lrs = [cfg.lr] * len(inner.param_groups)
    for group, fn in zip(inner.param_groups, sched.lr_lambdas):
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * fn(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in inner.param_groups]
    return changes
