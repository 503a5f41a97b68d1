r"""Directional derivatives d_i = ⟨v, ∇θ ℓ_i⟩ from the shared forward's activations: the tangent half of a dual pass.

A dual-number forward (``exact.directional_forward_ad``) recomputes every primal activation next to its tangent: per
convolution the primal conv(x, W) plus the tangent convs conv(ẋ, W) + conv(x, Ẇ). With the shared forward the primal
activations already exist (autograd saved them for the real backward), so this module records each leaf module's
input during that forward and afterwards pushes only tangents through the network, with the saved inputs:

    Conv2d / Linear    ṫ = op(ẋ, W) + op(x, Ẇ, ḃ)          (ẋ = None for the network input: first term skipped)
    BatchNorm (train)  ṫ = γ̇ x̂ + β̇ + γ (ẋ − mean ẋ − x̂ · mean(ẋ x̂)) / σ   (batch statistics, biased variance)
    ReLU               ṫ = ẋ · [x > 0]
    MaxPool2d          ṫ = ẋ at the argmax of x
    AdaptiveAvgPool2d, Flatten: linear, applied to ẋ as is
    cross-entropy      d_i = Σ_c (softmax(z_i)_c − [c = y_i]) ż_ic

The tangent pass runs the model's own ``forward`` with every leaf module's ``forward`` swapped for its tangent rule.
That is only right when the code between the leaf modules is linear in the activations (additions, flatten), so it is
allowed for an explicit list of model classes (torchvision ResNets, TinyCNN) whose leaves all have a rule; anything
else (a product of two activations, as in squeeze-excitation) falls back to the dual-number pass. Saves about one
forward per meta step; equals the dual pass to rounding (tests/test_meta_tangents.py).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Rule = Callable[[nn.Module, torch.Tensor, Optional[torch.Tensor], dict], torch.Tensor]


def _tangent(m: nn.Module, name: str, tangents: dict) -> Optional[torch.Tensor]:
    p = getattr(m, name, None)
    return None if p is None else tangents.get(p)


def _conv(m, x, t, tangents):
    w_dot, b_dot = _tangent(m, "weight", tangents), _tangent(m, "bias", tangents)
    out = m._conv_forward(x, w_dot, b_dot) if w_dot is not None else None
    if t is not None:
        through = m._conv_forward(t, m.weight, None)
        out = through if out is None else out + through
    return out if out is not None else torch.zeros_like(m._conv_forward(x, m.weight, None))


def _linear(m, x, t, tangents):
    w_dot, b_dot = _tangent(m, "weight", tangents), _tangent(m, "bias", tangents)
    out = F.linear(x, w_dot, b_dot) if w_dot is not None else torch.zeros_like(F.linear(x, m.weight))
    return out if t is None else out + F.linear(t, m.weight)


def _batchnorm(m, x, t, tangents):
    # the tangent through the normalisation is BatchNorm's own backward formula applied to ẋ,
    # γ/σ·(ẋ − mean ẋ − x̂·mean(ẋ x̂)): one fused native kernel each for x̂ and for that term
    work = torch.promote_types(x.dtype, torch.float32)
    xw = x.to(work)
    weight = None if m.weight is None else m.weight.to(work)
    x_hat, mean, inv_std = torch.native_batch_norm(xw, None, None, None, None, True, 0.0, m.eps)
    shape = [1, -1] + [1] * (x.dim() - 2)
    out = None
    if t is not None:
        out = torch.ops.aten.native_batch_norm_backward(t.to(work), xw, weight, None, None, mean, inv_std, True,
                                                        m.eps, [True, False, False])[0]
    g_dot, b_dot = _tangent(m, "weight", tangents), _tangent(m, "bias", tangents)
    if g_dot is not None:
        term = x_hat * g_dot.to(work).view(shape)
        out = term if out is None else out.add_(term)
    if b_dot is not None:
        out = b_dot.to(work).view(shape).expand_as(x_hat).clone() if out is None else out.add_(b_dot.to(work).view(shape))
    return (torch.zeros_like(x_hat) if out is None else out).to(t.dtype if t is not None else x.dtype)


def _relu(m, x, t, tangents):
    return None if t is None else torch.ops.aten.threshold_backward(t, x, 0)


def _maxpool(m, x, t, tangents):
    if t is None:
        return None
    _, idx = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True)
    return t.flatten(2).gather(2, idx.flatten(2)).view_as(idx)


def _linear_op(m, x, t, tangents):
    return None if t is None else type(m).forward(m, t)


RULES: dict[type, Rule] = {nn.Conv2d: _conv, nn.Linear: _linear, nn.BatchNorm2d: _batchnorm, nn.ReLU: _relu,
                           nn.MaxPool2d: _maxpool, nn.AdaptiveAvgPool2d: _linear_op, nn.Flatten: _linear_op}


def _supported_model_types() -> tuple[type, ...]:
    from torchvision.models import ResNet

    from trainer.components.models import TinyCNN
    return ResNet, TinyCNN


def _leaves(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if next(m.children(), None) is None]


def supports_saved_tangents(module: nn.Module) -> bool:
    """Whether ``module``'s forward is known to be linear between its leaf modules and every leaf has a rule."""
    if not isinstance(module, _supported_model_types()):
        return False
    for m in _leaves(module):
        if type(m) not in RULES or (isinstance(m, nn.BatchNorm2d) and not m.training):
            return False
    return True


class ActivationRecorder:
    """Inside the block, records each leaf module's input (in call order) and the model's output (logits)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.inputs: dict[nn.Module, list[torch.Tensor]] = {}
        self.logits: Optional[torch.Tensor] = None
        self._handles: list = []

    def __enter__(self) -> "ActivationRecorder":
        def keep(mod, args):
            self.inputs.setdefault(mod, []).append(args[0].detach())

        def out(mod, args, output):
            self.logits = output.detach()

        self._handles = [m.register_forward_pre_hook(keep) for m in _leaves(self.module)]
        self._handles.append(self.module.register_forward_hook(out))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def directional(self, params: Sequence[torch.Tensor], direction: Sequence[torch.Tensor], y: torch.Tensor,
                    autocast=None) -> torch.Tensor:
        """d_i = ⟨direction, ∇θ ℓ_i⟩ (cross-entropy losses) from the recorded forward."""
        from trainer.meta.lookahead import autocast_context

        tangents = {p: t for p, t in zip(params, direction)}
        cursor = {m: 0 for m in self.inputs}
        leaves = _leaves(self.module)

        def rule_for(m):
            def forward(t):
                x = self.inputs[m][cursor[m]]
                cursor[m] += 1
                return RULES[type(m)](m, x, t, tangents)
            return forward

        for m in leaves:
            m.forward = rule_for(m)  # instance attribute: shadows the class's forward during this pass only
        try:
            with torch.no_grad(), autocast_context(autocast):
                z_dot = self.module(None)
        finally:
            for m in leaves:
                del m.forward
        z = self.logits.float() if self.logits.dtype in (torch.float16, torch.bfloat16) else self.logits
        p = torch.softmax(z, dim=1)
        p = p - F.one_hot(y, z.shape[1]).to(p.dtype)
        return (p * z_dot.to(p.dtype)).sum(1)
