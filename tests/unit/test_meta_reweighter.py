"""MetaReweighter contract: model untouched by the meta step, real-step weights, update, config, state."""
import copy

import pytest
import torch
import torch.nn.functional as F

from tests.support.meta_oracles import K, flat, single_thread, tiny_problem
from trainer.config import ConfigError, MetaConfig
from trainer.meta import MetaReweighter
from trainer.meta.net import MetaNet

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

MODES = [("exact", "forward_ad"), ("exact", "fd"), ("second_order", "forward_ad"), ("head", "forward_ad")]


def _snapshot(model, opt):
    state = {k: v.clone() for k, v in model.state_dict().items()}  # params + BN running stats + counters
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    opt_state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                 for p, s in opt.state.items()}
    return state, grads, opt_state


@pytest.mark.parametrize("granularity", ["batch", "class", "sample"])
@pytest.mark.parametrize("lookahead,directional", MODES)
def test_meta_gradient_leaves_model_bitwise_unchanged(lookahead, directional, granularity):
    model, opt, train, meta = tiny_problem()
    # a stale .grad on some parameters (and None on others) must survive untouched
    F.cross_entropy(model(train[0]), train[1]).backward()
    model.features[0].weight.grad = None
    state, grads, opt_state = _snapshot(model, opt)
    rw = MetaReweighter.from_dict({"granularity": granularity, "lookahead": lookahead, "directional": directional,
                                   "lookahead_optimizer": "adam"}, K, dtype=torch.float64)
    rw.meta_gradient(model, train, meta, 0.1, optimizer=opt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
        assert v.dtype == state[k].dtype
    for n, p in model.named_parameters():
        if grads[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, grads[n]), n
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, opt_state[id(p)][k]) if torch.is_tensor(v) else v == opt_state[id(p)][k]
    assert model.training
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_meta_step_then_real_step_updates_bn_like_a_plain_step():
    model, opt, (x, y), meta = tiny_problem()
    plain = copy.deepcopy(model)
    plain(x)  # a plain step's forward: running stats updated once
    rw = MetaReweighter.from_dict({"granularity": "class"}, K, dtype=torch.float64)
    rw.update(rw.meta_gradient(model, (x, y), meta, 0.1))
    losses = F.cross_entropy(model(x), y, reduction="none")
    rw.weighted_loss(losses, y)[0].backward()
    for (k, a), b in zip(model.named_buffers(), plain.buffers()):
        assert torch.equal(a, b), k


def test_bn_flags_restored_when_the_meta_step_fails():
    model, opt, (x, y), meta = tiny_problem()
    rw = MetaReweighter.from_dict({}, K, dtype=torch.float64)
    with pytest.raises(Exception):
        rw.meta_gradient(model, (x[:, :2], y), meta, 0.1)  # 2 channels: the first conv refuses
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("granularity,one_hot", [("batch", False), ("class", False), ("sample", False),
                                                 ("sample", True)])
def test_weights_shape_no_grad_and_values(granularity, one_hot):
    rw = MetaReweighter.from_dict({"granularity": granularity, "sample_one_hot": one_hot}, K)
    losses = torch.tensor([0.5, 1.0, 2.0, 0.1, 0.7], requires_grad=True)
    y = torch.tensor([0, 1, 1, 2, 0])
    w = rw.weights(losses, y)
    assert w.shape == (5,)
    assert not w.requires_grad and w.grad_fn is None
    assert ((w > 0) & (w < 1)).all()  # sigmoid output
    if granularity == "batch":
        assert torch.all(w == w[0])
    if granularity == "class":
        assert w[1] == w[2] and w[0] == w[4]
        u = torch.tensor([[0.6, 1.5, 0.1]])  # per-class means by hand
        assert torch.allclose(w[[0, 1, 3]], rw.meta_net(u)[0], atol=0, rtol=1e-6)
    if granularity == "sample":
        feats = losses.detach()[:, None]
        if one_hot:
            feats = torch.cat([feats, F.one_hot(y, K).float()], 1)
        assert torch.allclose(w, rw.meta_net(feats)[:, 0], atol=0, rtol=1e-6)


def test_weighted_loss_gradient_reaches_theta_not_phi():
    model, _, (x, y), _ = tiny_problem()
    rw = MetaReweighter.from_dict({"granularity": "class"}, K, dtype=torch.float64)
    losses = F.cross_entropy(model(x), y, reduction="none")
    loss, w = rw.weighted_loss(losses, y)
    assert loss.item() == pytest.approx((w * losses).mean().item(), rel=1e-12)
    loss.backward()
    assert model.fc.weight.grad is not None and model.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in rw.meta_net.parameters())
    # w is a constant: the θ-gradient equals that of Σ w_i ℓ_i / N with w detached
    model.zero_grad()
    (w.detach() * F.cross_entropy(model(x), y, reduction="none")).mean().backward()
    g_ref = model.fc.weight.grad.clone()
    model.zero_grad()
    rw.weighted_loss(F.cross_entropy(model(x), y, reduction="none"), y)[0].backward()
    assert torch.equal(model.fc.weight.grad, g_ref)


def test_update_without_process_group_is_a_plain_adam_step():
    rw = MetaReweighter.from_dict({"granularity": "class", "lr": 1e-2}, K)
    ref_net = copy.deepcopy(rw.meta_net)
    ref_opt = torch.optim.Adam(ref_net.parameters(), lr=1e-2, fused=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in rw.meta_net.parameters()]
        rw.update(grads)
        for p, g in zip(ref_net.parameters(), grads):
            p.grad = g.clone()
        ref_opt.step()
    for a, b in zip(rw.meta_net.parameters(), ref_net.parameters()):
        assert torch.equal(a, b)
        assert a.grad is None


