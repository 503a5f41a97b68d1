"""A failed start is not a run: the corrected command (with or without --resume auto, as a requeued SLURM job
passes it) starts clean, with one line saying so, and nothing the failed start left behind is re-used."""
import csv

import pytest

from tests.support.cli import run_cli, tiny_overrides
from data_pipeline.splits import make_splits
from trainer.config import load_config
from data_pipeline.dataset import load_records
from data_pipeline.settings import DataSettings


def _train(*args, check=True):
    return run_cli("-m", "launch.train", "configs/demo.yaml", *args, check=check)


def _split_ids(run_dir):
    with open(run_dir / "splits.csv") as f:
        return sorted((r["split"], r["source_id"]) for r in csv.DictReader(f))


@pytest.mark.slow
def test_a_path_typo_does_not_block_the_corrected_rerun(synth_dir, tmp_path):
    good = tiny_overrides(synth_dir, tmp_path, "typo", "train.max_steps=1")
    typo = [o if not o.startswith("data.root=") else f"data.root={synth_dir}_typo" for o in good]
    proc = _train(*typo, "--resume", "auto", check=False)
    assert proc.returncode == 2 and "config key 'data.root'" in proc.stderr and "not found" in proc.stderr
    assert (tmp_path / "typo" / "config.yaml").is_file()  # what the failed start leaves behind
    # the requeued / corrected job: same name, --resume auto, the data keys differ from the saved config
    proc = _train(*good, "--resume", "auto", "--quiet")
    assert proc.stderr.count("an earlier start failed): starting it afresh") == 1
    assert "refusing" not in proc.stderr and (tmp_path / "typo" / "metrics.json").is_file()
    # a finished run is a run: the same command without --overwrite/--resume is still refused
    assert "already exists" in _train(*good, check=False).stderr


@pytest.mark.slow
def test_the_rerun_after_a_failed_start_makes_its_own_split(synth_dir, tmp_path):
    # dies after splits.csv is written and before the first checkpoint (a crash, a typo found at step 1, ...)
    first = tiny_overrides(synth_dir, tmp_path, "resplit", "train.max_steps=1", "train.seed=0")
    proc = run_cli("-m", "launch.train", "configs/demo.yaml", *first, env={"METALOSS_TEST_FAULT": "kill_after_step:1"},
                   check=False)
    assert proc.returncode == -9 and (tmp_path / "resplit" / "splits.csv").is_file()
    assert not (tmp_path / "resplit" / "checkpoints").exists()
    seed0 = _split_ids(tmp_path / "resplit")
    second = tiny_overrides(synth_dir, tmp_path, "resplit", "train.max_steps=1", "train.seed=1")
    _train(*second, "--quiet")  # no --resume, no --overwrite
    cfg = load_config("configs/demo.yaml", second)
    expected = make_splits(load_records(DataSettings.from_config(cfg)), cfg.data.split_fractions, 1,
                           cfg.model.num_classes)
    got = _split_ids(tmp_path / "resplit")
    assert got == sorted((s, r.source_id) for s, rs in expected.items() for r in rs)
    assert got != seed0
