"""Every torchvision classifier through the model factory: head discovery, refusals, pretrained adaptation.

The registry-wide checks build on the meta device (shapes only, no memory, no compute); the per-family meta-step
compatibility test is in tests/unit/test_model_compat.py.
"""
import logging
import os

import pytest
import torch
import torchvision
from torch import nn

from trainer.components.models import (ModelError, build_model, check_model_config, classifier_layer, family_of,
                                       output_layer_name, to_memory_format)
from trainer.components.models.factory import _builder_kwargs
from trainer.config import ModelConfig, load_config

REGISTRY = torchvision.models.list_models(module=torchvision.models)


def _meta_model(arch: str, k: int = 7, size: int = 224) -> nn.Module:
    with torch.device("meta"):
        return torchvision.models.get_model(arch, weights=None, **_builder_kwargs(ModelConfig(arch=arch, num_classes=k), size))


@pytest.mark.slow  # ~35 s in all (meta-device builds of all 80 registry models)
@pytest.mark.parametrize("arch", [a for a in REGISTRY if not a.startswith("regnet")] + ["regnet_x_400mf", "regnet_y_400mf"])
def test_discovered_output_layer_is_the_one_producing_the_logits(arch):
    """The generic rule (last Linear; SqueezeNet: last conv) finds torchvision's own K-way head in every family,
    and that layer's output *is* the model's output (train mode: no auxiliary-logit tuples)."""
    if arch.startswith("regnet"):  # RegNet's builder reads tensor values: cannot build on the meta device
        model, x = torchvision.models.get_model(arch, num_classes=7), torch.randn(2, 3, 32, 32)
    else:
        model, x = _meta_model(arch), torch.empty(2, 3, 224, 224, device="meta")
    name = output_layer_name(model)
    layer = model.get_submodule(name)
    seen = []
    layer.register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        out = model.train()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7)
    assert len(seen) == 1 and (seen[0] is out or (arch.startswith("squeezenet") and seen[0].shape[:2] == (2, 7)))
    if arch.startswith("squeezenet"):
        with pytest.raises(ModelError, match="exact or second_order"):
            classifier_layer(model)
    else:
        assert classifier_layer(model) is layer


def test_unknown_arch_is_one_line_with_close_matches_from_the_registry():
    with pytest.raises(ModelError, match=r"model.arch.*'efficientnet-b3'.*close matches: efficientnet_b3") as e:
        build_model(ModelConfig(arch="efficientnet-b3"))
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="list_models"):
        check_model_config(ModelConfig(arch="qqqqqqq"))


def test_config_accepts_any_registry_name(tmp_path):  # (config stays torch-free: tests/unit/test_import_light.py)
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  arch: efficientnet_b3\n")
    assert load_config(str(p), []).model.arch == "efficientnet_b3"


@pytest.mark.parametrize("arch,size,message", [
    ("vit_b_16", 40, "multiple of 16"), ("inception_v3", 64, ">= 75"), ("maxvit_t", 64, "multiple of 224"),
    ("alexnet", 32, "alexnet cannot take data.image_size=32"),  # caught by the meta-device dry run
])
def test_sizes_a_family_cannot_take_are_refused_in_one_line(arch, size, message):
    with pytest.raises(ModelError, match=message) as e:
        check_model_config(ModelConfig(arch=arch), image_size=size)
    assert "\n" not in str(e.value)


