"""Model factory: torchvision ResNets with K outputs (and a tiny CNN for tests and CPU smoke runs).

Every model built here ends in ``model.fc`` (an ``nn.Linear``): the ``head`` look-ahead relies on that name.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from common.errors import UserError

log = logging.getLogger(__name__)


class ModelError(UserError, ValueError):
    """A model config a user can fix (bad arch, missing or incompatible weights file)."""


class TinyCNN(nn.Module):
    """conv-BN-ReLU x2 + global pool + fc: BatchNorm included on purpose (the meta step must respect its buffers)."""

    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


_RESNETS = ("resnet18", "resnet34", "resnet50")


def _load_state_dict_file(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(f"model.pretrained: weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad pickle/zip
        raise ModelError(f"model.pretrained: cannot read {path}: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"model.pretrained: {path} does not hold a state dict")
    # checkpoints saved from DDP carry a "module." prefix
    return {k.removeprefix("module."): v for k, v in state.items()}


def _imagenet_state_dict(arch: str) -> dict:
    """torchvision's ImageNet weights from TORCH_HOME; fetched only where a network exists."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch).DEFAULT
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    filename = os.path.basename(weights.url)
    target = hub_dir / filename
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as e:
        raise ModelError(
            f"model.pretrained=imagenet: could not load torchvision's {arch} weights ({e.__class__.__name__}). "
            f"Offline, download {weights.url} elsewhere and place it at {target} "
            f"(or set model.pretrained to a local .pth path)") from None


def build_model(cfg) -> nn.Module:
    """``cfg`` is a ``ModelConfig``: arch, pretrained (none | imagenet | path), num_classes."""
    k = cfg.num_classes
    if cfg.arch == "tiny":
        if cfg.pretrained != "none":
            raise ModelError("model.pretrained: the tiny CNN has no pretrained weights; use none")
        return TinyCNN(k)
    if cfg.arch not in _RESNETS:
        raise ModelError(f"model.arch: unknown architecture {cfg.arch!r} (choose from tiny, {', '.join(_RESNETS)})")
    import torchvision

    model = getattr(torchvision.models, cfg.arch)(weights=None)
    if cfg.pretrained != "none":
        if cfg.pretrained == "imagenet":
            state = _imagenet_state_dict(cfg.arch)
        else:
            state = _load_state_dict_file(Path(cfg.pretrained).expanduser())
        # the ImageNet head has 1000 outputs; ours has K, so it is always re-initialised
        state = {kk: v for kk, v in state.items() if not kk.startswith("fc.")}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches (e.g. resnet50 weights for a resnet18) raise, not report
            first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
            raise ModelError(f"model.pretrained: {cfg.pretrained} does not fit {cfg.arch}: {first}") from None
        missing = [m for m in missing if not m.startswith("fc.")]
        if missing or unexpected:
            raise ModelError(
                f"model.pretrained: {cfg.pretrained} does not fit {cfg.arch}: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        log.info("loaded pretrained %s backbone from %s", cfg.arch, cfg.pretrained)
    model.fc = nn.Linear(model.fc.in_features, k)
    return model
