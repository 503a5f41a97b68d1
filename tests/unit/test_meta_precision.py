"""Mixed precision on CPU: bf16 autocast and fp16 autocast + GradScaler against the fp32 meta-gradient.

Bounds (TinyCNN fp32, 16 px, batch 16, every mode x granularity; measured on this problem): bf16 cosine
similarity to fp32 >= 0.99999, relative error <= 3.9e-3 (asserted: cos > 0.9999, rel < 1e-2); fp16 with a
GradScaler relative error <= 6.5e-4 (asserted: cos > 0.99999, rel < 2e-3). See docs/perf_meta.md for resnet18, where
bf16 rounding itself moves the gradients far more (random-init network, random data).
"""
import pytest
import torch
import torch.nn.functional as F

from tests.support.meta_oracles import K, flat, rel_err, single_thread
from trainer.meta import MetaReweighter
from trainer.components.models import TinyCNN

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

MODES = ["exact", "second_order", "head"]


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _fp16():
    return torch.autocast("cpu", dtype=torch.float16)


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = TinyCNN(K).train()
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, K, (16,))
    xm, ym = torch.randn(16, 3, 16, 16), torch.randint(0, K, (16,))
    return model, (x, y), (xm, ym)


def _grad(problem, mode, granularity, **kw):
    model, train, meta = problem
    torch.manual_seed(1)
    rw = MetaReweighter.from_dict({"granularity": granularity, "lookahead": mode}, K)
    return flat(rw.meta_gradient(model, train, meta, 0.1, **kw)), rw


def _cos(a, b):
    return float(F.cosine_similarity(a, b, dim=0))


@pytest.mark.parametrize("granularity", ["batch", "class", "sample"])
@pytest.mark.parametrize("mode", MODES)
def test_bf16_autocast_close_to_fp32(problem, mode, granularity):
    ref, _ = _grad(problem, mode, granularity)
    low, rw = _grad(problem, mode, granularity, autocast=_bf16)
    assert low.dtype == torch.float32  # meta-net and its gradients stay fp32
    assert _cos(low, ref) > 0.9999
    assert rel_err(low, ref) < 1e-2
    assert rw.last_skipped is False


@pytest.mark.parametrize("granularity", ["batch", "class", "sample"])
@pytest.mark.parametrize("mode", MODES)
def test_fp16_with_grad_scaler_close_to_fp32(problem, mode, granularity):
    ref, _ = _grad(problem, mode, granularity)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    low, rw = _grad(problem, mode, granularity, autocast=_fp16, grad_scaler=scaler)
    assert rw.last_skipped is False
    assert _cos(low, ref) > 0.99999
    assert rel_err(low, ref) < 2e-3
    assert scaler.get_scale() == 2.0 ** 10  # the meta step reads the scale, never updates it


@pytest.mark.parametrize("mode", ["exact", "second_order"])
def test_fp16_overflow_skips_with_zero_grads_and_no_update(problem, mode):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)  # scaled backward overflows fp16
    grads, rw = _grad(problem, mode, "class", autocast=_fp16, grad_scaler=scaler)
    assert rw.last_skipped is True
    assert torch.equal(grads, torch.zeros_like(grads))
    before = flat(rw.meta_net.parameters()).clone()
    rw.update([torch.zeros_like(p) for p in rw.meta_net.parameters()])
    assert torch.equal(before, flat(rw.meta_net.parameters()))
    assert len(rw.optimizer.state) == 0  # Adam did not step on the skipped meta-gradient


def test_weights_stay_fp32_inside_autocast(problem):
    model, (x, y), _ = problem
    rw = MetaReweighter.from_dict({"granularity": "class"}, K)
    with _bf16():
        losses = F.cross_entropy(model(x).float(), y, reduction="none")
        loss, w = rw.weighted_loss(losses, y)
    ref = rw.weights(losses.detach(), y)
    assert w.dtype == torch.float32
    assert torch.equal(w, ref)


def test_fd_directional_under_bf16_runs_in_true_fp32():
    """meta.directional=fd under bf16 autocast: the two difference forwards run in fp32 (autocast off), so the
    directional derivatives match fp32 forward mode along the same v; the same difference taken in bf16 is noise."""
    import torchvision

    from trainer.meta.exact import directional_fd, directional_forward_ad
    from trainer.meta.lookahead import forward_with, frozen_batchnorm, per_sample_ce, trainable_params

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=K).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, K, (8,))
    names, params = trainable_params(model)
    gen = torch.Generator().manual_seed(1)
    v = [1e-3 * torch.randn(p.shape, generator=gen) for p in params]
    with frozen_batchnorm(model):
        reference = directional_forward_ad(model, names, params, v, x, y)  # fp32, exact
        with _bf16():  # as if the caller's autocast were still active
            fd = directional_fd(model, names, params, v, x, y, fd_eps=1e-3)
            norm = torch.linalg.vector_norm(torch.stack([t.norm() for t in v]))
            plus = [p.detach() + 1e-3 * t / norm for p, t in zip(params, v)]
            minus = [p.detach() - 1e-3 * t / norm for p, t in zip(params, v)]
            in_bf16 = (per_sample_ce(forward_with(model, names, plus, x, _bf16), y)
                       - per_sample_ce(forward_with(model, names, minus, x, _bf16), y)) * (norm / 2e-3)
    assert fd.dtype == torch.float32
    assert _cos(fd, reference) >= 0.99
    assert _cos(in_bf16, reference) < 0.9  # what fd returned before: rounding noise
