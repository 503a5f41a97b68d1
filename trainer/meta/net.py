"""The meta-net g_φ and the weighting it defines: per-sample losses ℓ (N,) -> per-sample coefficients c (N,).

Granularities (``meta.granularity``):

* ``batch``  -- input the K per-class mean losses u, output one weight shared by the whole batch (the paper);
* ``class``  -- input u, output K weights; sample i gets the weight of its label, c_i = w_{y_i};
* ``sample`` -- MW-Net: the net is applied to every sample's own loss ℓ_i (plus the one-hot label when
  ``sample_one_hot``), one weight per sample.

u_k is the mean loss of the batch samples with label k, 0 for a class absent from the batch. Everything here is
written with plain differentiable tensor ops so the same code serves reverse mode (second-order oracle), dual
numbers (the ``exact`` look-ahead pushes a tangent through it) and the no-grad real-step weights.

The net always runs in its own dtype (fp32 unless a test asks for float64) with autocast disabled: the features
are per-class *means of losses*, whose small differences bf16 would round away.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from trainer.meta.modes import GRANULARITIES


class MetaNet(nn.Module):
    """Linear(in, h1)-ReLU-...-Linear(h_last, out)-sigmoid, as in the paper (hidden [32, 16] by default)."""

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (32, 16)):
        super().__init__()
        sizes = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers += [nn.Linear(sizes[-1], out_features), nn.Sigmoid()]
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def meta_net_sizes(granularity: str, num_classes: int, sample_one_hot: bool) -> tuple[int, int]:
    """(input, output) width of the meta-net for a granularity."""
    if granularity == "batch":
        return num_classes, 1
    if granularity == "class":
        return num_classes, num_classes
    if granularity == "sample":
        return 1 + (num_classes if sample_one_hot else 0), 1
    raise ValueError(f"meta.granularity: {granularity!r} is not one of {', '.join(GRANULARITIES)}")


def class_mean_losses(losses: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
    """u_k = mean of ℓ_i over the samples of class k; 0 where class k is absent (no division by zero, no sync)."""
    counts = one_hot.sum(0).clamp_min(1.0)
    return (losses @ one_hot) / counts


class Weighting:
    """Turns per-sample losses into per-sample coefficients c_i with the meta-net; stateless apart from the net."""

    def __init__(self, meta_net: MetaNet, granularity: str, num_classes: int, sample_one_hot: bool):
        if granularity not in GRANULARITIES:
            raise ValueError(f"meta.granularity: {granularity!r} is not one of {', '.join(GRANULARITIES)}")
        self.meta_net = meta_net
        self.granularity = granularity
        self.num_classes = num_classes
        self.sample_one_hot = sample_one_hot

    def _param(self) -> torch.Tensor:
        return next(self.meta_net.parameters())

    def to_meta(self, t: torch.Tensor) -> torch.Tensor:
        """Cast losses (or their tangents) to the meta-net's dtype/device (fp32: bf16 losses are too coarse)."""
        p = self._param()
        return t.to(device=p.device, dtype=p.dtype)

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        p = self._param()
        return nn.functional.one_hot(labels.to(p.device), self.num_classes).to(p.dtype)

    def coefficients(self, feature_losses: torch.Tensor, labels: torch.Tensor,
                     one_hot: torch.Tensor | None = None) -> torch.Tensor:
        """c (N,) from the losses the features are built from (already in meta dtype; may be dual numbers)."""
        if one_hot is None:
            one_hot = self.one_hot(labels)
        # the trainer may call us inside its autocast block; the meta-net must stay in its own precision
        with torch.autocast(device_type=feature_losses.device.type, enabled=False):
            if self.granularity == "sample":
                feats = feature_losses.unsqueeze(1)
                if self.sample_one_hot:
                    feats = torch.cat([feats, one_hot], dim=1)
                return self.meta_net(feats).squeeze(1)
            u = class_mean_losses(feature_losses, one_hot)
            w = self.meta_net(u.unsqueeze(0)).squeeze(0)  # (1,) or (K,)
            if self.granularity == "batch":
                return w.expand(feature_losses.shape[0])
            return one_hot @ w  # w_{y_i} without an index gather (keeps dual numbers simple)

    def weighted_sum(self, losses: torch.Tensor, labels: torch.Tensor, detach_features: bool,
                     one_hot: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_i c_i ℓ_i, c built from ℓ itself (or from its detached value when the features are detached).

        The features and c live in the meta-net dtype; the product is taken in the losses' dtype so the network
        side of the graph keeps its own precision. ``detach()`` also drops a dual number's tangent, which is
        exactly "features held constant" for the forward-mode pass.
        """
        feats = self.to_meta(losses.detach() if detach_features else losses)
        c = self.coefficients(feats, labels, one_hot)
        return (c.to(losses.dtype) * losses).sum()
