"""Model families: what differs between torchvision classifiers, as data. The extension point for new families.

A ``FamilyRule`` says, for the architectures whose name starts with one of its prefixes, which extra builder
arguments they need (input size, auxiliary heads off), how a pretrained state dict is adapted to the model that
was built (position embeddings resized, auxiliary heads dropped), which input sizes they refuse, and whether
channels_last / the ``head`` look-ahead mean anything for them. Everything else -- K-way head, head discovery,
pretrained loading -- is generic (factory.py, heads.py, pretrained.py). The first matching rule wins; an
architecture without a rule gets ``GENERIC``. Add a family with ``register_family`` (before the generic default).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

log = logging.getLogger(__name__)

# (arch, image_size or None, pretrained?) -> extra keyword arguments for torchvision's builder
BuildKwargs = Callable[[str, Optional[int], str], dict]
# (arch, image_size) -> why this size is refused, or None
SizeRule = Callable[[str, int], Optional[str]]
# (arch, checkpoint state, the built model) -> the checkpoint state adapted to that model
AdaptState = Callable[[str, dict, nn.Module], dict]


def _no_kwargs(arch: str, image_size: Optional[int], pretrained: str) -> dict:
    return {}


def _keep(arch: str, state: dict, model: nn.Module) -> dict:
    return state


@dataclass(frozen=True)
class FamilyRule:
    name: str                                   # shown in logs, errors and the README table
    prefixes: tuple[str, ...]                   # architecture names this rule covers (str.startswith)
    build_kwargs: BuildKwargs = _no_kwargs
    size_rule: Optional[SizeRule] = None        # the generic meta-device dry run (factory.py) catches the rest
    adapt_state: AdaptState = _keep
    channels_last: bool = True                  # False: the memory format is skipped with a log line
    head_lookahead: Optional[str] = None        # why meta.lookahead=head is refused; None = supported
    notes: str = field(default="", compare=False)

    def matches(self, arch: str) -> bool:
        return arch.startswith(self.prefixes)


# ----------------------------------------------------------------------------------------------- ViT
def _vit_patch(arch: str) -> int:
    match = re.search(r"_(\d+)$", arch)  # vit_b_16 -> 16, vit_h_14 -> 14
    return int(match.group(1)) if match else 16


def _vit_kwargs(arch: str, image_size: Optional[int], pretrained: str) -> dict:
    # torchvision's ViT asserts its input size: build it for the run's size (position embeddings sized to match)
    return {} if image_size is None else {"image_size": image_size}


def _vit_size(arch: str, image_size: int) -> Optional[str]:
    patch = _vit_patch(arch)
    if image_size % patch:
        return f"{arch} cuts the image into {patch}x{patch} patches: data.image_size must be a multiple of {patch}"
    return None


def _vit_adapt(arch: str, state: dict, model: nn.Module) -> dict:
    """Resize the checkpoint's position embeddings to the model's grid (bicubic, as torchvision does)."""
    key = "encoder.pos_embedding"
    if key not in state or state[key].shape == model.state_dict()[key].shape:
        return state
    from torchvision.models.vision_transformer import interpolate_embeddings

    log.info("%s: interpolating the pretrained position embeddings %s -> %s", arch, tuple(state[key].shape),
             tuple(model.state_dict()[key].shape))
    return dict(interpolate_embeddings(model.image_size, model.patch_size, state))


# ----------------------------------------------------------------------------------------------- Inception / GoogLeNet
def _aux_free_kwargs(arch: str, image_size: Optional[int], pretrained: str) -> dict:
    # in train mode the auxiliary heads make forward() return a tuple: the trainer and every look-ahead expect
    # plain logits, and the paper's method has no auxiliary loss. ImageNet weights were trained on inputs
    # normalised to [-1, 1]: torchvision's transform_input converts ImageNet-normalised inputs for them.
    return {"aux_logits": False, "init_weights": pretrained == "none", "transform_input": pretrained == "imagenet"}


def _drop_prefixes(*prefixes: str) -> AdaptState:
    def adapt(arch: str, state: dict, model: nn.Module) -> dict:
        return {k: v for k, v in state.items() if not k.startswith(prefixes)}
    return adapt


def _inception_size(arch: str, image_size: int) -> Optional[str]:
    return None if image_size >= 75 else f"{arch} needs data.image_size >= 75 (its stem reduces smaller inputs to nothing)"


# ----------------------------------------------------------------------------------------------- MaxViT
def _maxvit_kwargs(arch: str, image_size: Optional[int], pretrained: str) -> dict:
    return {} if image_size is None else {"input_size": (image_size, image_size)}


def _maxvit_size(arch: str, image_size: int) -> Optional[str]:
    # 7x7 window partitions at stride 32: the last grid must be a multiple of 7
    return None if image_size % 224 == 0 else f"{arch} partitions 7x7 windows at stride 32: data.image_size must " \
                                              "be a multiple of 224"


VIT = FamilyRule("ViT", ("vit_",), build_kwargs=_vit_kwargs, size_rule=_vit_size, adapt_state=_vit_adapt,
                 channels_last=False, notes="position embeddings interpolated to data.image_size")
SWIN = FamilyRule("Swin", ("swin_",), channels_last=False, notes="tokens after the patch convolution")
MAXVIT = FamilyRule("MaxViT", ("maxvit_",), build_kwargs=_maxvit_kwargs, size_rule=_maxvit_size)
INCEPTION = FamilyRule("Inception-v3", ("inception_v3",), build_kwargs=_aux_free_kwargs, size_rule=_inception_size,
                       adapt_state=_drop_prefixes("AuxLogits."), notes="auxiliary logits off")
GOOGLENET = FamilyRule("GoogLeNet", ("googlenet",), build_kwargs=_aux_free_kwargs,
                       adapt_state=_drop_prefixes("aux1.", "aux2."), notes="auxiliary logits off")
SQUEEZENET = FamilyRule("SqueezeNet", ("squeezenet",),
                        head_lookahead="SqueezeNet ends in a 1x1 convolution, not a linear layer: "
                                       "use meta.lookahead=exact or second_order")
GENERIC = FamilyRule("generic", ("",))

_RULES: list[FamilyRule] = [VIT, SWIN, MAXVIT, INCEPTION, GOOGLENET, SQUEEZENET]


def register_family(rule: FamilyRule) -> None:
    """Add (or replace, by name) a family rule; it is tried before the built-in ones."""
    _RULES[:] = [rule] + [r for r in _RULES if r.name != rule.name]


def family_of(arch: str) -> FamilyRule:
    return next((r for r in _RULES if r.matches(arch)), GENERIC)
