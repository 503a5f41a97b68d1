r"""``exact`` look-ahead: the second-order meta-gradient without a double backward through the network.

Derivation
----------
Write the weighted loss as a function of the N per-sample losses,

    L̂(ℓ, φ) = (1/N) Σ_i c_i(f(ℓ), φ) · ℓ_i,        L_w(θ, φ) = L̂(ℓ(θ), φ),

where f are the meta-net's features: per-class means u = Mᵀℓ / n (M the N×K one-hot labels, n the class counts,
clamped to 1) for the ``batch`` and ``class`` granularities, and f_i = (ℓ_i[, onehot(y_i)]) for ``sample``; c_i = w
(batch), w_{y_i} (class) or g_φ(f_i) (sample). With θ'(φ) = θ − α P ∇θ L_w(θ, φ) and P diagonal (symmetric, and
independent of φ):

    ∇φ L_meta(θ'(φ)) = (∂θ'/∂φ)ᵀ ∇θ' L_meta = −α ∂/∂φ ⟨v, ∇θ L_w(θ, φ)⟩ |_{v fixed},   v = P ∇θ' L_meta(θ').

⟨v, ∇θ L_w⟩ is the directional derivative D_v L_w. L_w depends on θ only through ℓ, so by the chain rule

    D_v L_w = Σ_i ∂L̂/∂ℓ_i · D_v ℓ_i = D_ℓ L̂(ℓ, φ)[d],          d_i = D_v ℓ_i = ⟨v, ∇θ ℓ_i(θ)⟩,

i.e. a Jacobian-vector product of the *tiny* function L̂ (N inputs) with tangent d. Expanded:

    D_ℓ L̂[d] = (1/N) Σ_i [ c_i d_i + ℓ_i · D c_i ],
      batch / class:  D c_i = J_u c_i · e,             e = D u[d] = Mᵀd / n   (e_k = mean of d_i over class k)
      sample:         D c_i = ∂c_i/∂ℓ_i · d_i          (the one-hot part of f_i is constant)
      detached features: D c_i = 0, leaving (1/N) Σ_i c_i d_i.

So   ∇φ L_meta = ∇φ S(φ),   S(φ) = −α · D_ℓ L̂(ℓ, φ)[d]   with ℓ, d held constant.

Algorithm (one meta-step):
  1. forward + ordinary backward at θ on the train batch: ℓ, g = ∇θ L_w;
  2. θ' = θ − α P g; forward + ordinary backward at θ' on the meta batch: v = P ∇θ' L_meta;
  3. d = directional derivatives of ℓ along v: ONE forward pass with dual-number parameters (θ + ε v̂, forward-mode
     AD; BatchNorm's batch statistics are differentiated, its buffers left alone), or a central difference
     ``(ℓ(θ + h v̂) − ℓ(θ − h v̂)) / 2h`` with v̂ = v/‖v‖ and h = ``fd_eps`` (the step is scaled by ‖v‖, so the
     perturbation of θ has norm fd_eps whatever the gradient scale; d is rescaled by ‖v‖ afterwards);
  4. S: a forward-mode pass through the meta-net with dual input ℓ + ε d (this yields J_u c·e or ∂c/∂ℓ·d for free),
     then reverse mode from the tangent of Σ c_i ℓ_i to φ.
The network sees two forwards, two ordinary backwards and one dual forward; never a graph of its own gradient.
Special case ``batch`` granularity + ``detach_features``: c_i = w for all i and w is constant in θ, so
(1/N) Σ c_i d_i = w · ⟨v, ∇θ mean(ℓ)⟩ and step 1's gradient of mean(ℓ) gives it by a dot product -- step 3 is
skipped (d_i is replaced by its mean, which leaves S unchanged because every c_i is the same).

The dual forward uses the unit tangent v̂ and multiplies d by ‖v‖ afterwards (linear, so exact): tangents of
activations then have a fixed scale, which matters under fp16 autocast where a raw ‖v‖ ~ α·|grad| would underflow.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer.meta.lookahead import (AutocastFactory, VirtualLossScale, apply_preconditioner, autocast_context,
                                    forward_with, frozen_batchnorm, per_sample_ce, preconditioner, sgd_lookahead,
                                    trainable_params, true_fp32)
from trainer.meta.net import Weighting
from trainer.meta.randomness import RngSnapshot

# forward_ad's first make_dual loads torch's own JIT-scripted decompositions, which warn about torch.jit.script's
# deprecation on every run; that is torch talking to itself, not something a user can act on
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)


def _unit_direction(v: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(v / ‖v‖, ‖v‖) with ‖v‖ over all tensors; a zero v gives a zero direction (and d = 0), not NaN."""
    v = list(v)
    acc = torch.float64 if any(t.dtype == torch.float64 for t in v) else torch.float32
    norm = torch.linalg.vector_norm(torch.stack([n.to(acc) for n in torch._foreach_norm(v)]))
    inv = norm.clamp_min(torch.finfo(acc).tiny).reciprocal()
    if all(t.dtype == acc for t in v):
        return torch._foreach_mul(v, inv), norm
    return [t.mul(inv.to(t.dtype)) for t in v], norm


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over tensors of ⟨a_j, b_j⟩, accumulated in at least fp32."""
    with torch.no_grad():
        acc = torch.promote_types(a[0].dtype, torch.float32)
        return torch.stack([torch.vdot(x.reshape(-1).to(acc), z.reshape(-1).to(acc)) for x, z in zip(a, b)]).sum()


def directional_forward_ad(module: nn.Module, names: Sequence[str], params: Sequence[torch.Tensor],
                           v: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                           autocast: AutocastFactory = None) -> torch.Tensor:
    """d_i = ⟨v, ∇θ ℓ_i(θ)⟩ for all i from one forward pass with dual-number parameters (call inside
    ``frozen_batchnorm``)."""
    direction, norm = _unit_direction(v)
    # forward-mode AD is implemented for the math attention kernel only (not the CPU flash kernel ViT would pick)
    with torch.no_grad(), fwAD.dual_level(), sdpa_kernel(SDPBackend.MATH):
        duals = {n: fwAD.make_dual(p.detach(), t) for n, p, t in zip(names, params, direction)}
        with autocast_context(autocast):
            logits = functional_call(module, duals, (x,))
        tangent = fwAD.unpack_dual(per_sample_ce(logits, y)).tangent
    return tangent * norm.to(tangent.dtype)


def directional_fd(module: nn.Module, names: Sequence[str], params: Sequence[torch.Tensor],
                   v: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor, fd_eps: float,
                   rng: Optional[RngSnapshot] = None) -> torch.Tensor:
    """Central difference along v̂ with step fd_eps (two plain forwards; O(fd_eps²) truncation error); both
    forwards replay ``rng`` (the same dropout masks on either side of θ).

    Always in true fp32 (or the parameters' float64): a step of fd_eps spread over millions of weights is ~1e-7 per
    weight, below bf16/fp16 (and TF32) rounding, so under reduced precision the difference would be rounding noise
    (measured: cosine −0.5..0.4 to the fp32 result on resnet18 under bf16). Autocast and TF32 are off for these two
    forwards; low-precision parameters (DeepSpeed bf16) and inputs are upcast.
    """
    replay = rng.replay if rng is not None else contextlib.nullcontext
    direction, norm = _unit_direction(v)
    work = torch.promote_types(params[0].dtype, torch.float32)
    with torch.no_grad(), true_fp32(x.device):
        base = [p.detach().to(work) for p in params]
        plus = torch._foreach_add(base, [t.to(work) for t in direction], alpha=fd_eps)
        minus = torch._foreach_add(base, [t.to(work) for t in direction], alpha=-fd_eps)
        xw = x.to(work) if x.is_floating_point() else x
        with replay():
            loss_plus = per_sample_ce(forward_with(module, names, plus, xw, None), y)
        with replay():
            loss_minus = per_sample_ce(forward_with(module, names, minus, xw, None), y)
        return (loss_plus - loss_minus) * (norm.to(loss_plus.dtype) / (2.0 * fd_eps))


def surrogate_meta_gradient(weighting: Weighting, losses: torch.Tensor, d: torch.Tensor, labels: torch.Tensor,
                            lr, detach_features: bool) -> list[torch.Tensor]:
    """∇φ S(φ), S = −α · D_ℓ L̂(ℓ, φ)[d]: forward mode through the meta-net, then reverse mode to φ."""
    meta_params = list(weighting.meta_net.parameters())
    losses_m = weighting.to_meta(losses.detach())
    d_m = weighting.to_meta(d.detach())
    one_hot = weighting.one_hot(labels)
    with torch.enable_grad(), fwAD.dual_level():
        dual_losses = fwAD.make_dual(losses_m, d_m)
        total = weighting.weighted_sum(dual_losses, labels, detach_features, one_hot)
        jvp = fwAD.unpack_dual(total).tangent
        surrogate = jvp * (-lr / losses_m.shape[0])
        return list(torch.autograd.grad(surrogate, meta_params, materialize_grads=True))


def exact_meta_gradient(module: nn.Module, train_batch, meta_batch, lr, weighting: Weighting, *,
                        detach_features: bool, lookahead_optimizer: str = "sgd", optimizer=None,
                        directional: str = "forward_ad", fd_eps: float = 1e-3,
                        autocast: AutocastFactory = None, scale: Optional[VirtualLossScale] = None,
                        train_losses: Optional[torch.Tensor] = None, virtual_out: Optional[list] = None,
                        mean_grad_out: Optional[list] = None, saved=None, rng: Optional[RngSnapshot] = None,
                        ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(∇φ L_meta aligned with the meta-net's parameters, L_meta); same value as the second-order oracle.

    ``train_losses``: the per-sample train losses of the real step's own forward, graph attached (shared forward).
    Step 1 then takes the virtual gradient from that graph with ``retain_graph=True`` instead of running the
    network again; the caller back-propagates its real loss through the same graph afterwards.
    ``virtual_out``: receives the virtual gradient ∇θ L_w (``meta.real_step: lagged`` uses it as the real one).
    ``mean_grad_out``: batch granularity + detached features only, receives ∇θ mean(ℓ): the real step's gradient is
    then w_new·∇θ mean(ℓ) exactly, with no backward of its own.
    ``saved``: a ``tangents.ActivationRecorder`` that watched the shared forward; step 3 then pushes only tangents
    through the saved activations instead of a full dual-number forward (same value, about one forward cheaper).
    ``rng``: the generator state the train batch's forward started from (taken here, before step 1, when None; a
    caller that runs that forward itself -- the shared forward -- must snapshot before it and pass the snapshot).
    """
    if directional not in ("forward_ad", "fd"):
        raise ValueError(f"meta.directional: {directional!r} is not one of forward_ad, fd")
    x, y = train_batch
    xm, ym = meta_batch
    scale = scale or VirtualLossScale(None, y.device)
    names, params = trainable_params(module)
    precond = preconditioner(params, optimizer, lookahead_optimizer)
    # batch granularity with detached features: c_i = w for every i and w does not depend on θ, so
    # ∇θ L_w = w ∇θ mean(ℓ) and S only needs mean_i d_i = ⟨v, ∇θ mean(ℓ)⟩ -- a dot product with a gradient
    # step 1 already has. The third network pass (dual or finite-difference forwards) is skipped.
    shared_weight = weighting.granularity == "batch" and detach_features
    retain = train_losses is not None
    rng = rng or RngSnapshot(x.device)  # step 3 replays step 1's dropout / stochastic-depth draws
    with frozen_batchnorm(module), torch.enable_grad():
        # 1. virtual gradient at θ (the meta-net part of this graph is not differentiated here)
        if train_losses is None:
            with autocast_context(autocast):
                logits = module(x)
            losses = per_sample_ce(logits, y)
            del logits
        else:
            losses = train_losses
        if shared_weight:
            mean_grads = scale.grad(losses.mean(), params, retain_graph=retain)
            if mean_grad_out is not None:
                mean_grad_out.extend(mean_grads)
            with torch.no_grad():
                w = weighting.coefficients(weighting.to_meta(losses.detach()), y)[0]
                grads = [g * w.to(g.dtype) for g in mean_grads]
        else:
            weighted = weighting.weighted_sum(losses, y, detach_features) / losses.shape[0]
            grads = scale.grad(weighted, params, retain_graph=retain)
            del weighted
        if virtual_out is not None:
            virtual_out.extend(grads)
        # 2. look-ahead and the meta loss's gradient at θ'
        moved = sgd_lookahead(params, apply_preconditioner(grads, precond), lr)
        del grads
        meta_loss = per_sample_ce(forward_with(module, names, moved, xm, autocast), ym).mean()
        v = apply_preconditioner(scale.grad(meta_loss, moved), precond)
        del moved
        # 3. directional derivatives of the per-sample train losses along v
        if shared_weight:
            d = _dot(v, mean_grads).to(losses.dtype).expand(losses.shape[0])
        elif directional == "forward_ad" and saved is not None:
            direction, norm = _unit_direction(v)
            d = saved.directional(params, direction, y, autocast)
            d = d * norm.to(d.dtype)
        elif directional == "forward_ad":
            with rng.replay():
                d = directional_forward_ad(module, names, params, v, x, y, autocast)
        else:
            d = directional_fd(module, names, params, v, x, y, fd_eps, rng)
    scale.check([d])
    # 4. the meta-net part
    phi_grads = surrogate_meta_gradient(weighting, losses.detach(), d, y, lr, detach_features)
    return phi_grads, meta_loss.detach()
