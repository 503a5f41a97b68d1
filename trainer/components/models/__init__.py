"""Model factory (any torchvision classifier + a tiny CNN), family rules, head discovery, pretrained loading.

    build_model(model_cfg, image_size=..., lookahead=...)  -> nn.Module with a K-way head
    classifier_layer(model)                                 -> the final nn.Linear (the ``head`` look-ahead's layer)
    register_family(FamilyRule(...))                        -> teach the factory a new family
"""
from trainer.components.models.errors import ModelError
from trainer.components.models.factory import (available_archs, build_model, check_arch, check_model_config,
                                               to_memory_format)
from trainer.components.models.families import FamilyRule, family_of, register_family
from trainer.components.models.heads import classifier_layer, output_layer_name
from trainer.components.models.tiny import TinyCNN

__all__ = ["ModelError", "TinyCNN", "FamilyRule", "available_archs", "build_model", "check_arch",
           "check_model_config", "classifier_layer", "family_of", "output_layer_name", "register_family",
           "to_memory_format"]
