"""``build_model``: any classifier in torchvision's model registry (plus ``tiny``) with a K-way head.

Architecture names come from ``torchvision.models.list_models(module=torchvision.models)`` -- the registry, not a
list kept here -- so config.py does not validate ``model.arch`` (it must not import torch); ``check_model_config``
does, before anything is written, and ``build_model`` again. The K-way head is torchvision's own (its builders
take ``num_classes``, with each family's head initialisation); ``heads.py`` finds it again for the ``head``
look-ahead and for dropping a checkpoint's head. Family differences are data in ``families.py``.
"""
from __future__ import annotations

import difflib
import functools
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from trainer.components.models.errors import ModelError
from trainer.components.models.families import family_of
from trainer.components.models.heads import output_layer_name
from trainer.components.models.pretrained import imagenet_weights, load_pretrained
from trainer.components.models.tiny import TinyCNN

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def available_archs() -> tuple[str, ...]:
    """``tiny`` and every classification model torchvision registers (sorted)."""
    import torchvision

    return ("tiny", *torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str) -> None:
    if arch in available_archs():
        return
    close = difflib.get_close_matches(arch, available_archs(), n=5, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}" if close else "see torchvision.models.list_models()"
    raise ModelError(f"config key 'model.arch': unknown architecture {arch!r} ({hint})")


def _builder_kwargs(cfg, image_size: Optional[int]) -> dict:
    return {"num_classes": cfg.num_classes, **family_of(cfg.arch).build_kwargs(cfg.arch, image_size, cfg.pretrained)}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _dry_run(cfg, image_size: int) -> None:
    """Build on the meta device (no memory, no RNG draws) and push one fake batch through: a size the network
    cannot take fails here, in one line, instead of at the first training step."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                model = torchvision.models.get_model(cfg.arch, weights=None, **_builder_kwargs(cfg, image_size))
        except NotImplementedError:  # a builder that reads tensor values (RegNet's widths): cannot dry-run
            return
        try:
            model.train()(torch.empty(2, 3, image_size, image_size, device="meta"))
        except NotImplementedError:  # an op without a meta kernel: nothing learned about the size
            return
        except Exception as e:
            raise ModelError(f"model.arch={cfg.arch} cannot take data.image_size={image_size}: "
                             f"{_first_line(e)}") from None


def check_model_config(cfg, image_size: Optional[int] = None, lookahead: Optional[str] = None) -> None:
    """Everything about ``cfg`` (a ModelConfig) that can be refused without building the model."""
    check_arch(cfg.arch)
    if cfg.pretrained not in ("none", "imagenet") and not Path(cfg.pretrained).expanduser().is_file():
        raise ModelError(f"model.pretrained: weights file not found: {Path(cfg.pretrained).expanduser()}")
    if cfg.arch == "tiny":
        if cfg.pretrained == "imagenet":
            raise ModelError("model.pretrained: the tiny CNN has no ImageNet weights; use none or a local .pth")
        return
    family = family_of(cfg.arch)
    if lookahead == "head" and family.head_lookahead:
        raise ModelError(f"meta.lookahead=head with model.arch={cfg.arch}: {family.head_lookahead}")
    if cfg.pretrained == "imagenet":
        imagenet_weights(cfg.arch)
    if image_size is not None:
        reason = family.size_rule(cfg.arch, image_size) if family.size_rule else None
        if reason:
            raise ModelError(f"data.image_size={image_size}: {reason}")
        _dry_run(cfg, image_size)


def build_model(cfg, *, image_size: Optional[int] = None, lookahead: Optional[str] = None) -> nn.Module:
    """``cfg`` is a ``ModelConfig`` (arch, pretrained none | imagenet | path, num_classes). ``image_size``: the
    run's input size (ViT/MaxViT are built for it; refused sizes fail here); None = the family's default.
    ``lookahead``: the run's meta.lookahead, so a mode a family cannot do is refused now."""
    check_model_config(cfg, image_size, lookahead)
    if cfg.arch == "tiny":
        model = TinyCNN(cfg.num_classes)
    else:
        import torchvision

        model = torchvision.models.get_model(cfg.arch, weights=None, **_builder_kwargs(cfg, image_size))
    if cfg.pretrained != "none":
        load_pretrained(model, cfg.arch, cfg.pretrained, image_size)
    head = model.get_submodule(output_layer_name(model))
    width = getattr(head, "out_features", getattr(head, "out_channels", None))
    if width != cfg.num_classes:  # the discovery rule and the builder disagree: a family heads.py does not know
        raise ModelError(f"model.arch={cfg.arch}: its output layer {output_layer_name(model)} has {width} outputs, "
                         f"not model.num_classes={cfg.num_classes}; add a rule in trainer/components/models/")
    return model


def to_memory_format(model: nn.Module, cfg, device: torch.device) -> nn.Module:
    """channels_last on CUDA when ``model.channels_last`` asks for it and the family has convolutions to gain."""
    if device.type != "cuda" or not cfg.channels_last:
        return model
    family = family_of(cfg.arch)
    if not family.channels_last:
        log.info("model.channels_last skipped for %s (%s): one patch convolution, then tokens", cfg.arch, family.name)
        return model
    return model.to(memory_format=torch.channels_last)
