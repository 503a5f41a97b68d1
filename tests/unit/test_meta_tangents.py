"""Directional derivatives from the shared forward's saved activations (trainer/meta/tangents.py) against the
dual-number forward (itself checked against reverse mode and the second-order oracle in test_meta_exact.py).

float64: relative error <= 1e-12 (measured ~2e-15) on TinyCNN, a BasicBlock ResNet and a Bottleneck ResNet in train
mode (BatchNorm with batch statistics, max-pool, residual additions, in-place ReLU). Models whose forward is not known
to be linear between leaf modules, or with a leaf without a rule, are refused (they keep the dual pass).
"""
import pytest
import torch
import torchvision
from torch import nn

from tests.support.meta_oracles import rel_err, single_thread
from trainer.components.models import TinyCNN
from trainer.meta.exact import _unit_direction, directional_forward_ad
from trainer.meta.lookahead import autocast_context, frozen_batchnorm, trainable_params
from trainer.meta.tangents import ActivationRecorder, supports_saved_tangents

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

MODELS = {"tiny": (lambda: TinyCNN(3), 8), "resnet18": (lambda: torchvision.models.resnet18(num_classes=3), 32),
          "resnet50": (lambda: torchvision.models.resnet50(num_classes=3), 32)}


def _both(model, x, y, autocast=None):
    names, params = trainable_params(model)
    gen = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    with ActivationRecorder(model) as rec, autocast_context(autocast):
        model(x)  # the shared forward (runs under the run's autocast)
    direction, norm = _unit_direction(v)
    after = {k: b.clone() for k, b in model.state_dict().items()}
    saved = rec.directional(params, direction, y, autocast) * norm
    # the tangent pass itself leaves every buffer (BatchNorm running statistics) alone
    assert all(torch.equal(after[k], b) for k, b in model.state_dict().items())
    with frozen_batchnorm(model):
        dual = directional_forward_ad(model, names, params, v, x, y, autocast)
    return saved, dual


@pytest.mark.parametrize("arch", list(MODELS))
def test_saved_tangents_equal_the_dual_number_pass(arch):
    make, size = MODELS[arch]
    torch.manual_seed(0)
    model = make().double().train()
    assert supports_saved_tangents(model)
    x, y = torch.randn(6, 3, size, size, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    saved, dual = _both(model, x, y)
    assert dual.norm() > 1e-3
    assert rel_err(saved, dual) <= 1e-12
    # the forward hooks are gone and every leaf module has its class's forward back
    assert all(not m._forward_pre_hooks and "forward" not in vars(m) for m in model.modules())


def test_saved_tangents_under_bf16_autocast_track_the_dual_pass():
    """Same rounding as the bf16 dual pass (measured cosine 0.9999 to it; both ~0.93 to fp32 on this random net)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    saved, dual = _both(model, x, y, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert float(torch.nn.functional.cosine_similarity(saved, dual, dim=0)) > 0.99


def test_unknown_models_and_leaves_keep_the_dual_pass():
    class SqueezeExcite(nn.Module):  # a product of two activations: not linear between leaves
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return x * torch.sigmoid(self.conv(x))

    assert not supports_saved_tangents(SqueezeExcite())
    silu = TinyCNN(3)
    silu.features[2] = nn.SiLU()  # a leaf with no tangent rule
    assert not supports_saved_tangents(silu)
    assert not supports_saved_tangents(TinyCNN(3).eval())  # running statistics: not the batch-statistics rule
