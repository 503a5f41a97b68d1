"""model.compile: evaluation never recompiles (eval batches are padded to a fixed size) and unwrapping a compiled
DDP model for the meta step leaves the compiled wrapper pointing at DDP (no silent loss of the gradient all-reduce)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._dynamo import register_backend

from trainer.config import config_from_dict
from trainer.engine.trainer import Trainer

GRAPHS: list[int] = []  # one entry per graph dynamo hands to the backend (= per compilation)


@register_backend(name="metaloss_test_counting")
def _counting_backend(gm, example_inputs):
    GRAPHS.append(len(example_inputs))
    return gm.forward  # run the captured graph eagerly: the count is what matters, and it is fast on a CPU


def _cfg(tmp_path, **train):
    # 100 synthetic samples -> splits whose meta / test sizes end in partial eval batches of different sizes
    return config_from_dict({
        "run": {"out_dir": str(tmp_path), "name": "compiled"},
        "data": {"backend": "synthetic", "synthetic_samples": 100, "image_size": 16,
                 "split_fractions": [0.6, 0.17, 0.23]},
        "model": {"arch": "tiny", "compile": True, "compile_backend": "metaloss_test_counting",
                  "channels_last": False},
        "train": {"batch_size": 8, "eval_batch_size": 6, "epochs": 3, "cpu": True, **train},
        "logging": {"every_steps": 3, "tensorboard": False, "progress": False},
        "checkpoint": {"enabled": False},
    })


def test_evaluation_does_not_recompile_after_the_first_epoch(tmp_path):
    torch._dynamo.reset()
    GRAPHS.clear()
    trainer = Trainer(_cfg(tmp_path), quiet=True)
    sizes = {s: len(trainer.splits[s]) for s in ("meta", "test")}
    # the precondition that makes this test bite: both evaluations end in a partial batch, of different sizes
    assert sizes["meta"] % 6 and sizes["test"] % 6 and sizes["meta"] % 6 != sizes["test"] % 6, sizes
    for split in ("meta", "test"):
        assert {b.images.shape[0] for b in trainer.streams.eval[split]} == {6}  # padded: one shape
    after_epoch: list[int] = []
    end_epoch = trainer._end_epoch

    def counting_end_epoch():
        end_epoch()
        after_epoch.append(len(GRAPHS))

    trainer._end_epoch = counting_end_epoch
    metrics = trainer.fit()
    assert len(after_epoch) == 3 and after_epoch[0] > 0
    # train graph + eval graph compiled in epoch 1; epochs 2-3, and the test evaluation, reuse them
    assert after_epoch == [after_epoch[0]] * 3
    assert len(GRAPHS) == after_epoch[0]
    # padding (id -1) never reaches the metrics: every test image exactly once
    assert sum(sum(row) for row in metrics["test"]["confusion"]) == sizes["test"]


def test_bare_model_keeps_the_compiled_wrapper_on_ddp(tmp_path):
    from accelerate import Accelerator

    from trainer.engine.accel import bare_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        net = torch.nn.Linear(3, 2)
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        compiled = torch.compile(ddp, backend="eager")
        acc = Accelerator(cpu=True)
        assert bare_model(acc, compiled) is net
        assert compiled._orig_mod is ddp  # still all-reduces gradients
        # what the default unwrap does (the bug bare_model avoids): the compiled wrapper now skips DDP
        acc.unwrap_model(compiled)
        assert compiled._orig_mod is net
    finally:
        dist.destroy_process_group()
