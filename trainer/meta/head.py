"""``head`` look-ahead: the virtual step moves only the final linear layer (``fc`` below: the layer
``classifier_layer`` finds -- ResNet's ``fc``, EfficientNet's ``classifier[-1]``, ViT's ``heads.head``, ...).

The fc inputs h (train batch) and h_m (meta batch) are taken, detached, by a forward pre-hook on the final linear
layer: h from the real step's own forward when the forward is shared (``train_features``; the step then costs one
extra no-grad forward of the meta batch), else both from no-grad forwards of the network. Everything after that
involves the tiny head only, so it runs in (at least) fp32 whatever the network's precision, and uses the same first-order algorithm as ``exact.py`` with
θ = (W, b):

    ℓ_i = CE(W h_i + b, y_i),   g = ∇_(W,b) L_w,   (W', b') = (W, b) − α P g,
    v = P ∇_(W',b') CE(W' h_m + b', y_m),   d_i = ⟨v, ∇_(W,b) ℓ_i⟩ (one dual-number pass through F.linear + CE),
    ∇φ L_meta = ∇φ S(φ) with S as in exact.py.

It equals the second-order meta-gradient restricted to the fc parameters (the oracle the tests use:
``second_order_meta_gradient(..., param_names=["fc.weight", "fc.bias"])``). The backbone only runs forward.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from trainer.components.models import classifier_layer
from trainer.meta.exact import surrogate_meta_gradient
from trainer.meta.lookahead import (AutocastFactory, VirtualLossScale, apply_preconditioner, autocast_context,
                                    frozen_batchnorm, per_sample_ce, preconditioner, sgd_lookahead)
from trainer.meta.net import Weighting


@contextlib.contextmanager
def captured_fc_input(fc: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects the (detached) input of every ``fc`` call made inside the block."""
    seen: list[torch.Tensor] = []
    handle = fc.register_forward_pre_hook(lambda _mod, args: seen.append(args[0].detach()))
    try:
        yield seen
    finally:
        handle.remove()


def head_features(module: nn.Module, x: torch.Tensor, autocast: AutocastFactory) -> torch.Tensor:
    """The fc input for a batch: one no-grad forward with BatchNorm buffers protected."""
    fc = classifier_layer(module)
    with captured_fc_input(fc) as seen, frozen_batchnorm(module), torch.no_grad(), autocast_context(autocast):
        module(x)
    if len(seen) != 1:
        raise ValueError(f"meta.lookahead=head: model.fc was called {len(seen)} times in one forward (expected 1)")
    return seen[0]


def _head_losses(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    return per_sample_ce(F.linear(h, weight, bias), y)


def head_meta_gradient(module: nn.Module, train_batch, meta_batch, lr, weighting: Weighting, *,
                       detach_features: bool, lookahead_optimizer: str = "sgd", optimizer=None,
                       autocast: AutocastFactory = None, scale: Optional[VirtualLossScale] = None,
                       train_features: Optional[torch.Tensor] = None,
                       ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(∇φ L_meta for a look-ahead over fc only, L_meta). ``scale`` is unused: the head runs in >= fp32.
    ``train_features``: the train batch's fc input captured in the real step's forward (shared forward)."""
    x, y = train_batch
    xm, ym = meta_batch
    fc = classifier_layer(module)
    h = head_features(module, x, autocast) if train_features is None else train_features.detach()
    h_meta = head_features(module, xm, autocast)
    real = [p for p in (fc.weight, fc.bias) if p is not None and p.requires_grad]
    if not real:
        raise ValueError("meta.lookahead=head: model.fc has no trainable parameters")
    work_dtype = torch.promote_types(fc.weight.dtype, torch.float32)
    precond = [None if q is None else q.to(work_dtype) for q in preconditioner(real, optimizer, lookahead_optimizer)]
    has_bias = fc.bias is not None and fc.bias.requires_grad
    h, h_meta = h.to(work_dtype), h_meta.to(work_dtype)
    weight = fc.weight.detach().to(work_dtype).requires_grad_(fc.weight.requires_grad)
    bias = None if fc.bias is None else fc.bias.detach().to(work_dtype).requires_grad_(has_bias)
    leaves = [t for t in (weight, bias) if t is not None and t.requires_grad]

    def split(ts):  # trainable leaves -> (weight, bias) with the frozen ones filled in
        it = iter(ts)
        w = next(it) if weight.requires_grad else weight
        b = next(it) if has_bias else bias
        return w, b

    with torch.enable_grad():
        losses = _head_losses(h, y, weight, bias)
        weighted = weighting.weighted_sum(losses, y, detach_features) / losses.shape[0]
        grads = list(torch.autograd.grad(weighted, leaves, materialize_grads=True))
        moved = sgd_lookahead(leaves, apply_preconditioner(grads, precond), lr)
        meta_loss = _head_losses(h_meta, ym, *split(moved)).mean()
        v = apply_preconditioner(list(torch.autograd.grad(meta_loss, moved, materialize_grads=True)), precond)
    with torch.no_grad(), fwAD.dual_level():
        duals = [fwAD.make_dual(t.detach(), tv) for t, tv in zip(leaves, v)]
        d = fwAD.unpack_dual(_head_losses(h, y, *split(duals))).tangent
    phi_grads = surrogate_meta_gradient(weighting, losses, d, y, lr, detach_features)
    return phi_grads, meta_loss.detach()
