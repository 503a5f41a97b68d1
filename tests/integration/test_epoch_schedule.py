"""eval.every_epochs / checkpoint.every_epochs (defaults: every epoch), cudnn.benchmark, the DALI node keys."""
from __future__ import annotations

import pytest
import torch

from trainer.config import ConfigError, config_from_dict
from trainer.engine.checkpoint import list_checkpoints
from trainer.engine.trainer import Trainer


def _cfg(tmp_path, **sections):
    base = {"run": {"out_dir": str(tmp_path), "name": "sched"},
            "data": {"backend": "synthetic", "synthetic_samples": 60, "image_size": 8},
            "model": {"arch": "tiny", "channels_last": False},
            "train": {"batch_size": 8, "eval_batch_size": 8, "epochs": 5, "cpu": True},
            "logging": {"every_steps": 2, "tensorboard": False, "progress": False},
            "checkpoint": {"keep_last": 10}}
    for key, values in sections.items():
        base.setdefault(key, {}).update(values)
    return config_from_dict(base)


def _run(cfg):
    trainer = Trainer(cfg, quiet=True)
    evaluated = []
    evaluate = trainer._evaluate
    trainer._evaluate = lambda split: (evaluated.append((split, trainer.state.epoch)), evaluate(split))[1]
    metrics = trainer.fit()
    steps_per_epoch = trainer.steps_per_epoch
    return metrics, evaluated, [int(p.name.split("_")[1]) // steps_per_epoch
                                for p in reversed(list_checkpoints(cfg.run_dir))]


def test_defaults_evaluate_and_checkpoint_every_epoch(tmp_path):
    metrics, evaluated, ckpt_epochs = _run(_cfg(tmp_path))
    assert evaluated == [("meta", e) for e in range(5)] + [("test", 5)]
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4, 5]
    assert ckpt_epochs == [1, 2, 3, 4, 5]


def test_every_n_epochs_skips_but_always_covers_the_last_epoch(tmp_path):
    metrics, evaluated, ckpt_epochs = _run(_cfg(tmp_path, eval={"every_epochs": 2},
                                                 checkpoint={"every_epochs": 3}))
    assert evaluated == [("meta", 1), ("meta", 3), ("meta", 4), ("test", 5)]
    assert [h["epoch"] for h in metrics["history"]] == [2, 4, 5]
    assert ckpt_epochs == [3, 5]  # epoch 3, and the end of the run


def test_cudnn_benchmark_follows_config_and_determinism(tmp_path):
    saved = torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()
    try:
        cases = (({}, True), ({"cudnn_benchmark": False}, False), ({"deterministic": True}, False))
        for i, (train, expected) in enumerate(cases):
            Trainer(_cfg(tmp_path / str(i), train={"epochs": 1, **train}), quiet=True)
            assert torch.backends.cudnn.benchmark is expected
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.use_deterministic_algorithms(saved[1])


@pytest.mark.parametrize("override, message", [
    ({"eval": {"every_epochs": 0}}, "eval.every_epochs"),
    ({"checkpoint": {"every_epochs": 0}}, "checkpoint.every_epochs"),
    ({"data": {"dali_hw_decoder_load": 1.5}}, "data.dali_hw_decoder_load"),
    ({"data": {"dali_threads": -1}}, "data.dali_threads"),
    ({"data": {"dali_dont_use_mmap": "yes"}}, "data.dali_dont_use_mmap"),
])
def test_new_keys_are_validated(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config_from_dict(override)
