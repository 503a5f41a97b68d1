"""DeepSpeed ZeRO-1/2 on two CPU processes (gloo) with the meta step; the combinations metaloss refuses.

The first DeepSpeed run on a machine JIT-compiles a shared-memory comm op with g++ (~60 s, cached afterwards in
~/.cache/torch_extensions), hence the generous timeout.
"""
import json

import pytest
import torch

from tests.support.cli import tiny_overrides
from tests.support.dist import SCRIPTS, python, torchrun
from trainer.engine.accel import build_accelerator
from trainer.engine.checkpoint import list_checkpoints
from trainer.config import ConfigError, load_config


def _cfg(tmp_path, *extra):
    return load_config("configs/demo.yaml", tiny_overrides(tmp_path, tmp_path, "ds", "train.distributed=deepspeed",
                                                           *extra))


def test_zero3_is_refused_before_anything_starts(tmp_path):
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match=r"ZeRO stage 3.*ZeRO-1/2 only"):
        build_accelerator(_cfg(tmp_path, f"train.deepspeed_config={zero3}"))


@pytest.mark.parametrize("extra,needle", [
    (("train.loss=meta", "meta.lookahead_optimizer=adam"), "meta.lookahead_optimizer: adam is not available"),
    (("train.deepspeed_config=configs/deepspeed/nope.json",), "configs/deepspeed/nope.json"),
])
def test_unsupported_deepspeed_setups_are_refused(tmp_path, extra, needle):
    with pytest.raises(ConfigError, match=needle):
        build_accelerator(_cfg(tmp_path, *extra))


def test_zero3_refusal_is_one_line_through_the_cli(synth_dir, tmp_path):
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    proc = python("-m", "launch.train", "configs/demo.yaml", *tiny_overrides(synth_dir, tmp_path, "z3"),
                  "train.distributed=deepspeed", f"train.deepspeed_config={zero3}", check=False)
    assert proc.returncode == 2 and "ZeRO stage 3" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.distributed
@pytest.mark.deepspeed
@pytest.mark.slow
def test_zero2_bf16_two_ranks_meta_step_preempt_and_resume(synth_dir, tmp_path):
    args = [str(SCRIPTS / "train_and_dump.py"), str(tmp_path / "dump"), "configs/demo.yaml",
            *tiny_overrides(synth_dir, tmp_path, "zero2", "train.distributed=deepspeed",
                            "train.deepspeed_config=configs/deepspeed/zero2.json", "train.precision=bf16",
                            "train.loss=meta", "train.max_steps=7", "checkpoint.every_steps=2",
                            "checkpoint.keep_last=2")]

    # SIGTERM on both ranks after step 2: they agree one step later and checkpoint step 3 (mid first epoch)
    torchrun(*args, env={"METALOSS_TEST_FAULT": "term_after_step:2"}, timeout=600)
    r0, r1 = (torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["metrics"] == {"preempted": True, "step": 3, "signal": "SIGTERM"}
    # the meta step ran (φ moved) and left φ, its Adam state and θ identical on both ranks
    assert any(not torch.equal(r0["phi"][k], r0["phi_start"][k]) for k in r0["phi"])
    assert all(torch.equal(r0["phi"][k], r1["phi"][k]) for k in r0["phi"])
    for pid, st in r0["phi_adam"]["state"].items():
        assert all(torch.equal(st[k], r1["phi_adam"]["state"][pid][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
        assert float(st["step"]) == 3
    assert all(torch.equal(r0["model"][k], r1["model"][k]) for k in r0["model"])  # incl. BatchNorm buffers
    # DeepSpeed bf16 holds bf16 parameters (hence the input cast); φ stays fp32
    assert r0["model"]["fc.weight"].dtype == torch.bfloat16 and r0["phi"]["layers.0.weight"].dtype == torch.float32
    ckpts = list_checkpoints(tmp_path / "zero2")
    assert [p.name for p in ckpts] == ["step_00000003", "step_00000002"]
    assert (ckpts[0] / "pytorch_model").is_dir()  # the engine's own (ZeRO-partitioned) checkpoint

    # resume through the engine's load_checkpoint and finish
    torchrun(*args, "--resume", "auto", timeout=600)
    r0b, r1b = (torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert all(torch.equal(r0b["phi_start"][k], r0["phi"][k]) for k in r0["phi"])  # φ came back from step 3
    assert all(torch.equal(r0b["model_start"][k], r0["model"][k]) for k in r0["model"])  # and θ with it
    assert r0b["metrics"]["steps"] == 7 and r0b["metrics"]["test"]["n"] > 0
    assert [r["step"] for r in r0b["metrics"]["step_history"]] == list(range(1, 8))
    assert all(float(st["step"]) == 7 for st in r0b["phi_adam"]["state"].values())
    assert all(torch.equal(r0b["phi"][k], r1b["phi"][k]) for k in r0b["phi"])
    assert all(torch.equal(r0b["model"][k], r1b["model"][k]) for k in r0b["model"])
