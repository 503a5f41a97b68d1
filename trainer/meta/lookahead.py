"""Pieces every look-ahead mode shares: unwrapping, BatchNorm protection, the preconditioner, loss scaling.

Conventions used by ``second_order.py``, ``exact.py`` and ``head.py``:

* the virtual step runs on the *unwrapped* module (DDP / DeepSpeed / torch.compile wrappers removed): it uses the
  rank-local gradient, and a backward through a DDP wrapper would start gradient all-reduces. (With the shared
  forward, steps.py, the train batch's graph comes from the wrapper's forward; ``autograd.grad`` runs no reducer
  hook, so that gradient is rank-local too);
* the model is used in whatever mode the caller left it (the trainer calls in train mode, so BatchNorm uses batch
  statistics); ``frozen_batchnorm`` stops those virtual forwards from touching running_mean / running_var /
  num_batches_tracked, so the real step later updates them exactly once, as a plain step would;
* per-sample losses are cross-entropy in at least fp32 (autocast logits are upcast first);
* the model's ``.grad`` fields are never written: every gradient comes from ``torch.autograd.grad``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

AutocastFactory = Optional[Callable[[], ContextManager]]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare network under DDP / DataParallel / DeepSpeed engine / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or \
                type(model).__name__ == "DeepSpeedEngine":
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def frozen_batchnorm(module: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm uses batch statistics but updates no buffer while inside.

    ``_BatchNorm.forward`` only touches running stats / num_batches_tracked when ``training and
    track_running_stats``; with the flag off it passes ``None`` running stats to ``F.batch_norm`` (batch
    statistics, nothing written). This also works for dual-number inputs, where ``torch.func.jvp`` refuses the
    in-place buffer update.
    """
    switched = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


