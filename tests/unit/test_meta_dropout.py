"""Dropout and stochastic depth inside the network: every pass one meta step makes over the train batch draws the
same masks (trainer/meta/randomness.py), so ``exact`` still equals the ``second_order`` oracle in float64.

The oracle makes one train pass and one meta pass; ``exact`` makes the same two and then replays the train pass's
draws for its dual-number (or difference) pass. Both start from the same seed, so a mismatch means the replay
is broken -- the negative control shows the comparison is sensitive to exactly that.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from tests.support.meta_oracles import K, flat, rel_err, single_thread
from trainer.meta import MetaReweighter
from trainer.meta.randomness import RngSnapshot
from trainer.meta.second_order import second_order_meta_gradient

LR = 0.1
_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


class DropoutNet(nn.Module):
    """conv-BN-ReLU, a residual block under row-wise stochastic depth, dropout before the fc (EfficientNet-like)."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.GELU())
        self.drop_path = StochasticDepth(0.4, mode="row")
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3))
        self.fc = nn.Linear(width, K)

    def forward(self, x):
        h = self.stem(x)
        return self.fc(self.pool(h + self.drop_path(self.block(h))))


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = DropoutNet().double().train()
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 2, 1, 0, 2, 0])
    xm = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    ym = torch.tensor([1, 2, 0, 0, 1, 2])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):  # a live Adam state for the adam look-ahead
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt, (x, y), (xm, ym)


def _grad(problem, lookahead, granularity, lookahead_optimizer, *, seed=5, **extra):
    model, opt, train, meta = problem
    torch.manual_seed(1)  # same φ for every mode
    rw = MetaReweighter.from_dict({"granularity": granularity, "lookahead": lookahead, "sample_one_hot": True,
                                   "lookahead_optimizer": lookahead_optimizer, **extra}, K, dtype=torch.float64)
    torch.manual_seed(seed)  # same network randomness for every mode
    return flat(rw.meta_gradient(model, train, meta, LR, optimizer=opt)), rw


@pytest.mark.parametrize("granularity,lookahead_optimizer", [("batch", "sgd"), ("class", "adam"), ("sample", "adam")])
def test_exact_equals_second_order_with_dropout_and_stochastic_depth(problem, granularity, lookahead_optimizer):
    exact, _ = _grad(problem, "exact", granularity, lookahead_optimizer)
    oracle, _ = _grad(problem, "second_order", granularity, lookahead_optimizer)
    assert oracle.norm() > 1e-4
    assert rel_err(exact, oracle) <= 1e-6


def test_fd_directional_with_dropout_close_to_second_order(problem):
    fd, _ = _grad(problem, "exact", "class", "adam", directional="fd")
    oracle, _ = _grad(problem, "second_order", "class", "adam")
    assert rel_err(fd, oracle) <= 2e-6


def test_head_equals_second_order_restricted_to_fc_with_dropout(problem):
    model, opt, train, meta = problem
    head, rw = _grad(problem, "head", "class", "adam")
    torch.manual_seed(5)
    oracle, _ = second_order_meta_gradient(model, train, meta, LR, rw.weighting, detach_features=False,
                                           lookahead_optimizer="adam", optimizer=opt,
                                           param_names=["fc.weight", "fc.bias"])
    assert flat(oracle).norm() > 1e-5
    assert rel_err(head, flat(oracle)) <= 1e-6


def test_without_the_replay_the_passes_disagree(problem, monkeypatch):
    """Negative control: fresh masks in the dual pass give a different (wrong) meta-gradient."""
    oracle, _ = _grad(problem, "second_order", "class", "adam")
    monkeypatch.setattr(RngSnapshot, "replay", lambda self: contextlib.nullcontext())
    unreplayed, _ = _grad(problem, "exact", "class", "adam")
    assert rel_err(unreplayed, oracle) > 1e-2


def test_replayed_passes_leave_the_random_stream_where_the_oracle_leaves_it(problem):
    """The replay restores the generator: the rest of the step draws what it would have drawn without it."""
    _grad(problem, "exact", "class", "sgd", seed=11)
    after_exact = torch.rand(4)
    _grad(problem, "second_order", "class", "sgd", seed=11)
    assert torch.equal(after_exact, torch.rand(4))


def test_exact_equals_second_order_on_a_small_vit_with_dropout():
    """Attention blocks (nn.MultiheadAttention -> SDPA): the dual pass runs on the math kernel, the oracle's double
    backward too; dropout in the MLP blocks and before the head is replayed."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=12,
                              dropout=0.3, num_classes=K).double().train()
    gen = torch.Generator().manual_seed(2)
    problem = (model, None, (torch.randn(8, 3, 8, 8, generator=gen, dtype=torch.float64), torch.tensor([0, 0, 1, 2, 1, 0, 2, 0])),
               (torch.randn(6, 3, 8, 8, generator=gen, dtype=torch.float64), torch.tensor([1, 2, 0, 0, 1, 2])))
    exact, _ = _grad(problem, "exact", "class", "sgd")
    oracle, _ = _grad(problem, "second_order", "class", "sgd")
    assert oracle.norm() > 1e-6
    assert rel_err(exact, oracle) <= 1e-6
