"""Only a run dir the trainer recognises as its own failed start is deleted; anything else is refused, untouched."""
from __future__ import annotations

import pytest

from trainer.config import Config, save_config
from trainer.engine.checkpoint import MARKER, PREEMPTED
from trainer.engine.run_dir import RunDirError, is_failed_start, prepare_run_dir


def _cfg(tmp_path, name="r"):
    cfg = Config()
    cfg.run.out_dir, cfg.run.name = str(tmp_path), name
    return cfg


def _failed_start(run_dir):
    """What a start killed before its first checkpoint leaves: config, split, TensorBoard, a partial save."""
    run_dir.mkdir(parents=True)
    save_config(Config(), run_dir / "config.yaml")
    (run_dir / "splits.csv").write_text("split,source_id\n")
    (run_dir / "tb").mkdir()
    (run_dir / "tb" / "events.out.tfevents.1").write_bytes(b"x")
    (run_dir / "checkpoints" / ".tmp-step_00000003").mkdir(parents=True)


def test_a_failed_start_is_recognised_and_started_afresh(tmp_path):
    cfg = _cfg(tmp_path)
    _failed_start(cfg.run_dir)
    assert is_failed_start(cfg.run_dir)
    prepare_run_dir(cfg, is_main=True, resume=False, overwrite=False)
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize("extra", ["notes.txt", "metrics.json", "checkpoints/step_00000003",
                                   f"checkpoints/step_00000003/{MARKER}", f"checkpoints/{PREEMPTED}"])
def test_a_dir_with_anything_else_is_kept_and_refused(tmp_path, extra):
    cfg = _cfg(tmp_path)
    _failed_start(cfg.run_dir)
    path = cfg.run_dir / extra
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir() if extra.endswith("0003") else path.write_text("{}")
    assert not is_failed_start(cfg.run_dir)
    with pytest.raises(RunDirError, match="already exists"):
        prepare_run_dir(cfg, is_main=True, resume=False, overwrite=False)
    assert path.exists() and (cfg.run_dir / "splits.csv").is_file()


def test_a_folder_the_trainer_did_not_write_is_never_deleted(tmp_path):
    # run.name pointed at someone's folder: no config.yaml of ours, nothing that looks like a run
    cfg = _cfg(tmp_path, "data")
    cfg.run_dir.mkdir()
    (cfg.run_dir / "splits.csv").write_text("mine\n")
    assert not is_failed_start(cfg.run_dir)
    with pytest.raises(RunDirError, match="already exists"):
        prepare_run_dir(cfg, is_main=True, resume=False, overwrite=False)
    assert (cfg.run_dir / "splits.csv").read_text() == "mine\n"
