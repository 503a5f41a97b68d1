"""End to end through the CLI on synthetic data: a run dir with a valid metrics.json, predictions and checkpoints."""
import csv
import json

import pytest
import yaml

from tests.support.cli import run_cli, tiny_overrides

K = 5


def _check_metrics(run_dir, loss):
    m = json.loads((run_dir / "metrics.json").read_text())
    t = m["test"]
    for key in ("accuracy", "macro_f1", "weighted_f1", "qwk"):
        assert 0.0 <= t[key] <= 1.0 or key == "qwk"
    assert len(t["per_class_recall"]) == K
    assert len(t["confusion"]) == K and all(len(r) == K for r in t["confusion"])
    assert sum(map(sum, t["confusion"])) == t["n"]
    assert m["loss"] == loss
    assert m["train_img_per_s"] > 0
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    assert all("val" in h and "accuracy" in h["val"] for h in m["history"])
    assert [r["step"] for r in m["step_history"]] == list(range(1, m["steps"] + 1))
    return m


def test_train_ce_writes_run_dir(synth_dir, tmp_path):
    proc = run_cli("-m", "launch.cli", "train", "configs/demo.yaml", *tiny_overrides(synth_dir, tmp_path, "ce"),
                   "--quiet")
    run_dir = tmp_path / "ce"
    m = _check_metrics(run_dir, "ce")
    # the test split in splits.csv is exactly what was evaluated, each image once
    with open(run_dir / "splits.csv") as f:
        test_ids = sorted(r["source_id"] for r in csv.DictReader(f) if r["split"] == "test")
    with open(run_dir / "predictions_test.csv") as f:
        pred_ids = sorted(r["source_id"] for r in csv.DictReader(f))
    assert pred_ids == test_ids and m["test"]["n"] == len(test_ids)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["arch"] == "tiny" and saved["train"]["loss"] == "ce"
    assert any((run_dir / "checkpoints").iterdir())
    assert json.loads(proc.stdout.strip().splitlines()[-1])["run_dir"] == str(run_dir)


def test_max_steps_stops_early_and_still_evaluates(synth_dir, tmp_path):
    run_cli("-m", "launch.train", "configs/demo.yaml",
            *tiny_overrides(synth_dir, tmp_path, "short", "train.max_steps=3"), "--quiet")
    m = json.loads((tmp_path / "short" / "metrics.json").read_text())
    assert m["steps"] == 3 and m["test"]["n"] > 0


def test_existing_run_dir_is_not_overwritten(synth_dir, tmp_path):
    args = ("-m", "launch.train", "configs/demo.yaml",
            *tiny_overrides(synth_dir, tmp_path, "twice", "train.max_steps=1"), "--quiet")
    run_cli(*args)
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "Traceback" not in proc.stderr
    run_cli(*args, "--overwrite")


@pytest.mark.parametrize("override,needle", [
    ("train.epochz=1", "'train.epochz'"),
    ("model.arch=efficientnet-b0", "close matches: efficientnet_b0"),
    ("train.loss=meta meta.lookahead=head model.arch=squeezenet1_1", "1x1 convolution"),
    ("data.root=/nonexistent/dir", "config key 'data.root': /nonexistent/dir not found"),
    ("optim.lr=fast", "override 'optim.lr=fast'"),
    ("train.loss=focal loss.focal_gamma=-1", "focal_gamma"),
    ("train.loss=meta meta.lr=0", "'meta.lr'"),
])
def test_user_errors_are_one_line_exit_2(synth_dir, tmp_path, override, needle):
    proc = run_cli("-m", "launch.train", "configs/demo.yaml", *tiny_overrides(synth_dir, tmp_path, "err"),
                   *override.split(), check=False)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    if "model.arch" in override:  # refused before the run dir is written: fixing the typo is enough to re-run
        assert not (tmp_path / "err").exists()


