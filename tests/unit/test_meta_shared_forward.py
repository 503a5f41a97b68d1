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
