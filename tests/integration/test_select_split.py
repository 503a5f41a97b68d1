"""The fourth (select) split and data.baselines_use_meta_split.

A 4-way split is stratified and persisted like the 3-way one; a 3-way split is byte-for-byte what it was before the
select split existed (golden digests taken from commit 8074703's splits.py); fixed losses can train on train ∪ meta,
meta-reweighting never does; the trainer scores the select split at the end and logs the mean meta weight.
"""
from __future__ import annotations

import hashlib
import json

import pytest
from accelerate.state import AcceleratorState

from tests.support.cli import tiny_overrides
from tests.support.split_records import CLASS_COUNTS, records_per_class
from data_pipeline.records import DataError
from data_pipeline.splits import SPLITS, SPLITS_WITH_SELECT, load_or_make_splits, make_splits, read_splits, write_splits
from trainer.config import ConfigError, config_from_dict, load_config
from trainer.engine.run_dir import RunDirError, check_resume_config, stream_tables

FOUR = (0.60, 0.15, 0.10, 0.15)


def _digest(splits) -> str:
    return hashlib.sha256("\n".join(f"{s}:{r.source_id}" for s in SPLITS for r in splits[s]).encode()).hexdigest()


# --- the split itself -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,digest", [
    (0, "11c6f5ad57f9be5e87c98aede8de9cbaae0333b3e7c925cf8f450564db75cda6"),
    (5, "c09a55465f63ceb8cd74f6b7c65dd43fa6794ff508a9e5749c92974426bd7506")])
def test_three_fractions_give_exactly_the_split_they_always_gave(seed, digest):
    splits = make_splits(records_per_class(), (0.70, 0.15, 0.15), seed=seed)
    assert tuple(splits) == SPLITS  # no select key at all
    assert _digest(splits) == digest


def test_an_existing_three_way_splits_csv_reads_back_without_a_select_split(tmp_path):
    path = tmp_path / "splits.csv"
    path.write_text("path,label,source_id,split\n/a.png,0,a,train\n/b.png,1,b,meta\n/c.png,0,c,test\n")
    splits = read_splits(path)
    assert set(splits) == set(SPLITS)
    assert [r.source_id for r in splits["test"]] == ["c"]


def test_four_fractions_stratify_every_class_into_four_disjoint_splits():
    records = records_per_class()
    splits = make_splits(records, FOUR, seed=0)
    assert tuple(splits) == SPLITS_WITH_SELECT
    ids = [r.source_id for s in SPLITS_WITH_SELECT for r in splits[s]]
    assert len(ids) == len(set(ids)) == len(records)
    for label, n in enumerate(CLASS_COUNTS):
        got = [sum(r.label == label for r in splits[s]) for s in SPLITS_WITH_SELECT]
        assert sum(got) == n and min(got) >= 1
        for count, frac in zip(got, FOUR):
            assert abs(count - n * frac) <= 1, (label, got)


def test_four_way_split_round_trips_through_splits_csv_and_is_reused(tmp_path):
    records = records_per_class()
    first = load_or_make_splits(tmp_path, records, FOUR, seed=0, num_classes=5)
    text = (tmp_path / "splits.csv").read_text()
    assert ",select\n" in text
    assert read_splits(tmp_path / "splits.csv") == first
    again = load_or_make_splits(tmp_path, records, FOUR, seed=99, num_classes=5)  # a resume: the file wins
    assert again == first and (tmp_path / "splits.csv").read_text() == text


def test_a_class_too_small_for_four_splits_is_named():
    make_splits(records_per_class((30, 4, 30, 10, 10)), FOUR, seed=0)  # 4 is enough: one each
    with pytest.raises(DataError, match=r"1_mild.*3 sample.*at least 4.*select"):
        make_splits(records_per_class((30, 3, 30, 10, 10)), FOUR, seed=0)


def test_config_takes_three_or_four_fractions_only():
    assert config_from_dict({"data": {"split_fractions": list(FOUR)}}).data.split_fractions == list(FOUR)
    with pytest.raises(ConfigError, match="data.split_fractions"):
        config_from_dict({"data": {"split_fractions": [0.5, 0.1, 0.1, 0.1, 0.2]}})
    with pytest.raises(ConfigError, match="data.split_fractions"):
        config_from_dict({"data": {"split_fractions": [0.6, 0.15, 0.1, 0.1]}})  # sums to 0.95


