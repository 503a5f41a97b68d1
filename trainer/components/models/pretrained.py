"""Pretrained backbones: torchvision's ImageNet weights from the torch hub cache, or a local ``.pth``.

The checkpoint's classifier (1000 ImageNet classes, or another K) is always dropped -- the model keeps its freshly
initialised K-way head -- and every other tensor must fit: a missing key, an unexpected key or a shape mismatch
is one ModelError naming the first offender.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from trainer.components.models.errors import ModelError
from trainer.components.models.families import family_of
from trainer.components.models.heads import output_layer_name

log = logging.getLogger(__name__)


def load_state_dict_file(path: Path) -> dict:
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


def imagenet_weights(arch: str):
    """torchvision's DEFAULT weights enum entry for ``arch`` (ModelError when it has none)."""
    from torchvision.models import get_model_weights

    try:
        return get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise ModelError(f"model.pretrained=imagenet: torchvision has no ImageNet weights for {arch}; "
                         "use model.pretrained=none or a local .pth") from None


def native_size(arch: str) -> Optional[int]:
    """The crop size torchvision's ImageNet weights for ``arch`` were evaluated at (None when unknown)."""
    try:
        return int(imagenet_weights(arch).transforms.keywords["crop_size"])
    except (ModelError, AttributeError, KeyError, TypeError, ValueError):
        return None


def imagenet_state_dict(arch: str) -> dict:
    """torchvision's ImageNet weights from TORCH_HOME; fetched only where a network exists."""
    weights = imagenet_weights(arch)
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as e:
        raise ModelError(
            f"model.pretrained=imagenet: could not load torchvision's {arch} weights ({e.__class__.__name__}). "
            f"Offline, download {weights.url} elsewhere and place it at {target} "
            f"(or set model.pretrained to a local .pth path)") from None


def load_pretrained(model: nn.Module, arch: str, pretrained: str, image_size: Optional[int]) -> None:
    """Copy a checkpoint's backbone into ``model`` (its K-way head kept as built)."""
    if pretrained == "imagenet":
        state = imagenet_state_dict(arch)
        native = native_size(arch)
        if native is not None and image_size is not None and native != image_size:
            log.info("%s ImageNet weights were trained at %d px; this run uses data.image_size=%d", arch, native,
                     image_size)
    else:
        state = load_state_dict_file(Path(pretrained).expanduser())
    head = output_layer_name(model) + "."
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    state = family_of(arch).adapt_state(arch, state, model)
    own = model.state_dict()
    for key, value in state.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise ModelError(f"model.pretrained: {pretrained} does not fit {arch}: {key} has shape "
                             f"{tuple(value.shape)} in the checkpoint, {tuple(own[key].shape)} in the model")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.startswith(head)]
    if missing or unexpected:
        raise ModelError(
            f"model.pretrained: {pretrained} does not fit {arch}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    log.info("loaded pretrained %s backbone from %s (head %s re-initialised)", arch, pretrained, head[:-1])
