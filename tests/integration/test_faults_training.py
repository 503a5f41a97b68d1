"""Training faults: a non-finite batch skips the step (counted, logged); too many in a row stop the run with a
checkpoint of the last good state; the same config and seed give identical metrics twice (CPU determinism)."""
import json

import pytest
import torch
from accelerate.state import AcceleratorState

from tests.support.cli import tiny_overrides
from trainer.engine.checkpoint import list_checkpoints
from trainer.config import load_config
from trainer.engine.trainer import Trainer, TrainingStopped


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    # Accelerate keeps process-wide singletons; each in-process Trainer here starts from a clean slate
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


class PoisonedStream:
    """Wraps a train stream and puts NaN into the images of the chosen (global) steps."""

    def __init__(self, inner, trainer, bad_steps):
        self.inner, self.trainer, self.bad_steps = inner, trainer, set(bad_steps)

    def __len__(self):
        return len(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __iter__(self):
        for batch in self.inner:
            if self.trainer.state.step + 1 in self.bad_steps:
                batch.images = torch.full_like(batch.images, float("nan"))
            yield batch


def _trainer(synth_dir, tmp_path, name, *extra):
    cfg = load_config("configs/demo.yaml", tiny_overrides(synth_dir, tmp_path, name, *extra))
    return Trainer(cfg, quiet=True)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("loss,optim", [("ce", "adam"), ("meta", "adam"), ("ce", "sgd"), ("ce", "adamw")])
def test_nan_batch_skips_the_step(synth_dir, tmp_path, loss, optim):
    t = _trainer(synth_dir, tmp_path, f"nan_{loss}_{optim}", f"train.loss={loss}", f"optim.name={optim}",
                 "train.max_steps=5", "checkpoint.enabled=false")
    t.streams.train = PoisonedStream(t.streams.train, t, bad_steps={2, 3})
    seen = {}
    runner = t.step_runner

    def spy(batch, step):
        before = _params(t.model)
        out = original(batch, step)
        seen[step + 1] = (before, _params(t.model))
        return out

    original = runner.__call__
    t.step_runner = spy
    metrics = t.fit()
    assert metrics["bad_steps"] == 2
    for step in (2, 3):  # skipped: every parameter bit-identical, nothing became NaN
        before, after = seen[step]
        for k in before:
            if "num_batches_tracked" in k or "running_" in k:
                continue
            assert torch.equal(before[k], after[k]), (step, k)
    before, after = seen[4]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # a good step moves
    assert all(torch.isfinite(v).all() for v in _params(t.model).values() if v.is_floating_point())
    assert metrics["test"]["n"] > 0
    saved = json.loads((t.run_dir / "metrics.json").read_text())
    assert saved["bad_steps"] == 2


def test_consecutive_bad_steps_stop_with_checkpoint(synth_dir, tmp_path):
    t = _trainer(synth_dir, tmp_path, "stop", "train.max_bad_steps=3", "logging.every_steps=1",
                 "train.epochs=3")
    t.streams.train = PoisonedStream(t.streams.train, t, bad_steps=set(range(3, 100)))
    with pytest.raises(TrainingStopped, match="3 consecutive steps"):
        t.fit()
    ckpts = list_checkpoints(t.run_dir)
    assert ckpts, "the last good state must be checkpointed"
    # the checkpoint holds finite weights (the good state), not NaN ones
    state = torch.load(ckpts[0] / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_same_seed_same_metrics(synth_dir, tmp_path):
    runs = []
    for name in ("det_a", "det_b"):
        AcceleratorState._reset_state(True)
        t = _trainer(synth_dir, tmp_path, name, "train.loss=meta", "train.max_steps=4", "checkpoint.enabled=false",
                     "train.deterministic=true")
        runs.append(t.fit())
    a, b = runs
    assert a["test"] == b["test"]
    assert [r["train_loss"] for r in a["step_history"]] == [r["train_loss"] for r in b["step_history"]]
    assert [r["w_mean"] for r in a["step_history"]] == [r["w_mean"] for r in b["step_history"]]
