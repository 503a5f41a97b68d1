"""One forward per step: the trainer's shared-forward meta step equals the two-forward path (DESIGN.md).

N ``StepRunner`` steps in float64 on a TinyCNN with BatchNorm, with ``meta.share_forward`` on and off, must leave the
same θ, BatchNorm buffers, θ's Adam state, φ and φ's Adam state: <= 1e-10 in one process, <= 1e-6 on two gloo
ranks (where the virtual gradient must stay rank-local while the real gradient is all-reduced by DDP). BatchNorm's
running statistics are updated exactly once per step (num_batches_tracked == steps).

``meta.real_step: lagged`` (the real step reuses the look-ahead's virtual gradient) against a by-hand loop: per step
and rank, the real gradient of mean(w ℓ) with w from φ *before* its update, and the meta-gradient; both averaged
over the ranks.
"""
import pytest
import torch
from accelerate import Accelerator

from dist_scripts.dist_helpers import SCRIPTS, torchrun
from dist_scripts.shared_forward import CASES, K, LAGGED, batches, run
from meta_oracles import single_thread

STEPS = 4

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def _assert_close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            scale = max(1.0, float(b[k].abs().max()))
            assert float((a[k] - b[k]).abs().max()) <= tol * scale, k
        else:
            assert torch.equal(a[k], b[k]), k


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
    _assert_close(shared, two, 1e-10)
    _changed(shared, CASES[case])
    for k, v in shared.items():
        if k.endswith("num_batches_tracked"):
            assert int(v) == STEPS, k  # one BatchNorm update per step, not two


def test_shared_forward_with_meta_every_k():
    acc = Accelerator(cpu=True)
    meta = CASES["exact_class_adam"]
    _assert_close(run(meta, True, 5, 0, acc, every=2), run(meta, False, 5, 0, acc, every=2), 1e-10)


def lagged_reference(meta: dict, steps: int, ranks) -> dict[str, torch.Tensor]:
    """θ and φ after ``steps`` lagged steps, by hand; every rank's data in this one process."""
    import torch.nn.functional as F

    from trainer.components.models import TinyCNN
    from trainer.config import config_from_dict
    from trainer.meta import MetaReweighter

    cfg = config_from_dict({"meta": {**meta, "lr": 1e-2, "lookahead_lr": 0.5}})
    torch.manual_seed(0)
    model = TinyCNN(K).double().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    rw = MetaReweighter(cfg.meta, num_classes=K, dtype=torch.float64)
    train = {r: batches(r, steps, 8, salt=1) for r in ranks}
    meta_batches = {r: batches(r, steps, 6, salt=2) for r in ranks}
    params = list(model.parameters())
    for s in range(steps):
        real, phi = [], []
        for r in ranks:
            b, mb = train[r][s], meta_batches[r][s]
            losses = F.cross_entropy(model(b.images), b.labels, reduction="none")
            w = rw.weights(losses, b.labels)  # φ before this step's update
            real.append(torch.autograd.grad((w * losses).mean(), params))
            phi.append(rw.meta_gradient(model, (b.images, b.labels), (mb.images, mb.labels), 0.5))
        for p, *gs in zip(params, *real):
            p.grad = sum(gs) / len(ranks)
        opt.step()
        rw.update([sum(gs) / len(ranks) for gs in zip(*phi)])
    out = {f"theta.{k}": v.detach() for k, v in model.named_parameters()}
    out.update({f"phi.{k}": v.detach() for k, v in rw.meta_net.state_dict().items()})
    return out


def _assert_matches_reference(state: dict, ref: dict, tol: float) -> None:
    _assert_close({k: state[k] for k in ref}, ref, tol)


@pytest.mark.parametrize("case", list(LAGGED))
def test_lagged_real_step_reuses_the_virtual_gradient(case):
    state = run(LAGGED[case], True, STEPS, 0, Accelerator(cpu=True))
    _assert_matches_reference(state, lagged_reference(LAGGED[case], STEPS, [0]), 1e-10)
    # and it is a different algorithm from the paper's real step (weights of the updated φ)
    updated = run({**LAGGED[case], "real_step": "updated"}, True, STEPS, 0, Accelerator(cpu=True))
    assert any(float((state[k] - updated[k]).abs().max()) > 1e-9 for k in state if k.startswith("theta.fc"))


@pytest.mark.distributed
@pytest.mark.slow
def test_shared_forward_equals_two_forward_path_on_two_ranks(tmp_path):
    torchrun(str(SCRIPTS / "shared_forward.py"), str(tmp_path), str(STEPS))
    dumps = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [d["world"] for d in dumps] == [2, 2]
    for case in CASES:
        for r in (0, 1):
            _assert_close(dumps[r]["cases"][case]["shared"], dumps[r]["cases"][case]["two_forward"], 1e-6)
        # DDP invariants: θ (all-reduced real gradient) and φ (all-reduced meta-gradient) identical on both ranks
        for mode in ("shared", "two_forward"):
            a, b = dumps[0]["cases"][case][mode], dumps[1]["cases"][case][mode]
            for k in a:
                if k.startswith(("theta.", "phi.", "adam.", "phi_adam.")) and "running" not in k:
                    assert torch.equal(a[k], b[k]), (case, mode, k)
        # and the ranks really differed: a 1-rank run on rank 0's data alone ends elsewhere
        single = run(CASES[case], True, STEPS, 0, Accelerator(cpu=True))
        assert any(float((single[k] - dumps[0]["cases"][case]["shared"][k]).abs().max()) > 1e-8
                   for k in single if k.startswith("theta.") and single[k].is_floating_point())
    for case in LAGGED:
        ref = lagged_reference(LAGGED[case], STEPS, [0, 1])
        for r in (0, 1):
            _assert_matches_reference(dumps[r]["cases"][case]["lagged"], ref, 1e-6)
