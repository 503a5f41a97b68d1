"""The meta step on two real ranks (torchrun, gloo): φ is replicated, not DDP-wrapped, and must stay bit-identical.

DESIGN.md "Distributed": each rank computes ∇φ on its own train and meta shard; ``MetaReweighter.update``
all-reduces (mean) before the Adam step; ``broadcast_from(0)`` makes the start identical; an fp16 overflow on one
rank skips the meta step on every rank. Both tests launch a script from ``dist_scripts/`` with ``torchrun`` and
compare what the ranks dumped:

* ``phi_sync.py`` (no data, float32): broadcast, mean all-reduce of rank-dependent gradients (oracle: Adam on the
  mean, in this process), fp16 skip agreement;
* ``meta_grad_mean.py`` (float64, real stream sharding, a DDP-wrapped model): the applied ∇φ is the mean of the
  single-process meta-gradients on each rank's shard, recomputed here from the same split, shard and φ.
"""
import pytest
import torch

from tests.support.dist import LOOKAHEAD_LR, SCRIPTS, meta_problem, torchrun
from tests.support.meta_oracles import K
from trainer.meta import MetaReweighter

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 3


def _close(actual, expected):
    # float64, the same operations in the same order: differences would be at most a few ulps
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-15 * float(e.abs().max()))


def test_phi_identical_across_ranks(tmp_path):
    from tests.distributed.dist_scripts.phi_sync import rank_grads

    torchrun(str(SCRIPTS / "phi_sync.py"), str(tmp_path), str(STEPS))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in ("start", "after_updates", "after_skip"):
        for a, b in zip(r0[key], r1[key]):
            assert torch.equal(a, b), key
    assert (r0["skipped"], r1["skipped"]) == (False, True)
    for a, b in zip(r0["after_updates"], r0["after_skip"]):
        assert torch.equal(a, b)  # the skip on rank 1 stopped rank 0's step too

    # the updates were Adam steps on the mean of the two ranks' gradients, from rank 0's initial φ
    ref = MetaReweighter.from_dict({"granularity": "class", "lr": 1e-2}, K)
    with torch.no_grad():
        for p, s in zip(ref.meta_net.parameters(), r0["start"]):
            p.copy_(s)
    for step in range(STEPS):
        g0 = rank_grads(0, step, ref.meta_net.parameters())
        g1 = rank_grads(1, step, ref.meta_net.parameters())
        ref.update([(a + b) / 2 for a, b in zip(g0, g1)])
    for a, b in zip(ref.meta_net.parameters(), r0["after_updates"]):
        assert torch.equal(a.detach(), b)


def test_applied_meta_gradient_is_the_mean_of_the_shard_gradients(synth_dir, tmp_path):
    torchrun(str(SCRIPTS / "meta_grad_mean.py"), str(tmp_path), str(synth_dir), str(STEPS))
    dumps = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [d["world"] for d in dumps] == [2, 2] and [d["n_applied"] for d in dumps] == [STEPS, STEPS]

    # broadcast_from(0): the ranks drew different φ, and both start from rank 0's
    before = [d["phi_before_broadcast"] for d in dumps]
    assert any(not torch.equal(a, b) for a, b in zip(*before))
    for d in dumps:
        assert all(torch.equal(a, b) for a, b in zip(d["steps"][0]["phi"], before[0]))

    problems = [meta_problem(synth_dir, r, 2) for r in (0, 1)]
    train_iters = [iter(p[2].train) for p in problems]
    for t in range(STEPS):
        rows = [d["steps"][t] for d in dumps]
        assert all(torch.equal(a, b) for a, b in zip(rows[0]["phi"], rows[1]["phi"])), f"φ differs at step {t}"
        # the ranks saw disjoint shards of both streams
        assert not set(rows[0]["train_ids"].tolist()) & set(rows[1]["train_ids"].tolist())
        assert not set(rows[0]["meta_ids"].tolist()) & set(rows[1]["meta_ids"].tolist())
        single = []
        for r, (cfg, model, streams) in enumerate(problems):
            batch, meta_batch = next(train_iters[r]), next(streams.meta)
            assert torch.equal(batch.ids, rows[r]["train_ids"]) and torch.equal(meta_batch.ids, rows[r]["meta_ids"])
            rw = MetaReweighter(cfg.meta, num_classes=cfg.model.num_classes, dtype=torch.float64)
            with torch.no_grad():
                for p, v in zip(rw.meta_net.parameters(), rows[r]["phi"], strict=True):
                    p.copy_(v)
            grads = rw.meta_gradient(model, (batch.images.double(), batch.labels),
                                     (meta_batch.images.double(), meta_batch.labels), LOOKAHEAD_LR)
            _close(rows[r]["local"], grads)  # rank-local gradient == single-process gradient on that shard
            single.append(grads)
        # different shards, different gradients: otherwise the mean below would prove nothing
        assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(*single))
        mean = [(a + b) / 2 for a, b in zip(*single)]
        for r in (0, 1):
            _close(rows[r]["applied"], mean)
        assert all(torch.equal(a, b) for a, b in zip(rows[0]["applied"], rows[1]["applied"]))

    # after the last step: φ and every piece of its Adam state bit-identical on both ranks
    assert all(torch.equal(dumps[0]["phi_end"][k], dumps[1]["phi_end"][k]) for k in dumps[0]["phi_end"])
    states = [d["adam_end"]["state"] for d in dumps]
    assert states[0].keys() == states[1].keys() and len(states[0]) == len(dumps[0]["phi_end"])
    for pid in states[0]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(states[0][pid][key], states[1][pid][key]), (pid, key)
    assert all(float(s["step"]) == STEPS for s in states[0].values())