# --- baselines_use_meta_split ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["ce", "weighted_ce", "ldam", "meta"])
def test_baselines_use_meta_split_adds_meta_to_train_for_fixed_losses_only(loss):
    splits = make_splits(records_per_class(), FOUR, seed=0)
    on = stream_tables(config_from_dict({"data": {"baselines_use_meta_split": True}, "train": {"loss": loss}}), splits)
    off = stream_tables(config_from_dict({"train": {"loss": loss}}), splits)
    assert off == splits
    train_ids = {r.source_id for r in on["train"]}
    if loss == "meta":
        assert on == splits  # φ needs the meta split held out from θ's data
    else:
        assert train_ids == {r.source_id for s in ("train", "meta") for r in splits[s]}
        assert [r.source_id for r in on["train"]] == sorted(train_ids)
        for s in ("meta", "select", "test"):  # evaluation tables untouched
            assert on[s] == splits[s]


def test_changing_baselines_use_meta_split_on_resume_is_refused(tmp_path):
    from trainer.config import save_config

    save_config(config_from_dict({}), tmp_path / "config.yaml")
    with pytest.raises(RunDirError, match="data.baselines_use_meta_split: False -> True"):
        check_resume_config(tmp_path, config_from_dict({"data": {"baselines_use_meta_split": True}}), force=False)


# --- the trainer ----------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _trainer(synth_dir, tmp_path, name, *extra):
    from trainer.engine.trainer import Trainer

    cfg = load_config("configs/demo.yaml", tiny_overrides(synth_dir, tmp_path, name, "checkpoint.enabled=false",
                                                          "data.split_fractions=[0.6,0.15,0.1,0.15]", *extra))
    return Trainer(cfg, quiet=True)


@pytest.mark.parametrize("loss", ["ce", "meta"])
def test_trainer_train_stream_follows_baselines_use_meta_split(synth_dir, tmp_path, fresh_accelerate_state, loss):
    plain = _trainer(synth_dir, tmp_path, f"plain_{loss}", f"train.loss={loss}")
    AcceleratorState._reset_state(True)
    union = _trainer(synth_dir, tmp_path, f"union_{loss}", f"train.loss={loss}", "data.baselines_use_meta_split=true")
    assert plain.splits == union.splits  # splits.csv holds the real split either way
    n_train, n_meta = len(plain.splits["train"]), len(plain.splits["meta"])
    batch = plain.cfg.train.batch_size
    assert len(plain.streams.train) == n_train // batch
    meta_counts = [sum(r.label == k for r in plain.splits["meta"]) for k in range(5)]
    if loss == "meta":
        assert len(union.streams.train) == n_train // batch
        assert union.streams.class_counts == plain.streams.class_counts
    else:
        assert len(union.streams.train) == (n_train + n_meta) // batch
        assert union.streams.class_counts == [a + b for a, b in zip(plain.streams.class_counts, meta_counts)]


def test_trainer_scores_the_select_split_and_logs_the_mean_meta_weight(synth_dir, tmp_path, fresh_accelerate_state):
    t = _trainer(synth_dir, tmp_path, "sel", "train.loss=meta", "train.max_steps=3")
    metrics = t.fit()
    assert set(t.streams.eval) == {"meta", "select", "test"}
    on_disk = json.loads((t.run_dir / "metrics.json").read_text())
    assert on_disk["select"]["n"] == len(t.splits["select"])
    assert on_disk["test"]["n"] == len(t.splits["test"])
    w = [r["w_mean"] for r in on_disk["step_history"]]
    assert len(w) == 3 and on_disk["meta_weight_mean"] == pytest.approx(sum(w) / 3)
    assert metrics["select"] == on_disk["select"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(t.run_dir / "tb")).Reload().Tags()["scalars"]
    assert any(tag.startswith("select/") for tag in tags), tags


def test_a_three_way_run_has_no_select_block(synth_dir, tmp_path, fresh_accelerate_state):
    from trainer.engine.trainer import Trainer

    cfg = load_config("configs/demo.yaml", tiny_overrides(synth_dir, tmp_path, "three", "checkpoint.enabled=false",
                                                          "train.max_steps=2"))
    t = Trainer(cfg, quiet=True)
    t.fit()
    on_disk = json.loads((t.run_dir / "metrics.json").read_text())
    assert "select" not in on_disk and "meta_weight_mean" not in on_disk
    assert set(t.streams.eval) == {"meta", "test"}
