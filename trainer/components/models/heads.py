"""Where a network's classifier is: found generically, not by a per-family list of attribute names.

Rule: the output layer is the last ``nn.Linear`` in module (registration) order. Every torchvision classifier
registers its head after everything it feeds from -- ``fc`` (ResNet, RegNet, ShuffleNet, Inception, GoogLeNet),
``classifier[-1]`` (EfficientNet, MobileNet, MNASNet, DenseNet, ConvNeXt, VGG, AlexNet, MaxViT), ``heads.head``
(ViT), ``head`` (Swin) -- and the auxiliary heads of Inception-v3 / GoogLeNet are registered before their main
``fc``. tests/unit/test_model_families.py checks the rule against torchvision's own ``num_classes`` head for every
classification model in the registry. SqueezeNet has no linear layer: its output layer is its last convolution.
"""
from __future__ import annotations

from torch import nn

from trainer.components.models.errors import ModelError


def _last(model: nn.Module, kind: type) -> tuple[str, nn.Module] | None:
    found = None
    for name, module in model.named_modules():
        if isinstance(module, kind):
            found = (name, module)
    return found


def output_layer_name(model: nn.Module) -> str:
    """Dotted name of the layer producing the logits (a Linear, or SqueezeNet's final convolution)."""
    found = _last(model, nn.Linear) or _last(model, nn.Conv2d)
    if found is None:
        raise ModelError(f"{type(model).__name__} has neither a linear nor a convolutional output layer")
    return found[0]


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The final ``nn.Linear`` (the K-way head): what ``meta.lookahead=head`` moves and takes its features from."""
    found = _last(model, nn.Linear)
    if found is None:
        raise ModelError(f"meta.lookahead=head needs a final linear layer; {type(model).__name__} ends in a "
                         "convolution (SqueezeNet): use meta.lookahead=exact or second_order")
    return found[1]