def test_non_finite_meta_gradient_skips_the_update():
    rw = MetaReweighter.from_dict({"granularity": "class", "lr": 1e-2}, K)
    rw.update([torch.ones(p.shape) for p in rw.meta_net.parameters()])
    before = [p.detach().clone() for p in rw.meta_net.parameters()]
    state = {k: v.clone() for k, v in rw.optimizer.state[next(rw.meta_net.parameters())].items()}
    bad = [torch.ones(p.shape) for p in rw.meta_net.parameters()]
    bad[0][0] = float("nan")
    rw.update(bad)
    for a, b in zip(rw.meta_net.parameters(), before):
        assert torch.equal(a.detach(), b)
    for k, v in rw.optimizer.state[next(rw.meta_net.parameters())].items():
        assert torch.equal(v, state[k]), k
    rw.update([torch.ones(p.shape) for p in rw.meta_net.parameters()])  # and it still learns afterwards
    assert not torch.equal(next(rw.meta_net.parameters()).detach(), before[0])


def test_meta_gradient_and_update_change_weights_and_record_loss():
    model, opt, train, meta = tiny_problem()
    rw = MetaReweighter.from_dict({"granularity": "class", "lr": 1e-1}, K, dtype=torch.float64)
    losses = F.cross_entropy(model(train[0]), train[1], reduction="none").detach()
    before = rw.weights(losses, train[1])
    grads = rw.meta_gradient(model, train, meta, 0.1, optimizer=opt)
    assert [g.shape for g in grads] == [p.shape for p in rw.meta_net.parameters()]
    assert rw.last_meta_loss.dim() == 0 and rw.last_meta_loss.grad_fn is None
    assert rw.last_meta_loss.item() == pytest.approx(F.cross_entropy(model(meta[0]), meta[1]).item(), rel=0.1)
    rw.update(grads)
    assert not torch.equal(before, rw.weights(losses, train[1]))


def test_from_dict_unknown_key_and_bad_value_name_the_key():
    with pytest.raises(ConfigError, match="meta.granularty"):
        MetaReweighter.from_dict({"granularty": "batch"}, K)
    with pytest.raises(ConfigError, match="meta.lookahead"):
        MetaReweighter.from_dict({"lookahead": "third_order"}, K)
    with pytest.raises(ValueError, match="meta.directional"):
        MetaReweighter(MetaConfig(directional="complex_step"), K)
    with pytest.raises(ValueError, match="num_classes"):
        MetaReweighter(MetaConfig(), 1)


@pytest.mark.parametrize("granularity,one_hot,sizes", [("batch", False, (K, 1)), ("class", False, (K, K)),
                                                       ("sample", False, (1, 1)), ("sample", True, (1 + K, 1))])
def test_meta_net_architecture(granularity, one_hot, sizes):
    rw = MetaReweighter.from_dict({"granularity": granularity, "sample_one_hot": one_hot, "hidden": [32, 16]}, K)
    linears = [m for m in rw.meta_net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(sizes[0], 32), (32, 16), (16, sizes[1])]
    assert isinstance(rw.meta_net, MetaNet) and isinstance(rw.meta_net.layers[-1], torch.nn.Sigmoid)
    assert rw.optimizer.param_groups[0]["lr"] == 1e-3
    assert next(rw.meta_net.parameters()).dtype == torch.float32


def test_state_dict_round_trip_and_mismatch():
    gen = torch.Generator().manual_seed(0)
    a = MetaReweighter.from_dict({"granularity": "class"}, K)
    a.update([torch.randn(p.shape, generator=gen) for p in a.meta_net.parameters()])
    torch.manual_seed(5)
    b = MetaReweighter.from_dict({"granularity": "class"}, K)
    b.load_state_dict(a.state_dict())
    grads = [torch.randn(p.shape, generator=gen) for p in a.meta_net.parameters()]
    a.update(grads)
    b.update(grads)
    assert torch.equal(flat(a.meta_net.parameters()), flat(b.meta_net.parameters()))
    with pytest.raises(ValueError, match="does not fit"):
        MetaReweighter.from_dict({"granularity": "batch"}, K).load_state_dict(a.state_dict())


def test_lookahead_lr_and_every():
    rw = MetaReweighter.from_dict({"lookahead_lr": 0.5, "every": 3}, K)
    assert rw.lookahead_lr(1e-4) == 0.5
    assert MetaReweighter.from_dict({}, K).lookahead_lr(1e-4) == 1e-4
    assert [rw.is_meta_step(s) for s in range(4)] == [True, False, False, True]


def test_broadcast_without_process_group_is_a_no_op():
    rw = MetaReweighter.from_dict({}, K)
    before = flat(rw.meta_net.parameters()).clone()
    rw.broadcast_from(0)
    assert torch.equal(before, flat(rw.meta_net.parameters()))


def test_head_uses_the_final_linear_layer_whatever_its_name():
    class NoFc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.out = torch.nn.Linear(4, K)

        def forward(self, x):
            return self.out(x)

    rw = MetaReweighter.from_dict({"lookahead": "head"}, K)
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    grads = rw.meta_gradient(NoFc(), (x, y), (x, y), 0.1)
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    conv_head = torch.nn.Sequential(torch.nn.Conv2d(3, K, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(ValueError, match="needs a final linear layer"):
        rw.meta_gradient(conv_head, (torch.randn(4, 3, 4, 4), y), (torch.randn(4, 3, 4, 4), y), 0.1)
