"""Independent float64 oracles for the meta-gradient tests (shared by tests/unit/test_meta_*.py).

Deliberately re-implements the features, the weighting and the Adam preconditioner from their definitions
(DESIGN.md / the task brief) with loops instead of importing trainer.meta's helpers, so a bug there cannot hide
in both the code and its oracle.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.func import functional_call

from trainer.components.models import TinyCNN

K = 3


def tiny_problem(seed: int = 0, n: int = 8, n_meta: int = 6, size: int = 8, adam_steps: int = 2):
    """TinyCNN (f64, train mode) with a live Adam state (fc.bias left without state), a train and a meta batch."""
    torch.manual_seed(seed)
    model = TinyCNN(K).double().train()
    x = torch.randn(n, 3, size, size, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 2, 1, 0, 2, 0][:n])
    xm = torch.randn(n_meta, 3, size, size, dtype=torch.float64)
    ym = torch.tensor([1, 2, 0, 0, 1, 2][:n_meta])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(adam_steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        model.fc.bias.grad = None  # no Adam state for this one: the preconditioner must fall back to identity
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt, (x, y), (xm, ym)


def hand_coefficients(meta_net, losses, labels, granularity: str, one_hot_input: bool):
    """c_i straight from the definitions."""
    n = losses.shape[0]
    if granularity == "sample":
        rows = []
        for i in range(n):
            f = [losses[i].reshape(1)]
            if one_hot_input:
                f.append(F.one_hot(labels[i], K).to(losses.dtype))
            rows.append(meta_net(torch.cat(f).unsqueeze(0))[0, 0])
        return torch.stack(rows)
    u = []
    for k in range(K):
        mask = labels == k
        u.append(losses[mask].mean() if bool(mask.any()) else losses.new_zeros(()))
    w = meta_net(torch.stack(u).unsqueeze(0))[0]
    if granularity == "batch":
        return w[0].expand(n)
    return torch.stack([w[int(labels[i])] for i in range(n)])


def hand_preconditioner(model, opt, kind: str) -> dict[str, torch.Tensor]:
    """P by parameter name: Adam's bias-corrected denominator, identity where there is no Adam state."""
    out = {}
    for name, p in model.named_parameters():
        st = opt.state.get(p) if kind == "adam" else None
        if not st or "exp_avg_sq" not in st:
            out[name] = torch.ones_like(p)
            continue
        beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
        t = float(st["step"])
        out[name] = 1.0 / (torch.sqrt(st["exp_avg_sq"] / (1 - beta2 ** t)) + eps)
    return out


class MetaLossOfPhi:
    """φ -> L_meta(θ'(φ)) by first-order autograd on a private copy of the model (f64).

    The copy absorbs the BatchNorm buffer updates of its train-mode forwards (outputs use batch statistics, so
    the buffers never influence the value).
    """

    def __init__(self, model, opt, train, meta, lr, meta_net, granularity, lookahead_optimizer, detach_features,
                 one_hot_input=False, param_names=None):
        self.precond = hand_preconditioner(model, opt, lookahead_optimizer)
        self.model = copy.deepcopy(model)
        self.train, self.meta, self.lr, self.meta_net = train, meta, lr, meta_net
        self.granularity, self.detach, self.one_hot_input = granularity, detach_features, one_hot_input
        self.param_names = param_names

    def __call__(self) -> torch.Tensor:
        (x, y), (xm, ym) = self.train, self.meta
        named = {n: p for n, p in self.model.named_parameters()
                 if self.param_names is None or n in self.param_names}
        losses = F.cross_entropy(self.model(x), y, reduction="none")
        feats = losses.detach() if self.detach else losses
        c = hand_coefficients(self.meta_net, feats, y, self.granularity, self.one_hot_input)
        weighted = (c * losses).sum() / losses.shape[0]
        grads = torch.autograd.grad(weighted, list(named.values()))
        moved = {n: p.detach() - self.lr * self.precond[n] * g for (n, p), g in zip(named.items(), grads)}
        return F.cross_entropy(functional_call(self.model, moved, (xm,)), ym)


def fd_along(fn, meta_net, direction, h: float = 1e-5) -> float:
    """Central difference of fn() along ``direction`` (tensors aligned with meta_net's parameters); φ restored."""
    params = list(meta_net.parameters())
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, dv in zip(params, direction):
            p.add_(dv, alpha=h)
    plus = fn().item()
    with torch.no_grad():
        for p, s, dv in zip(params, saved, direction):
            p.copy_(s).add_(dv, alpha=-h)
    minus = fn().item()
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    return (plus - minus) / (2 * h)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def single_thread():
    """Generator for a module-scoped autouse fixture: these tensors are tiny, and on a busy 2-core machine two
    OpenMP threads spin against each other (measured 100x slower); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
