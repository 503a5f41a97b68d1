"""Optimiser keys on resume: refused without --force; under DeepSpeed refused even with it (nothing re-applies them
to the engine's optimiser, so config.yaml would record a rate the run does not use)."""
from __future__ import annotations

import pytest

from trainer.config import config_from_dict, save_config
from trainer.engine.run_dir import RunDirError, check_resume_config


@pytest.mark.parametrize("distributed", ["ddp", "deepspeed"])
def test_a_changed_learning_rate_needs_force_and_deepspeed_refuses_it(tmp_path, distributed):
    base = {"train": {"distributed": distributed}, "optim": {"lr": 0.1}}
    save_config(config_from_dict(base), tmp_path / "config.yaml")
    changed = config_from_dict({**base, "optim": {"lr": 0.01}})
    with pytest.raises(RunDirError, match=r"optim\.lr: 0\.1 -> 0\.01"):
        check_resume_config(tmp_path, changed, force=False)
    if distributed == "ddp":
        check_resume_config(tmp_path, changed, force=True)  # applied by apply_optim_config after the load
    else:
        with pytest.raises(RunDirError, match="cannot change on a DeepSpeed resume, even with --force"):
            check_resume_config(tmp_path, changed, force=True)
    check_resume_config(tmp_path, config_from_dict(base), force=False)  # unchanged: resumes
