"""data.train_fraction (nested stratified train subsample) and data.split_seed (test set fixed across train seeds)."""
from types import SimpleNamespace

import pytest

from data_pipeline.records import Record
from data_pipeline.splits import make_splits, read_splits, subsample_train
from trainer.config import ConfigError, config_from_dict
from data_pipeline.settings import DataSettings
from trainer.engine.run_dir import load_splits


def _records(per_class=(60, 12, 30, 6, 9)):
    out = []
    for k, n in enumerate(per_class):
        out += [Record(f"/x/{k}_{i}.png", k, f"id{k}_{i:03d}") for i in range(n)]
    return out


def test_subsample_is_stratified_nested_and_leaves_meta_and_test_alone():
    full = make_splits(_records(), seed=7, num_classes=5)
    ids = {}
    for frac in (0.25, 0.5, 1.0):
        sub = subsample_train(full, frac, 7, 5)
        assert sub["meta"] == full["meta"] and sub["test"] == full["test"]
        ids[frac] = {r.source_id for r in sub["train"]}
        for k in range(5):
            n_full = sum(r.label == k for r in full["train"])
            n_sub = sum(r.label == k for r in sub["train"])
            assert n_sub == max(1, round(frac * n_full))
    assert ids[0.25] < ids[0.5] < ids[1.0]


def _cfg(tmp_path, **data):
    cfg = config_from_dict({"data": {"backend": "synthetic", "synthetic_samples": 200, **data},
                            "run": {"out_dir": str(tmp_path)}})
    return cfg


def test_split_seed_fixes_the_test_set_across_train_seeds(tmp_path, monkeypatch):
    monkeypatch.setattr("trainer.engine.run_dir.load_records", lambda data: _records())
    one = SimpleNamespace(num_processes=1, is_main_process=True)
    tests = {}
    for seed in (0, 1):
        cfg = _cfg(tmp_path, split_seed=5, train_fraction=0.5)
        cfg.train.seed = seed
        run = tmp_path / f"s{seed}"
        run.mkdir()
        tests[seed] = [r.source_id for r in load_splits(DataSettings.from_config(cfg), run, one)["test"]]
        stored = read_splits(run / "splits.csv")  # the subsample is what splits.csv holds
        assert len(stored["train"]) == pytest.approx(0.5 * 0.7 * 117, abs=3)
    assert tests[0] == tests[1]
    # without split_seed the split follows train.seed, as before
    default = {}
    for seed in (0, 1):
        cfg = _cfg(tmp_path)
        cfg.train.seed = seed
        run = tmp_path / f"d{seed}"
        run.mkdir()
        default[seed] = [r.source_id for r in load_splits(DataSettings.from_config(cfg), run, one)["test"]]
    assert default[0] != default[1]


@pytest.mark.parametrize("frac", [0.0, 1.5, -0.1])
def test_bad_train_fraction_names_the_key(frac):
    with pytest.raises(ConfigError, match="data.train_fraction"):
        config_from_dict({"data": {"train_fraction": frac}})


def test_resume_of_a_run_saved_before_the_new_data_keys(tmp_path):
    import yaml

    from trainer.config import config_to_dict
    from trainer.engine.run_dir import RunDirError, check_resume_config

    cfg = _cfg(tmp_path)
    old = config_to_dict(cfg)
    del old["data"]["split_seed"], old["data"]["train_fraction"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    check_resume_config(tmp_path, cfg, force=False)  # absent = the default it trained with: no change
    cfg.data.train_fraction = 0.5
    with pytest.raises(RunDirError, match=r"data.train_fraction: None -> 0.5"):
        check_resume_config(tmp_path, cfg, force=False)
    cfg.data.train_fraction, cfg.data.split_seed = 1.0, 4
    with pytest.raises(RunDirError, match="data.split_seed"):
        check_resume_config(tmp_path, cfg, force=False)