def test_unreadable_images_are_named_before_training(synth_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    victims = sorted((data / "train_images").iterdir())[:2]
    victims[0].write_bytes(b"")
    victims[1].write_text("not an image")
    proc = run_cli("-m", "launch.train", "configs/demo.yaml", *tiny_overrides(data, tmp_path / "runs", "hdr"),
                   check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "2 unreadable image(s)" in proc.stderr
    assert all(str(v) in proc.stderr for v in victims)
    assert not (tmp_path / "runs" / "hdr" / "checkpoints").exists()  # refused before any training
    run_cli("-m", "launch.train", "configs/demo.yaml",
            *tiny_overrides(data, tmp_path / "runs", "hdr_skip", "data.skip_bad=true", "train.max_steps=1"),
            "--quiet")
    with open(tmp_path / "runs" / "hdr_skip" / "splits.csv") as f:
        listed = {r["source_id"] for r in csv.DictReader(f)}
    assert not {v.stem for v in victims} & listed


def test_tensorboard_events_of_a_meta_run(synth_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_cli("-m", "launch.train", "configs/demo.yaml",
            *tiny_overrides(synth_dir, tmp_path, "tb", "train.loss=meta", "meta.granularity=class",
                            "train.max_steps=6", "train.epochs=3"), "--quiet")
    m = json.loads((tmp_path / "tb" / "metrics.json").read_text())
    acc = EventAccumulator(str(tmp_path / "tb" / "tb"), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/weighted_loss", "meta/loss", "meta/weight_mean", "meta/weight_std",
                "meta/weight_min", "meta/weight_max", "lr/classifier", "lr/meta", "perf/img_per_s",
                "perf/data_wait_frac", "faults/bad_steps"):
        # every_steps=2 over 6 steps: steps 2, 4, 6 (epoch ends flush the same steps, never twice)
        assert [e.step for e in acc.Scalars(tag)] == [2, 4, 6], tag
    epochs = len(m["history"])
    for tag in ("val/accuracy", "val/macro_f1", "val/weighted_f1", "val/qwk", "val/recall/3_severe",
                "val/f1/4_proliferative"):
        assert len(acc.Scalars(tag)) == epochs, tag
    assert [e.value for e in acc.Scalars("val/accuracy")] == pytest.approx([h["val"]["accuracy"]
                                                                            for h in m["history"]])
    assert acc.Scalars("test/accuracy")[0].value == pytest.approx(m["test"]["accuracy"])
    assert "meta/weights" in tags["histograms"] and "meta/class_weights/0_none" in tags["histograms"]
    assert {"train/images", "val/confusion", "test/confusion"} <= set(tags["images"])
    assert "config/text_summary" in tags["tensors"]


def test_dali_on_a_raw_layout_is_refused_with_the_prepare_command(synth_dir, tmp_path):
    pytest.importorskip("nvidia.dali")
    proc = run_cli("-m", "launch.train", "configs/demo.yaml",
                   *tiny_overrides(synth_dir, tmp_path, "rawdali", "data.backend=dali"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "metaloss prepare --dataset aptos" in proc.stderr


def test_auto_backend_picks_dali_for_a_prepared_dir(synth_dir, tmp_path):
    pytest.importorskip("nvidia.dali")
    from data_pipeline.factory import resolve_backend
    from data_pipeline.settings import DataSettings
    from trainer.config import config_from_dict

    prepared = tmp_path / "prepared"
    run_cli("-m", "launch.cli", "prepare", "--dataset", "aptos", "--src", str(synth_dir), "--out", str(prepared),
            "--size", "48", "--workers", "1", "--quiet")
    cfg = config_from_dict({"data": {"root": str(prepared)}})  # format and backend left on auto
    assert resolve_backend(DataSettings.from_config(cfg)) == "dali"
    assert resolve_backend(DataSettings.from_config(config_from_dict({"data": {"root": str(synth_dir)}}))) == "torch"


def test_metaloss_train_takes_options_between_overrides(synth_dir, tmp_path):
    over = tiny_overrides(synth_dir, tmp_path, "mixed", "train.max_steps=2")
    run_cli("-m", "launch.cli", "train", "configs/demo.yaml", *over[:3], "--quiet", *over[3:], "--overwrite")
    assert json.loads((tmp_path / "mixed" / "metrics.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_compiled_model_trains_with_the_meta_step(synth_dir, tmp_path):
    run_cli("-m", "launch.train", "configs/demo.yaml",
            *tiny_overrides(synth_dir, tmp_path, "compiled", "model.compile=true", "train.loss=meta",
                            "train.max_steps=3", "train.epochs=1"), "--quiet")
    m = json.loads((tmp_path / "compiled" / "metrics.json").read_text())
    assert m["steps"] == 3 and m["test"]["n"] > 0
    assert all(r["meta_loss"] is not None for r in m["step_history"])
