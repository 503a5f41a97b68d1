"""Resume safety and storage faults: a changed config is refused with the changed keys (--force overrides), and a
full disk during a checkpoint write is a clear error that keeps the previous checkpoint loadable."""
import errno

import pytest
from accelerate.state import AcceleratorState

from tests.support.cli import run_cli, tiny_overrides
from trainer.engine.checkpoint import CheckpointError, list_checkpoints
from trainer.config import load_config
from trainer.engine.trainer import Trainer


def test_resume_with_changed_settings_is_refused_with_a_diff(synth_dir, tmp_path):
    base = tiny_overrides(synth_dir, tmp_path, "guarded", "train.max_steps=3")
    run_cli("-m", "launch.train", "configs/demo.yaml", *base, "--quiet")
    proc = run_cli("-m", "launch.train", "configs/demo.yaml", *base, "model.num_classes=5", "meta.lr=0.01",
                   "data.image_size=48", "train.epochs=3", "--resume", "auto", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "refusing to resume" in proc.stderr
    assert "data.image_size: 32 -> 48" in proc.stderr and "meta.lr: 0.001 -> 0.01" in proc.stderr
    assert "train.epochs" not in proc.stderr  # training length may change on resume
    # --force resumes anyway
    run_cli("-m", "launch.train", "configs/demo.yaml", *base, "meta.lr=0.01", "--resume", "auto", "--force",
            "--quiet")


def test_disk_full_during_checkpoint_keeps_the_previous_one(synth_dir, tmp_path):
    AcceleratorState._reset_state(True)
    cfg = load_config("configs/demo.yaml", tiny_overrides(synth_dir, tmp_path, "full", "checkpoint.every_steps=2",
                                                          "train.max_steps=4"))
    trainer = Trainer(cfg, quiet=True)
    acc = trainer.accelerator
    real_save = acc.save_state

    def save_state_then_disk_full(path, **kwargs):
        if trainer.state.step >= 4:
            real_save(path, **kwargs)  # most files written, then the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device", str(path) + "/optimizer.bin")
        return real_save(path, **kwargs)

    acc.save_state = save_state_then_disk_full
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoints are kept"):
        trainer.fit()
    ckpts = list_checkpoints(trainer.run_dir)
    assert [c.name for c in ckpts] == ["step_00000002"]
    assert not [p for p in (trainer.run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    AcceleratorState._reset_state(True)
    resumed = Trainer(cfg, resume="auto", quiet=True)  # the kept checkpoint loads
    assert resumed.state.step == 2
    AcceleratorState._reset_state(True)


@pytest.mark.slow
def test_resume_with_a_changed_optimiser_is_refused_then_applied_with_force(synth_dir, tmp_path):
    import torch
    import yaml

    # epochs=5: a run stopped by max_steps closes its epoch, and each resume below continues one
    base = tiny_overrides(synth_dir, tmp_path, "optim", "train.max_steps=3", "optim.lr=0.001", "train.epochs=5")
    run_cli("-m", "launch.train", "configs/demo.yaml", *base, "--quiet")
    run_dir = tmp_path / "optim"
    longer = [*base, "train.max_steps=4", "optim.lr=0.01"]
    proc = run_cli("-m", "launch.train", "configs/demo.yaml", *longer, "--resume", "auto", check=False)
    assert proc.returncode == 2 and "optim.lr: 0.001 -> 0.01" in proc.stderr and "Traceback" not in proc.stderr
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 0.001  # refused: unchanged

    proc = run_cli("-m", "launch.train", "configs/demo.yaml", *longer, "--resume", "auto", "--force", "--quiet")
    assert "resume applies the new config: optim.lr: 0.001 -> 0.01" in proc.stderr
    opt = torch.load(list_checkpoints(run_dir)[0] / "optimizer.bin", weights_only=False)
    assert [g["lr"] for g in opt["param_groups"]] == [0.01]  # the rate the run actually trained step 4 with
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 0.01

    # another optimiser: no KeyError 'momentum'; SGD's own state from then on
    run_cli("-m", "launch.train", "configs/demo.yaml", *longer, "train.max_steps=5", "optim.name=sgd",
            "--resume", "auto", "--force", "--quiet")
    opt = torch.load(list_checkpoints(run_dir)[0] / "optimizer.bin", weights_only=False)
    assert opt["param_groups"][0]["momentum"] == 0.9
    assert all(set(s) == {"momentum_buffer"} for s in opt["state"].values())
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["name"] == "sgd"
