"""One ``exact`` and one ``head`` meta step on a small configuration of each model family (CPU, batch 4).

Each step must give a finite, non-zero meta-gradient that moves φ, and leave the classifier exactly as it was
(parameters, BatchNorm buffers, .grad). Inputs are the smallest each family takes; weights=None (no downloads).
Dropout / stochastic depth are on (train mode), so the replayed randomness and the math attention kernel of the
dual-number pass (ViT) are exercised on real torchvision blocks.
"""
import pytest
import torch

from tests.support.meta_oracles import single_thread
from trainer.components.models import build_model, classifier_layer
from trainer.config import ModelConfig
from trainer.meta import MetaReweighter

K = 5
FAMILIES = [("resnet18", 32), ("efficientnet_b0", 32), ("mobilenet_v3_small", 32), ("densenet121", 32),
            ("convnext_tiny", 32), ("regnet_y_400mf", 32), ("vit_b_16", 32), ("swin_t", 32)]

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}


@pytest.mark.slow
@pytest.mark.parametrize("arch,size", FAMILIES)
def test_exact_and_head_meta_steps(arch, size):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, num_classes=K), image_size=size, lookahead="exact").train()
    gen = torch.Generator().manual_seed(1)
    train = (torch.randn(4, 3, size, size, generator=gen), torch.tensor([0, 1, 2, 3]))
    meta = (torch.randn(4, 3, size, size, generator=gen), torch.tensor([4, 3, 1, 0]))
    before = _state(model)
    assert isinstance(classifier_layer(model), torch.nn.Linear)
    for lookahead in ("exact", "head"):
        rw = MetaReweighter.from_dict({"lookahead": lookahead, "granularity": "class"}, K)
        phi = [p.detach().clone() for p in rw.meta_net.parameters()]
        grads = rw.meta_gradient(model, train, meta, 0.5)
        flat = torch.cat([g.reshape(-1) for g in grads])
        assert torch.isfinite(flat).all() and flat.abs().sum() > 0, lookahead
        assert torch.isfinite(rw.last_meta_loss)
        rw.update(grads)
        assert any(not torch.equal(a, b) for a, b in zip(phi, rw.meta_net.parameters())), lookahead
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), f"{lookahead} changed the model's state"
        assert all(p.grad is None for p in model.parameters())
