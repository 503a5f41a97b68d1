"""Imbalance-aware classification losses; every one returns per-sample losses (N,) -- the trainer reduces.

``build_loss(name, loss_cfg, class_counts, epochs)`` with name one of ``train.loss``:

* ``ce``               plain cross-entropy (also what ``meta`` uses: the MetaReweighter weights it);
* ``weighted_ce``      CE × w_{y}, w_k ∝ 1/n_k normalised to mean 1 over the classes;
* ``focal``            −(1 − p_y)^γ log p_y (softmax focal loss, γ = ``focal_gamma``);
* ``class_balanced``   Cui et al. 2019: w_k ∝ (1 − β)/(1 − β^{n_k}) (inverse effective number), normalised to
                       sum K, times a ``cb_base`` of ce or (softmax) focal;
* ``ldam``             Cao et al. 2019: the true-class logit lowered by m_y ∝ n_y^{-1/4} (max = ldam_max_margin),
                       logits × ``ldam_scale``; with DRW: class-balanced weights (β = 0.9999) from ``drw_epoch``
                       (−1 → int(2/3·epochs)) on, weight 1 before;
* ``logit_adjusted``   Menon et al. 2021: CE(z + τ·log π), π the training class prior, τ = ``la_tau``;
* ``balanced_softmax`` Ren et al. 2020: CE(z + log π) (softmax with n_k e^{z_k}).

Zero-count classes (a class missing from the training split) never produce inf/NaN: weight-type losses give an
absent class the neutral weight 1 and normalise the present classes among themselves (so the mean / sum
normalisation still holds over all K classes); LDAM gives it the largest margin; the prior losses count it as
seen once (log π finite; a constant shift of log π does not change the softmax, only the ratios matter).
Counts that are negative, all zero, or of the wrong length are rejected with ``LossError``.

Half-precision logits are upcast to fp32 first: log-softmax of bf16 logits is too coarse for a loss value. The
per-class tables (weights, margins, log prior) are float64 buffers, cast to the logits' dtype at use.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.registry import load
from trainer.components.loss_registry import LOSSES
from common.errors import UserError

LOSS_NAMES = tuple(LOSSES)
DRW_BETA = 0.9999


class LossError(UserError, ValueError):
    """A loss configuration a user can fix (unknown name, bad class counts, bad hyper-parameter)."""


def _counts(class_counts: Sequence[int]) -> torch.Tensor:
    counts = [c for c in class_counts]
    if len(counts) < 2:
        raise LossError(f"class_counts: need one count per class (>= 2 classes), got {counts}")
    for k, c in enumerate(counts):
        if isinstance(c, bool) or not (isinstance(c, numbers.Integral) or (torch.is_tensor(c) and c.dim() == 0)):
            raise LossError(f"class_counts[{k}]: expected an integer count, got {c!r}")
        if int(c) < 0:
            raise LossError(f"class_counts[{k}]: negative count {int(c)}")
    t = torch.tensor([int(c) for c in counts], dtype=torch.float64)
    if t.sum() == 0:
        raise LossError("class_counts: every class has count 0 (empty training split?)")
    return t


def inverse_frequency_weights(counts: torch.Tensor) -> torch.Tensor:
    """w_k ∝ 1/n_k, mean 1 over the classes (absent classes: 1)."""
    present = counts > 0
    w = torch.ones_like(counts)
    inv = 1.0 / counts[present]
    w[present] = inv / inv.mean()
    return w


def class_balanced_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """w_k ∝ (1 − β) / (1 − β^{n_k}) (1 / effective number), sum K over the classes (absent classes: 1)."""
    present = counts > 0
    w = torch.ones_like(counts)
    raw = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=counts.dtype), counts[present]))
    w[present] = raw / raw.sum() * int(present.sum())
    return w


def ldam_margins(counts: torch.Tensor, max_margin: float) -> torch.Tensor:
    """m_k ∝ n_k^{-1/4}, scaled so the largest is max_margin (absent classes: max_margin)."""
    present = counts > 0
    m = torch.full_like(counts, max_margin)
    raw = counts[present] ** -0.25
    m[present] = raw * (max_margin / raw.max())
    return m


def log_prior(counts: torch.Tensor) -> torch.Tensor:
    """log π_k with absent classes counted once."""
    c = counts.clamp_min(1.0)
    return torch.log(c / c.sum())


class PerSampleLoss(nn.Module):
    """Base: ``forward(logits, labels) -> (N,)``; ``set_epoch`` is a no-op unless a subclass schedules something."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def set_epoch(self, epoch: int) -> None:
        pass

    def _check(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise LossError(f"{type(self).__name__}: expected logits of shape (N, {self.num_classes}), "
                            f"got {tuple(logits.shape)}")
        return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits

    def _per_class(self, table: torch.Tensor, labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table.to(device=like.device, dtype=like.dtype)[labels]


class CrossEntropy(PerSampleLoss):
    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._check(logits), labels, reduction="none")


class WeightedCrossEntropy(PerSampleLoss):
    def __init__(self, weights: torch.Tensor):
        super().__init__(weights.numel())
        self.register_buffer("class_weights", weights)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = self._check(logits)
        return self._per_class(self.class_weights, labels, z) * F.cross_entropy(z, labels, reduction="none")


def _focal(z: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    log_p = F.log_softmax(z, dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)
    # (1 - p)^γ with p = exp(log p); clamp keeps a tiny negative rounding from a NaN under fractional γ
    return -((1.0 - log_p.exp()).clamp_min(0.0) ** gamma) * log_p


class FocalLoss(PerSampleLoss):
    def __init__(self, num_classes: int, gamma: float, class_weights: torch.Tensor | None = None):
        super().__init__(num_classes)
        if gamma < 0:
            raise LossError(f"config key 'loss.focal_gamma': must be >= 0, got {gamma}")
        self.gamma = gamma
        self.register_buffer("class_weights", None if class_weights is None else class_weights)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = self._check(logits)
        loss = _focal(z, labels, self.gamma)
        if self.class_weights is not None:
            loss = self._per_class(self.class_weights, labels, z) * loss
        return loss


class LDAMLoss(PerSampleLoss):
    """LDAM with deferred re-weighting: weights switch from 1 to class-balanced at ``drw_epoch``."""

    def __init__(self, counts: torch.Tensor, max_margin: float, scale: float, drw_epoch: int):
        super().__init__(counts.numel())
        if max_margin <= 0 or scale <= 0:
            raise LossError(f"config keys 'loss.ldam_max_margin'/'loss.ldam_scale': must be > 0, "
                            f"got {max_margin}/{scale}")
        self.scale = scale
        self.drw_epoch = drw_epoch
        self.register_buffer("margins", ldam_margins(counts, max_margin))
        self.register_buffer("drw_weights", class_balanced_weights(counts, DRW_BETA))
        self.register_buffer("active_weights", torch.ones_like(counts))

    def set_epoch(self, epoch: int) -> None:
        self.active_weights.copy_(self.drw_weights if epoch >= self.drw_epoch else torch.ones_like(self.drw_weights))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = self._check(logits)
        margin = F.one_hot(labels, self.num_classes).to(z.dtype) * self._per_class(self.margins, labels, z)[:, None]
        loss = F.cross_entropy(self.scale * (z - margin), labels, reduction="none")
        return self._per_class(self.active_weights, labels, z) * loss


class PriorAdjustedCE(PerSampleLoss):
    """CE(z + τ·log π): logit adjustment (τ from the config) and balanced softmax (τ = 1)."""

    def __init__(self, counts: torch.Tensor, tau: float):
        super().__init__(counts.numel())
        self.register_buffer("adjustment", (tau * log_prior(counts)))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = self._check(logits)
        return F.cross_entropy(z + self.adjustment.to(device=z.device, dtype=z.dtype), labels, reduction="none")


# ---------------------------------------------------------------------- builders (named in loss_registry.py)
def build_cross_entropy(counts: torch.Tensor, loss_cfg, epochs: int) -> PerSampleLoss:
    return CrossEntropy(counts.numel())


def build_weighted_ce(counts: torch.Tensor, loss_cfg, epochs: int) -> PerSampleLoss:
    return WeightedCrossEntropy(inverse_frequency_weights(counts))


def build_focal(counts: torch.Tensor, loss_cfg, epochs: int) -> PerSampleLoss:
    return FocalLoss(counts.numel(), loss_cfg.focal_gamma)


def build_class_balanced(counts: torch.Tensor, loss_cfg, epochs: int) -> PerSampleLoss:
    if not 0.0 <= loss_cfg.cb_beta < 1.0:
        raise LossError(f"config key 'loss.cb_beta': must be in [0, 1), got {loss_cfg.cb_beta}")
    weights = class_balanced_weights(counts, loss_cfg.cb_beta)
    if loss_cfg.cb_base == "focal":
        return FocalLoss(counts.numel(), loss_cfg.focal_gamma, class_weights=weights)
    if loss_cfg.cb_base != "ce":
        raise LossError(f"config key 'loss.cb_base': {loss_cfg.cb_base!r} is not one of ce, focal")
    return WeightedCrossEntropy(weights)


def build_ldam(counts: torch.Tensor, loss_cfg, epochs: int) -> PerSampleLoss:
    drw_epoch = loss_cfg.drw_epoch if loss_cfg.drw_epoch >= 0 else int(2 / 3 * epochs)
    loss = LDAMLoss(counts, loss_cfg.ldam_max_margin, loss_cfg.ldam_scale, drw_epoch)
    loss.set_epoch(0)
    return loss


def build_logit_adjusted(counts: torch.Tensor, loss_cfg, epochs: int) -> PerSampleLoss:
    return PriorAdjustedCE(counts, loss_cfg.la_tau)


def build_balanced_softmax(counts: torch.Tensor, loss_cfg, epochs: int) -> PerSampleLoss:
    return PriorAdjustedCE(counts, 1.0)


def build_loss(name: str, loss_cfg, class_counts: Sequence[int], epochs: int) -> PerSampleLoss:
    """The per-sample loss module for ``train.loss = name`` (``loss_cfg`` is a ``LossConfig``)."""
    if name not in LOSSES:
        raise LossError(f"config key 'train.loss': {name!r} is not one of {', '.join(LOSS_NAMES)}")
    return load(LOSSES, name)(_counts(class_counts), loss_cfg, epochs)
