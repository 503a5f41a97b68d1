"""One forward per step on two real ranks (torchrun, gloo, float64): the shared forward equals the two-forward path.

Through the DDP wrapper the virtual gradient (``autograd.grad``, which runs no reducer hook) must stay rank-local
while the real backward is all-reduced: N ``StepRunner`` steps with ``meta.share_forward`` on and off give the same
θ, θ's Adam state, φ and φ's Adam state to <= 1e-6, θ and φ stay identical on both ranks, and ``meta.real_step:
lagged`` (gradient all-reduced by hand) equals a by-hand loop over both ranks' data.
"""
import pytest
import torch
from accelerate import Accelerator

from tests.support.dist import SCRIPTS, torchrun
from tests.support.shared_forward import CASES, LAGGED, assert_close, lagged_reference, run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 4


def _assert_matches_reference(state: dict, ref: dict, tol: float) -> None:
    assert_close({k: state[k] for k in ref}, ref, tol)


def test_shared_forward_equals_two_forward_path_on_two_ranks(tmp_path):
    torchrun(str(SCRIPTS / "shared_forward.py"), str(tmp_path), str(STEPS))
    dumps = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [d["world"] for d in dumps] == [2, 2]
    for case in CASES:
        for r in (0, 1):
            assert_close(dumps[r]["cases"][case]["shared"], dumps[r]["cases"][case]["two_forward"], 1e-6)
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
