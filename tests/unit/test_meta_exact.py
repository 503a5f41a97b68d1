"""Meta-gradient exactness in float64 on a TinyCNN with BatchNorm.

* ``exact`` (forward-mode directional derivatives) == ``second_order`` (double backward) to <= 1e-6 relative
  (measured ~1e-15) for every granularity × {sgd, adam} look-ahead × detach_features;
* ``exact`` with ``directional: fd`` (fd_eps 1e-3) within 2e-6 (measured <= 4e-7 on this problem);
* both against central finite differences of L_meta(θ'(φ)) on φ, computed by an independent first-order oracle
  (tests/support/meta_oracles.py) -- random directions for every configuration, every coordinate for two of them;
* ``head`` == second-order restricted to the fc parameters.
"""
import itertools

import pytest
import torch

from tests.support.meta_oracles import K, MetaLossOfPhi, fd_along, flat, rel_err, single_thread, tiny_problem
from trainer.meta import MetaReweighter
from trainer.meta.second_order import second_order_meta_gradient

LR = 0.1
GRID = list(itertools.product(["batch", "class", "sample"], ["sgd", "adam"], [False, True]))
FD_REL = 1e-6  # central differences with h=1e-5 in f64: measured <= 6e-8 relative


_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def problem():
    return tiny_problem()


def _reweighter(granularity, lookahead, lookahead_optimizer, detach, hidden=(32, 16), **extra):
    torch.manual_seed(1)  # same φ for every mode
    return MetaReweighter.from_dict(
        {"granularity": granularity, "lookahead": lookahead, "lookahead_optimizer": lookahead_optimizer,
         "detach_features": detach, "sample_one_hot": granularity == "sample", "hidden": list(hidden), **extra},
        num_classes=K, dtype=torch.float64)


def _grad(problem, rw):
    model, opt, train, meta = problem
    return rw.meta_gradient(model, train, meta, LR, optimizer=opt)


@pytest.mark.parametrize("granularity,lookahead_optimizer,detach", GRID)
def test_exact_equals_second_order(problem, granularity, lookahead_optimizer, detach):
    exact = flat(_grad(problem, _reweighter(granularity, "exact", lookahead_optimizer, detach)))
    oracle = flat(_grad(problem, _reweighter(granularity, "second_order", lookahead_optimizer, detach)))
    assert oracle.norm() > 1e-4  # a real signal, not two zeros
    assert rel_err(exact, oracle) <= 1e-6


@pytest.mark.parametrize("granularity,lookahead_optimizer,detach", GRID)
def test_exact_fd_directional_close_to_second_order(problem, granularity, lookahead_optimizer, detach):
    fd = flat(_grad(problem, _reweighter(granularity, "exact", lookahead_optimizer, detach, directional="fd")))
    oracle = flat(_grad(problem, _reweighter(granularity, "second_order", lookahead_optimizer, detach)))
    assert rel_err(fd, oracle) <= 2e-6


@pytest.mark.parametrize("granularity,lookahead_optimizer,detach", GRID)
@pytest.mark.parametrize("lookahead", ["exact", "second_order"])
def test_matches_finite_differences_of_meta_loss(problem, lookahead, granularity, lookahead_optimizer, detach):
    model, opt, train, meta = problem
    rw = _reweighter(granularity, lookahead, lookahead_optimizer, detach)
    grads = _grad(problem, rw)
    oracle = MetaLossOfPhi(model, opt, train, meta, LR, rw.meta_net, granularity, lookahead_optimizer, detach,
                           one_hot_input=granularity == "sample")
    assert float(rw.last_meta_loss) == pytest.approx(oracle().item(), rel=1e-12)
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):
        direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in rw.meta_net.parameters()]
        analytic = float(sum((g * dv).sum() for g, dv in zip(grads, direction)))
        numeric = fd_along(oracle, rw.meta_net, direction)
        assert abs(analytic - numeric) <= FD_REL * abs(numeric)


@pytest.mark.parametrize("granularity", ["class", "sample"])
def test_every_coordinate_matches_finite_differences(problem, granularity):
    model, opt, train, meta = problem
    rw = _reweighter(granularity, "exact", "adam", False, hidden=(4, 3))
    grads = flat(_grad(problem, rw))
    oracle = MetaLossOfPhi(model, opt, train, meta, LR, rw.meta_net, granularity, "adam", False,
                           one_hot_input=granularity == "sample")
    numeric = []
    for p in rw.meta_net.parameters():
        for i in range(p.numel()):
            unit = [torch.zeros_like(q) for q in rw.meta_net.parameters()]
            unit[[q is p for q in rw.meta_net.parameters()].index(True)].view(-1)[i] = 1.0
            numeric.append(fd_along(oracle, rw.meta_net, unit))
    numeric = torch.tensor(numeric, dtype=torch.float64)
    assert rel_err(grads, numeric) <= FD_REL


@pytest.mark.parametrize("granularity,lookahead_optimizer,detach", GRID)
def test_head_equals_second_order_restricted_to_fc(problem, granularity, lookahead_optimizer, detach):
    model, opt, train, meta = problem
    rw = _reweighter(granularity, "head", lookahead_optimizer, detach)
    head = flat(_grad(problem, rw))
    oracle, _ = second_order_meta_gradient(model, train, meta, LR, rw.weighting, detach_features=detach,
                                           lookahead_optimizer=lookahead_optimizer, optimizer=opt,
                                           param_names=["fc.weight", "fc.bias"])
    assert flat(oracle).norm() > 1e-5
    assert rel_err(head, flat(oracle)) <= 1e-6


def test_head_matches_finite_differences(problem):
    model, opt, train, meta = problem
    rw = _reweighter("class", "head", "adam", False)
    grads = _grad(problem, rw)
    oracle = MetaLossOfPhi(model, opt, train, meta, LR, rw.meta_net, "class", "adam", False,
                           param_names={"fc.weight", "fc.bias"})
    assert float(rw.last_meta_loss) == pytest.approx(oracle().item(), rel=1e-12)
    gen = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in rw.meta_net.parameters()]
    analytic = float(sum((g * dv).sum() for g, dv in zip(grads, direction)))
    assert abs(analytic - fd_along(oracle, rw.meta_net, direction)) <= FD_REL * abs(analytic)


def test_absent_class_in_batch(problem):
    """A class missing from the train batch: u_k = 0 for it, no NaN, exact still equals the oracle."""
    model, opt, (x, y), meta = problem
    keep = y != 2
    train = (x[keep], y[keep])
    for granularity in ("batch", "class"):
        grads = {}
        for mode in ("exact", "second_order"):
            rw = _reweighter(granularity, mode, "sgd", False)
            grads[mode] = flat(rw.meta_gradient(model, train, meta, LR, optimizer=opt))
        assert torch.isfinite(grads["exact"]).all()
        assert rel_err(grads["exact"], grads["second_order"]) <= 1e-6


@pytest.mark.parametrize("lookahead_optimizer", ["sgd", "adam"])
def test_sample_granularity_without_one_hot(problem, lookahead_optimizer):
    grads = {}
    for mode in ("exact", "second_order"):
        torch.manual_seed(1)
        rw = MetaReweighter.from_dict({"granularity": "sample", "lookahead": mode, "sample_one_hot": False,
                                       "lookahead_optimizer": lookahead_optimizer}, K, dtype=torch.float64)
        grads[mode] = flat(_grad(problem, rw))
    assert rel_err(grads["exact"], grads["second_order"]) <= 1e-6
