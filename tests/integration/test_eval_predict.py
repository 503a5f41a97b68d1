"""`metaloss eval` on a second synthetic set (1 and 2 ranks) and `metaloss predict` on a folder with a corrupt file."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch

from tests.support.cli import run_cli, tiny_overrides
from tests.support.dist import torchrun
from trainer.clinical_metrics import clinical_metrics
from trainer.engine.inference import InferenceError, load_trained_model
from trainer.reporting.report import load_run


@pytest.fixture(scope="module")
def trained(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    run_cli("-m", "launch.train", "configs/demo.yaml",
            *tiny_overrides(synth_dir, out, "demo_like", "logging.log_images=false"), "--quiet")
    return out / "demo_like"


@pytest.fixture(scope="module")
def second_set(tmp_path_factory):
    from data_pipeline.synth import generate_synthetic

    out = tmp_path_factory.mktemp("second") / "aptos2"
    generate_synthetic(out, n=40, size=48, seed=9, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def evaluated(trained, second_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluated") / "ev"
    _eval(trained, second_set, out)
    return out


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _eval(run, data, out, *extra, check=True):
    return run_cli("-m", "launch.cli", "eval", str(run), "--data", str(data), "--out", str(out), "--num-workers", "0",
                   "--n-boot", "50", *extra, check=check)


@pytest.mark.slow
def test_eval_on_a_second_synthetic_set(trained, second_set, evaluated, tmp_path):
    run = load_run(evaluated)  # the report's own validation of the training schema
    labels = {r["id_code"]: int(r["diagnosis"]) for r in _rows(second_set / "train.csv")}
    assert sorted(run.source_ids) == sorted(labels) and run.test["n"] == len(labels)
    assert [labels[i] for i in run.source_ids] == run.y_true.tolist()
    m = json.loads((evaluated / "metrics.json").read_text())
    assert m["evaluated"]["split"] == "all" and m["evaluated"]["checkpoint"].startswith(str(trained))
    again = clinical_metrics(run.y_true, run.probs, 5, 2)
    assert m["test"]["referable"]["auc"] == pytest.approx(again["referable"]["auc"], abs=1e-4)
    assert m["test"]["ece"] == pytest.approx(again["ece"], abs=1e-4)
    assert set(m["test"]["ci95"]) >= {"referable.auc", "referable.sensitivity", "ece"}
    assert (evaluated / "confusion.png").is_file()
    # --split test: the run's split fractions and seed applied to the new set, test part only
    _eval(trained, second_set, tmp_path / "ev_test", "--split", "test")
    assert 0 < load_run(tmp_path / "ev_test").test["n"] < len(labels)
    out = run_cli("-m", "launch.cli", "report", str(evaluated), "--out", str(tmp_path / "rep" / "r.md"),
                  "--n-boot", "20")
    assert "Referable AUC" in (tmp_path / "rep" / "r.md").read_text(), out.stdout


@pytest.mark.distributed
@pytest.mark.slow
def test_eval_two_ranks_counts_every_image_once(trained, second_set, evaluated, tmp_path):
    torchrun("-m", "launch.cli", "eval", str(trained), "--data", str(second_set), "--out", str(tmp_path / "two"),
             "--num-workers", "0", "--n-boot", "50")
    one, two = load_run(evaluated), load_run(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["evaluated"]["ranks"] == 2
    assert len(set(two.source_ids)) == len(two.source_ids) == len(one.source_ids)
    assert two.source_ids == one.source_ids
    np.testing.assert_allclose(two.probs, one.probs, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("flag,needle", [(("--num-classes", "3"), "trained for 5 classes, the data has 3"),
                                         (("--image-size", "64"), "trained at image size 32, asked for 64")])
def test_eval_refuses_a_model_that_does_not_fit(trained, second_set, tmp_path, flag, needle):
    proc = _eval(trained, second_set, tmp_path / "bad", *flag, check=False)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_deepspeed_partitions_that_cannot_be_consolidated_are_refused_in_one_line(trained, tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    shutil.copytree(trained, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    (ckpt / "pytorch_model").mkdir(parents=True)
    (ckpt / "pytorch_model" / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    (ckpt / "COMPLETE").write_text("{}")
    with pytest.raises(InferenceError, match=r"DeepSpeed ZeRO partitions .* consolidate them by hand") as e:
        load_trained_model(ckpt)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_predict_folder_with_one_corrupt_file(trained, second_set, evaluated, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    picked = sorted((second_set / "train_images").iterdir())[:4]
    for p in picked:
        shutil.copy(p, folder / p.name)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    evald = {r["source_id"]: r for r in _rows(evaluated / "predictions_test.csv")}
    for tta in ("none", "flip"):
        out = tmp_path / f"preds_{tta}.csv"
        proc = run_cli("-m", "launch.cli", "predict", str(trained), "--dir", str(folder), "--out", str(out),
                       "--tta", tta)
        assert "corrupt.png" in proc.stderr and "4 graded, 1 unreadable" in proc.stdout
        rows = {r["path"].split("/")[-1]: r for r in _rows(out)}
        assert rows["corrupt.png"]["status"] == "error" and rows["corrupt.png"]["error"]
        for p in picked:
            r = rows[p.name]
            probs = np.array([float(r[f"prob_{c}"]) for c in range(5)])
            assert r["status"] == "ok" and int(r["grade"]) == probs.argmax() and probs.sum() == pytest.approx(1, abs=1e-5)
            assert float(r["p_referable"]) == pytest.approx(probs[2:].sum(), abs=1e-5)
            assert int(r["referable"]) == int(int(r["grade"]) >= 2)
            ev = np.array([float(evald[p.stem][f"prob_{c}"]) for c in range(5)])
            if tta == "none":  # the same preprocessing and model as eval (and as training's test evaluation)
                np.testing.assert_allclose(probs, ev, atol=2e-6)


def test_predict_repeats_the_prepare_crop(second_set, tmp_path):
    from PIL import Image

    from data_pipeline.backends.transforms import eval_transform
    from data_pipeline.prepare import prepare_dataset
    from launch.predict import preprocessor

    prepare_dataset("aptos", second_set, tmp_path / "prep", size=40, workers=1, progress=False)
    manifest = _rows(tmp_path / "prep" / "manifest.csv")[:3]
    load = preprocessor({"prepared": {"size": 40, "ben_graham": False}, "image_size": 32})
    for row in manifest:
        raw = second_set / "train_images" / f"{row['source_id']}.png"
        want = eval_transform(32)(Image.open(tmp_path / "prep" / row["path"]).convert("RGB"))
        assert torch.equal(load(raw), want)


def test_eval_refuses_raw_images_for_a_model_trained_on_prepared_ones(second_set, tmp_path):
    from data_pipeline.prepare import prepare_dataset
    from launch.evaluate import check_preprocessing
    from trainer.config import config_from_dict

    trained = {"prepared": {"size": 40, "ben_graham": True}}  # the run's preprocessing.json
    raw = config_from_dict({"data": {"root": str(second_set), "image_size": 32}})
    with pytest.raises(InferenceError, match="raw aptos layout") as e:
        check_preprocessing(raw, trained)
    assert f"metaloss prepare --dataset aptos --src {second_set} --out DIR --size 40 --ben-graham" in str(e.value)
    assert "\n" not in str(e.value)
    prepare_dataset("aptos", second_set, tmp_path / "prep", size=40, workers=1, progress=False)
    check_preprocessing(config_from_dict({"data": {"root": str(tmp_path / "prep"), "image_size": 32}}), trained)
    check_preprocessing(raw, {"prepared": None})  # trained on a raw layout too
    check_preprocessing(raw, None)                # a run from before preprocessing.json: nothing to compare