@contextlib.contextmanager
def true_fp32(device: torch.device) -> Iterator[None]:
    """Autocast off and (CUDA) TF32 off inside: for passes whose result is a small difference of large values."""
    cuda = device.type == "cuda"
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) if cuda else None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def trainable_params(module: nn.Module, names: Optional[Sequence[str]] = None) -> tuple[list[str], list[torch.Tensor]]:
    """(names, tensors) of the parameters the look-ahead moves: all that require grad, or the given subset."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if names is not None:
        wanted = set(names)
        named = [(n, p) for n, p in named if n in wanted]
    return [n for n, _ in named], [p for _, p in named]


def per_sample_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ℓ_i in at least fp32: bf16/fp16 logits would quantise the meta-net's features."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, labels, reduction="none")


def autocast_context(factory: AutocastFactory) -> ContextManager:
    return factory() if factory is not None else contextlib.nullcontext()


def forward_with(module: nn.Module, names: Sequence[str], values: Sequence[torch.Tensor], x: torch.Tensor,
                 autocast: AutocastFactory) -> torch.Tensor:
    """Logits of the module with the named parameters replaced by ``values`` (buffers and the rest untouched)."""
    with autocast_context(autocast):
        return functional_call(module, dict(zip(names, values)), (x,))


# --------------------------------------------------------------------------------------------- preconditioner
def preconditioner(params: Sequence[torch.Tensor], optimizer, kind: str) -> list[Optional[torch.Tensor]]:
    """Diagonal P per parameter (None = identity).

    ``sgd``: P = I. ``adam``: P = 1 / (sqrt(v / (1 - β2^t)) + eps), the denominator Adam itself would use with
    the live state (``exp_avg_sq``, ``step``, the group's betas/eps) -- the look-ahead then takes an Adam-shaped
    step on the fresh gradient, without momentum and without weight decay. A parameter with no Adam state yet
    (first step, or an optimiser without ``exp_avg_sq`` such as SGD, or no optimiser at all) gets the identity.
    ``amsgrad``'s max_exp_avg_sq is not used.
    """
    if kind == "sgd" or optimizer is None:
        return [None] * len(params)
    if kind != "adam":
        raise ValueError(f"meta.lookahead_optimizer: {kind!r} is not one of sgd, adam")
    # ZeRO-partitioned optimisers (DeepSpeed) key their state by flat partitions, not by these parameters:
    # every lookup below then misses and the look-ahead falls back to the identity (documented)
    try:
        states = optimizer.state
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    except (AttributeError, KeyError, TypeError):
        return [None] * len(params)
    out: list[Optional[torch.Tensor]] = []
    with torch.no_grad():
        for p in params:
            state = states.get(p) if hasattr(states, "get") else None
            if not state or "exp_avg_sq" not in state or id(p) not in group_of:
                out.append(None)
                continue
            group = group_of[id(p)]
            beta2, eps = group["betas"][1], group["eps"]
            step = state["step"]
            if torch.is_tensor(step) and step.device.type == "cpu":
                step = float(step)  # Adam keeps `step` on the CPU by default: reading it is not a device sync
            if torch.is_tensor(step):  # capturable / fused Adam: stay on the device
                bc2_sqrt = torch.sqrt(1 - beta2 ** step)
            else:
                bc2_sqrt = math.sqrt(1 - beta2 ** step)
            denom = state["exp_avg_sq"].sqrt().div_(bc2_sqrt).add_(eps)
            out.append(denom.reciprocal_().to(p.dtype))
    return out


def apply_preconditioner(grads: Sequence[torch.Tensor], precond: Sequence[Optional[torch.Tensor]]
                         ) -> list[torch.Tensor]:
    """P·g (a new list; the identity entries are passed through)."""
    idx = [i for i, q in enumerate(precond) if q is not None]
    if not idx:
        return list(grads)
    out = list(grads)
    scaled = torch._foreach_mul([grads[i] for i in idx], [precond[i] for i in idx])
    for i, s in zip(idx, scaled):
        out[i] = s
    return out


def sgd_lookahead(params: Sequence[torch.Tensor], step: Sequence[torch.Tensor], lr) -> list[torch.Tensor]:
    """θ' = θ − lr·step as fresh leaves that require grad (no graph back to θ: first-order use only)."""
    with torch.no_grad():
        base = [p.detach() for p in params]
        if torch.is_tensor(lr):
            new = torch._foreach_sub(base, torch._foreach_mul(list(step), lr))
        else:
            new = torch._foreach_add(base, list(step), alpha=-float(lr))
    return [t.requires_grad_() for t in new]


# --------------------------------------------------------------------------------------------- fp16 loss scale
class VirtualLossScale:
    """Loss scaling for the virtual step under fp16 (a no-op otherwise).

    The losses are multiplied by the GradScaler's current scale (read as a device tensor through
    ``scaler.scale``, no sync), the gradients unscaled by hand, and a non-finite value anywhere recorded in
    ``found_inf`` (the same fused kernel GradScaler uses). The caller turns ``found_inf`` into a skip.
    """

    def __init__(self, grad_scaler, device: torch.device):
        self.enabled = grad_scaler is not None and grad_scaler.is_enabled()
        if self.enabled:
            self.scale = grad_scaler.scale(torch.ones((), device=device, dtype=torch.float32))
            self.inv_scale = self.scale.double().reciprocal().float().reshape(1)
            self.found_inf = torch.zeros(1, device=device, dtype=torch.float32)

    def grad(self, loss: torch.Tensor, inputs: Sequence[torch.Tensor], retain_graph: bool = False
             ) -> list[torch.Tensor]:
        """d loss / d inputs (zeros for unused inputs), unscaled and checked when scaling is on.
        ``retain_graph``: the graph is shared with the real step, which back-propagates through it afterwards."""
        if not self.enabled:
            return list(torch.autograd.grad(loss, inputs, retain_graph=retain_graph, materialize_grads=True))
        grads = list(torch.autograd.grad(loss * self.scale, inputs, retain_graph=retain_graph,
                                         materialize_grads=True))
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, self.inv_scale)
        return grads

    def scaled_graph_grad(self, loss: torch.Tensor, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Like ``grad`` but with create_graph=True (second-order oracle): unscale out of place, keep the graph."""
        if not self.enabled:
            return list(torch.autograd.grad(loss, inputs, create_graph=True, materialize_grads=True))
        grads = torch.autograd.grad(loss * self.scale, inputs, create_graph=True, materialize_grads=True)
        grads = [g / self.scale for g in grads]
        self.check([g.detach() for g in grads])
        return grads

    def check(self, tensors: Sequence[torch.Tensor]) -> None:
        """Record a non-finite value in ``tensors`` (0·x is NaN exactly when x is inf/NaN; no overflow in a norm)."""
        if not self.enabled or not tensors:
            return
        zeros = torch._foreach_mul(list(tensors), 0.0)
        flag = torch.stack([n.float() for n in torch._foreach_norm(zeros)]).sum()
        self.found_inf += torch.isnan(flag).to(self.found_inf.dtype).to(self.found_inf.device)
