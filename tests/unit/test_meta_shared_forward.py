"""One forward per step: the trainer's shared-forward meta step equals the two-forward path (DESIGN.md).

N ``StepRunner`` steps in float64 on a TinyCNN with BatchNorm, with ``meta.share_forward`` on and off, must leave the
same θ, BatchNorm buffers, θ's Adam state, φ and φ's Adam state: <= 1e-10 in one process (two gloo ranks:
tests/distributed/test_meta_shared_forward_ranks.py). BatchNorm's
running statistics are updated exactly once per step (num_batches_tracked == steps).

``meta.real_step: lagged`` (the real step reuses the look-ahead's virtual gradient) against a by-hand loop: per step
and rank, the real gradient of mean(w ℓ) with w from φ *before* its update, and the meta-gradient; both averaged
over the ranks.
"""
import pytest
import torch
from accelerate import Accelerator

from tests.support.meta_oracles import single_thread
from tests.support.shared_forward import CASES, LAGGED, assert_close, lagged_reference, run

STEPS = 4

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def _changed(state: dict, meta: dict, every: int = 1) -> None:
    """The runs did train: θ and φ moved away from their initial values (a no-op would also 'match')."""
    fresh = run(meta, True, 0, 0, Accelerator(cpu=True), every)
    assert any(not torch.equal(state[k], fresh[k]) for k in state if k.startswith("theta.fc"))
    assert any(not torch.equal(state[k], fresh[k]) for k in fresh if k.startswith("phi."))


@pytest.mark.parametrize("case", list(CASES))
def test_shared_forward_equals_two_forward_path(case):
    acc = Accelerator(cpu=True)
    shared = run(CASES[case], True, STEPS, 0, acc)
    two = run(CASES[case], False, STEPS, 0, acc)
    assert_close(shared, two, 1e-10)
    _changed(shared, CASES[case])
    for k, v in shared.items():
        if k.endswith("num_batches_tracked"):
            assert int(v) == STEPS, k  # one BatchNorm update per step, not two


def test_shared_forward_with_meta_every_k():
    acc = Accelerator(cpu=True)
    meta = CASES["exact_class_adam"]
    assert_close(run(meta, True, 5, 0, acc, every=2), run(meta, False, 5, 0, acc, every=2), 1e-10)


def _assert_matches_reference(state: dict, ref: dict, tol: float) -> None:
    assert_close({k: state[k] for k in ref}, ref, tol)


@pytest.mark.parametrize("case", list(LAGGED))
def test_lagged_real_step_reuses_the_virtual_gradient(case):
    state = run(LAGGED[case], True, STEPS, 0, Accelerator(cpu=True))
    _assert_matches_reference(state, lagged_reference(LAGGED[case], STEPS, [0]), 1e-10)
    # and it is a different algorithm from the paper's real step (weights of the updated φ)
    updated = run({**LAGGED[case], "real_step": "updated"}, True, STEPS, 0, Accelerator(cpu=True))
    assert any(float((state[k] - updated[k]).abs().max()) > 1e-9 for k in state if k.startswith("theta.fc"))


@pytest.mark.parametrize("overrides,needs", [
    ({"meta": {"real_step": "lagged"}}, "meta.detach_features=true"),
    ({"meta": {"real_step": "lagged", "detach_features": True, "lookahead": "head"}}, "meta.lookahead=exact"),
    ({"meta": {"real_step": "lagged", "detach_features": True}, "train": {"precision": "fp16"}}, "fp32 or bf16"),
    ({"meta": {"real_step": "lagged", "detach_features": True}, "model": {"compile": True}}, "model.compile=false"),
])
def test_lagged_real_step_refuses_what_it_cannot_do(overrides, needs):
    from trainer.config import ConfigError, config_from_dict

    data = {"train": {"loss": "meta", **overrides.get("train", {})}, "meta": overrides["meta"],
            "model": overrides.get("model", {})}
    with pytest.raises(ConfigError, match=f"meta.real_step.*{needs}"):
        config_from_dict(data)


