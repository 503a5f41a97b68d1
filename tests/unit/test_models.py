"""Model factory: K outputs, local pretrained weights, torchvision's ImageNet weights from TORCH_HOME, clear errors."""
import os
import urllib.error

import pytest
import torch
import torchvision

from trainer.config import ModelConfig
from trainer.components.models import ModelError, build_model


@pytest.mark.parametrize("arch", ["tiny", "resnet18", "resnet34", "resnet50"])
def test_k_outputs_and_fc_head(arch):
    model = build_model(ModelConfig(arch=arch, num_classes=5))
    assert isinstance(model.fc, torch.nn.Linear) and model.fc.out_features == 5
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_local_pretrained_file_loads_backbone_and_replaces_fc(tmp_path):
    src = torchvision.models.resnet18(weights=None)  # stands in for an ImageNet checkpoint (1000-way fc)
    path = tmp_path / "r18.pth"
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, path)  # DDP-style prefix is accepted
    model = build_model(ModelConfig(arch="resnet18", pretrained=str(path), num_classes=5))
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, src.layer4[1].bn2.running_var)
    assert model.fc.out_features == 5


def test_missing_or_mismatched_weights_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="not found: .*nope.pth"):
        build_model(ModelConfig(arch="resnet18", pretrained=str(tmp_path / "nope.pth")))
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(ModelError, match="does not fit resnet18"):
        build_model(ModelConfig(arch="resnet18", pretrained=str(path)))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read"):
        build_model(ModelConfig(arch="resnet18", pretrained=str(tmp_path / "junk.pth")))
    with pytest.raises(ModelError, match="model.arch"):
        build_model(ModelConfig(arch="vgg", num_classes=5))


def test_imagenet_weights_come_from_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    target = tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url)
    target.parent.mkdir(parents=True)
    src = torchvision.models.resnet18(weights=None)
    torch.save(src.state_dict(), target)  # as if downloaded earlier: no network needed
    model = build_model(ModelConfig(arch="resnet18", pretrained="imagenet", num_classes=5))
    assert torch.equal(model.conv1.weight, src.conv1.weight)


def test_imagenet_offline_names_the_file_to_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):  # what torch.hub raises without a network
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    expected = tmp_path / "hub" / "checkpoints" / os.path.basename(torchvision.models.ResNet50_Weights.DEFAULT.url)
    with pytest.raises(ModelError, match=str(expected)):
        build_model(ModelConfig(arch="resnet50", pretrained="imagenet"))