def test_squeezenet_refuses_head_lookahead_but_builds_for_exact():
    with pytest.raises(ModelError, match="meta.lookahead=head with model.arch=squeezenet1_1: .*1x1 convolution"):
        check_model_config(ModelConfig(arch="squeezenet1_1"), image_size=64, lookahead="head")
    model = build_model(ModelConfig(arch="squeezenet1_1", num_classes=5), image_size=64, lookahead="exact")
    assert model.train()(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_inception_and_googlenet_return_plain_logits_in_train_mode():
    for arch, size in (("googlenet", 32), ("inception_v3", 75)):
        model = build_model(ModelConfig(arch=arch, num_classes=5), image_size=size)
        out = model.train()(torch.randn(2, 3, size, size))
        assert isinstance(out, torch.Tensor) and out.shape == (2, 5)


def test_googlenet_checkpoint_with_aux_heads_loads_without_them(tmp_path):
    src = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path / "g.pth"
    torch.save(src.state_dict(), path)
    model = build_model(ModelConfig(arch="googlenet", pretrained=str(path), num_classes=5), image_size=32)
    assert torch.equal(model.inception5b.branch1.conv.weight, src.inception5b.branch1.conv.weight)
    assert model.fc.out_features == 5 and getattr(model, "aux1", None) is None


@pytest.mark.slow  # two ViT-B builds: ~6-11 s on the shared 2-core VM
def test_vit_checkpoint_at_224_is_interpolated_to_the_run_size(tmp_path, caplog):
    src = torchvision.models.vit_b_32(weights=None)  # native 224 px: 7x7 patches + class token
    path = tmp_path / "vit.pth"
    torch.save(src.state_dict(), path)
    with caplog.at_level(logging.INFO):
        model = build_model(ModelConfig(arch="vit_b_32", pretrained=str(path), num_classes=5), image_size=64)
    assert model.encoder.pos_embedding.shape == (1, 2 * 2 + 1, 768)
    assert torch.equal(model.encoder.pos_embedding[:, 0], src.encoder.pos_embedding[:, 0])  # class token kept
    assert torch.equal(model.conv_proj.weight, src.conv_proj.weight)
    assert model.heads.head.out_features == 5
    assert "interpolating the pretrained position embeddings" in caplog.text
    assert model.train()(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_shape_mismatch_names_the_tensor(tmp_path):
    src = torchvision.models.mobilenet_v3_small(weights=None)
    path = tmp_path / "m.pth"
    state = src.state_dict()
    state["features.0.0.weight"] = torch.zeros(16, 3, 5, 5)
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"features.0.0.weight has shape \(16, 3, 5, 5\) in the checkpoint"):
        build_model(ModelConfig(arch="mobilenet_v3_small", pretrained=str(path)))


def test_imagenet_weights_state_their_native_size(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.EfficientNet_B0_Weights.DEFAULT
    target = tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url)
    target.parent.mkdir(parents=True)
    src = torchvision.models.efficientnet_b0(weights=None)
    torch.save(src.state_dict(), target)  # as if downloaded earlier: no network needed
    with caplog.at_level(logging.INFO):
        model = build_model(ModelConfig(arch="efficientnet_b0", pretrained="imagenet", num_classes=5), image_size=64)
    assert torch.equal(model.features[0][0].weight, src.features[0][0].weight)
    assert model.classifier[1].out_features == 5
    assert "trained at 224 px; this run uses data.image_size=64" in caplog.text
    with pytest.raises(ModelError, match="tiny CNN has no ImageNet weights"):
        check_model_config(ModelConfig(arch="tiny", pretrained="imagenet"))


def test_channels_last_skipped_for_vit_with_a_log_line(caplog):
    cuda = torch.device("cuda")  # only the device *type* is read: nothing is allocated there
    vit = _meta_model("vit_b_32")
    with caplog.at_level(logging.INFO):
        assert to_memory_format(vit, ModelConfig(arch="vit_b_32"), cuda) is vit
    assert "channels_last skipped for vit_b_32" in caplog.text
    r18 = to_memory_format(build_model(ModelConfig(arch="resnet18")), ModelConfig(arch="resnet18"), cuda)
    assert r18.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert family_of("resnet18").channels_last and not family_of("swin_t").channels_last


def test_every_preset_model_is_accepted_at_its_size():
    """configs/*.yaml: arch known, size accepted, look-ahead supported (meta-device dry run, nothing downloaded)."""
    from pathlib import Path
    presets = sorted(Path("configs").glob("*.yaml"))
    assert any(p.name == "aptos_effnet_b3.yaml" for p in presets)
    for path in presets:
        cfg = load_config(str(path), [])
        lookahead = cfg.meta.lookahead if cfg.train.loss == "meta" else None
        check_model_config(cfg.model, cfg.data.image_size, lookahead)
