"""``second_order`` look-ahead: the paper's double backward through the whole network. Exact and slow; the oracle.

    L_w(θ, φ) = (1/N) Σ_i c_i(φ) ℓ_i(θ)              (c from the meta-net, see net.py)
    θ'(φ)     = θ − α P ∇θ L_w(θ, φ)                 (create_graph=True: θ' stays a function of φ)
    ∇φ L_meta(θ'(φ))                                 (reverse mode through the meta forward and the first backward)

``param_names`` restricts the look-ahead to a subset of the parameters (the ``head`` oracle uses the fc layer only:
the other parameters then stay at θ in the meta forward).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer.meta.lookahead import (AutocastFactory, VirtualLossScale, autocast_context, forward_with,
                                    frozen_batchnorm, per_sample_ce, preconditioner, trainable_params)
from trainer.meta.net import Weighting


def second_order_meta_gradient(module: nn.Module, train_batch, meta_batch, lr, weighting: Weighting, *,
                               detach_features: bool, lookahead_optimizer: str = "sgd", optimizer=None,
                               autocast: AutocastFactory = None, scale: Optional[VirtualLossScale] = None,
                               param_names: Optional[Sequence[str]] = None
                               ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(∇φ L_meta aligned with the meta-net's parameters, L_meta) by double backward."""
    x, y = train_batch
    xm, ym = meta_batch
    scale = scale or VirtualLossScale(None, y.device)
    names, params = trainable_params(module, param_names)
    precond = preconditioner(params, optimizer, lookahead_optimizer)
    meta_params = list(weighting.meta_net.parameters())
    # the fused attention kernels have no double backward (ViT): the math kernel is plain differentiable ops
    with frozen_batchnorm(module), torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        with autocast_context(autocast):
            logits = module(x)
        losses = per_sample_ce(logits, y)
        weighted = weighting.weighted_sum(losses, y, detach_features) / losses.shape[0]
        grads = scale.scaled_graph_grad(weighted, params)
        moved = [p - lr * (g if q is None else q * g) for p, g, q in zip(params, grads, precond)]
        meta_loss = per_sample_ce(forward_with(module, names, moved, xm, autocast), ym).mean()
        if scale.enabled:
            phi_grads = [g / scale.scale for g in
                         torch.autograd.grad(meta_loss * scale.scale, meta_params, materialize_grads=True)]
        else:
            phi_grads = list(torch.autograd.grad(meta_loss, meta_params, materialize_grads=True))
    scale.check(phi_grads)
    return phi_grads, meta_loss.detach()