def test_fp32_look_ahead_under_deepspeed_bf16_is_refused():
    from trainer.config import ConfigError, config_from_dict
    from trainer.engine.accel import check_distributed_config

    cfg = config_from_dict({"train": {"loss": "meta", "distributed": "deepspeed", "precision": "bf16"},
                            "meta": {"precision": "fp32"}})
    with pytest.raises(ConfigError, match="meta.precision"):
        check_distributed_config(cfg)


@pytest.mark.parametrize("out", [None, "virtual_out", "mean_grad_out"])
def test_shared_graph_is_kept_only_for_a_real_backward(out):
    """The shared forward's graph stays alive after the meta step only when the real step back-propagates through
    it; lagged (virtual_out) and rescale (mean_grad_out) take their real gradient from the meta step, so their train
    activations are freed before the meta batch's forward (peak memory)."""
    import torch.nn.functional as F

    from tests.support.shared_forward import K, batches
    from trainer.components.models import TinyCNN
    from trainer.meta import MetaReweighter

    torch.manual_seed(0)
    model = TinyCNN(K).double().train()
    rw = MetaReweighter.from_dict({"granularity": "batch", "detach_features": out == "mean_grad_out"}, K,
                                  dtype=torch.float64)
    b, mb = batches(0, 1, 8, salt=1)[0], batches(0, 1, 6, salt=2)[0]
    losses = F.cross_entropy(model(b.images), b.labels, reduction="none")
    extra = {} if out is None else {out: []}
    rw.meta_gradient(model, (b.images, b.labels), (mb.images, mb.labels), 0.5, train_losses=losses, **extra)
    if out is None:
        losses.mean().backward()  # the real backward through the shared graph
        assert all(p.grad is not None for p in model.parameters())
    else:
        assert len(extra[out]) == len(list(model.parameters()))
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            losses.mean().backward()


@pytest.mark.parametrize("init_scale,skipped", [(2.0 ** 10, False), (2.0 ** 100, True)])
def test_shared_forward_under_fp16_grad_scaler(init_scale, skipped):
    """fp16 autocast + GradScaler: the virtual gradient taken from the shared graph is scaled and unscaled like the
    two-forward path's (same meta-gradient), an overflow still skips the meta step with zero grads, and the graph is
    still there for the real (scaled) backward afterwards."""
    import torch.nn.functional as F

    from tests.support.shared_forward import K, batches
    from trainer.components.models import TinyCNN
    from trainer.meta import MetaReweighter

    def fp16():
        return torch.autocast("cpu", dtype=torch.float16)

    torch.manual_seed(0)
    model = TinyCNN(K).train()
    b, mb = batches(0, 1, 16, salt=1)[0], batches(0, 1, 12, salt=2)[0]
    x, y, xm, ym = b.images.float(), b.labels, mb.images.float(), mb.labels
    grads = {}
    for shared in (False, True):
        torch.manual_seed(1)
        rw = MetaReweighter.from_dict({"granularity": "class"}, K)
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        with fp16():
            losses = F.cross_entropy(model(x).float(), y, reduction="none")
        extra = {"train_losses": losses} if shared else {}
        grads[shared] = torch.cat([g.reshape(-1) for g in rw.meta_gradient(
            model, (x, y), (xm, ym), 0.1, autocast=fp16, grad_scaler=scaler, **extra)])
        assert rw.last_skipped is skipped
        assert scaler.get_scale() == init_scale  # the meta step reads the scale, never updates it
        scaler.scale(losses.mean()).backward()  # the real backward: the shared graph was retained
        assert all(p.grad is not None for p in model.parameters())
        model.zero_grad(set_to_none=True)
    if skipped:
        assert torch.equal(grads[True], torch.zeros_like(grads[True]))
    else:
        assert grads[True].norm() > 1e-6
        assert float((grads[True] - grads[False]).norm() / grads[False].norm()) <= 1e-6  # measured 0.0
