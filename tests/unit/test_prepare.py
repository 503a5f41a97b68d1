"""`prepare`: raw APTOS layout with every kind of bad file -> manifest + quarantine report; atomic, resumable."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data_pipeline.prepare import (MANIFEST_FILE, REPORT_FILE, STATE_FILE, load_state, output_name,
                                   prepare_dataset)
from data_pipeline.readers import read_dataset
from data_pipeline.records import DataError

SIZE = 48


def _fundus(w: int, h: int, color=(170, 80, 40)) -> Image.Image:
    img = Image.new("RGB", (w, h))
    ImageDraw.Draw(img).ellipse((w * 0.1, h * 0.05, w * 0.9, h * 0.95), fill=color)
    return img


def _write_aptos(root, rows: list[tuple[str, str]]) -> None:
    (root / "train_images").mkdir(parents=True, exist_ok=True)
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id_code", "diagnosis"])
        w.writerows(rows)


@pytest.fixture
def raw(tmp_path):
    """An APTOS layout: 6 good images in assorted modes, 6 unusable files, 2 rows the reader rejects."""
    root = tmp_path / "raw"
    img_dir = root / "train_images"
    _write_aptos(root, [])
    good = {
        "rgb0": _fundus(120, 90),
        "rgb1": _fundus(100, 100, (200, 120, 60)),
        "grey": _fundus(90, 90).convert("L"),
        "rgba": _fundus(80, 80).convert("RGBA"),
        "pal": _fundus(80, 80).convert("P", palette=Image.Palette.ADAPTIVE),
        "g16": Image.fromarray((np.asarray(_fundus(80, 80).convert("L"), dtype=np.uint16) * 257)),
    }
    for name, img in good.items():
        img.save(img_dir / f"{name}.png")
    _fundus(96, 96).convert("CMYK").save(img_dir / "cmyk.jpg", quality=95)
    (img_dir / "empty.png").write_bytes(b"")
    (img_dir / "text.png").write_text("this is not a PNG\n")
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8))
    noisy.save(img_dir / "full.png")
    data = (img_dir / "full.png").read_bytes()
    (img_dir / "trunc.png").write_bytes(data[: len(data) // 2])
    noisy.save(img_dir / "full.jpg", quality=90)
    data = (img_dir / "full.jpg").read_bytes()
    (img_dir / "trunc.jpg").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (10, 10), (90, 40, 20)).save(img_dir / "tiny.png")
    rows = [("rgb0", "0"), ("rgb1", "4"), ("grey", "1"), ("rgba", "2"), ("pal", "0"), ("g16", "3"),
            ("cmyk.jpg", "2"), ("empty", "0"), ("text", "1"), ("trunc", "0"), ("trunc.jpg", "0"), ("tiny", "1"),
            ("nofile", "0"), ("rgb0_bad_label", "9")]
    _write_aptos(root, rows)
    return root


EXPECTED_REASONS = {"empty": "empty file", "text": "not a recognised image", "trunc": "truncated",
                    "trunc.jpg": "truncated", "tiny": "too small"}


def test_prepare_converts_good_images_and_quarantines_the_rest(raw, tmp_path):
    out = tmp_path / "out"
    report = prepare_dataset("aptos", raw, out, size=SIZE, workers=2, progress=False)
    assert report["counts"] == {"total": 14, "written": 7, "skipped_existing": 0, "quarantined": 7}
    reasons = {q["source_id"]: q["reason"] for q in report["quarantined"]}
    for sid, words in EXPECTED_REASONS.items():
        assert words in reasons[sid], (sid, reasons[sid])
    assert "not found" in reasons["nofile"] and "outside 0..4" in reasons["rgb0_bad_label"]
    assert report["per_class"] == {"0_none": 2, "1_mild": 1, "2_moderate": 2, "3_severe": 1, "4_proliferative": 1}
    assert report["workers"] == 2 and report["size"] == SIZE and report["img_per_s"] > 0
    assert json.loads((out / REPORT_FILE).read_text()) == report

    records = read_dataset("prepared", out)   # the output is a valid `prepared` data set
    assert sorted(r.source_id for r in records) == sorted(["rgb0", "rgb1", "grey", "rgba", "pal", "g16", "cmyk.jpg"])
    for r in records:
        with Image.open(r.path) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and min(im.size) == SIZE
    grey = np.asarray(Image.open(out / "images" / "grey.jpg")).astype(int)
    assert np.abs(grey[..., 0] - grey[..., 2]).max() <= 3            # grey stays grey (JPEG chroma rounding)
    g16 = np.asarray(Image.open(out / "images" / "g16.jpg")).astype(int)
    assert abs(g16.mean() - grey.mean()) < 3                           # 16-bit x257 scaled back, not clipped white
    assert not list((out / "images").glob(".*"))                       # no temp files left behind


def test_rerun_skips_verified_outputs_and_redoes_damaged_ones(raw, tmp_path):
    out = tmp_path / "out"
    prepare_dataset("aptos", raw, out, size=SIZE, workers=1, progress=False)
    manifest = (out / MANIFEST_FILE).read_text()
    again = prepare_dataset("aptos", raw, out, size=SIZE, workers=2, progress=False)
    assert again["counts"]["written"] == 0 and again["counts"]["skipped_existing"] == 7
    assert (out / MANIFEST_FILE).read_text() == manifest

    (out / "images" / "rgb0.jpg").unlink()                              # missing output
    (out / "images" / "rgb1.jpg").write_bytes(b"\xff\xd8 half a jpeg")  # damaged output (sha1 mismatch)
    third = prepare_dataset("aptos", raw, out, size=SIZE, workers=1, progress=False)
    assert third["counts"]["written"] == 2 and third["counts"]["skipped_existing"] == 5
    assert min(Image.open(out / "images" / "rgb1.jpg").size) == SIZE

    bigger = prepare_dataset("aptos", raw, out, size=SIZE + 16, workers=1, progress=False)
    assert bigger["counts"]["written"] == 7                              # new parameters: everything redone
    assert min(Image.open(out / "images" / "rgb1.jpg").size) == SIZE + 16


def test_changed_source_is_redone(raw, tmp_path):
    out = tmp_path / "out"
    prepare_dataset("aptos", raw, out, size=SIZE, workers=1, progress=False)
    _fundus(140, 100, (90, 200, 90)).save(raw / "train_images" / "rgb0.png")
    report = prepare_dataset("aptos", raw, out, size=SIZE, workers=1, progress=False)
    assert report["counts"]["written"] == 1
    assert Image.open(out / "images" / "rgb0.jpg").getpixel((36, 24))[1] > 150   # the new, green image


def test_resume_after_a_kill_ignores_torn_state_and_temp_files(raw, tmp_path):
    out = tmp_path / "out"
    prepare_dataset("aptos", raw, out, size=SIZE, workers=1, progress=False)
    state_path = out / STATE_FILE
    lines = state_path.read_text().splitlines()
    # simulate a kill: only 3 state lines made it, the 4th was torn mid-write, and a temp image was left
    state_path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    (out / "images" / ".rgb1.jpg.abc.tmp").write_bytes(b"partial")
    (out / MANIFEST_FILE).unlink()
    assert len(load_state(out)) == 3
    report = prepare_dataset("aptos", raw, out, size=SIZE, workers=2, progress=False)
    assert report["counts"]["skipped_existing"] == 3 and report["counts"]["written"] == 4
    assert len(read_dataset("prepared", out)) == 7
    assert len(state_path.read_text().splitlines()) == 7                  # compacted to the manifest


def test_state_lines_appended_after_a_torn_line_stay_readable(raw, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / STATE_FILE).write_text('{"source_id": "rgb0", "by')           # torn, no newline
    import data_pipeline.prepare as prep
    monkeypatch.setattr(prep, "_finish", lambda *a, **k: None)            # stop before compaction (a 2nd kill)
    prepare_dataset("aptos", raw, out, size=SIZE, workers=1, progress=False)
    assert len(load_state(out)) == 7


def test_ben_graham_option_changes_output(raw, tmp_path):
    plain = prepare_dataset("aptos", raw, tmp_path / "plain", size=SIZE, workers=1, progress=False)
    ben = prepare_dataset("aptos", raw, tmp_path / "ben", size=SIZE, workers=1, progress=False, ben_graham=True)
    assert ben["ben_graham"] and not plain["ben_graham"]
    corner = np.asarray(Image.open(tmp_path / "ben" / "images" / "rgb1.jpg"))[1, 1]
    assert np.abs(corner.astype(int) - 128).max() <= 4                  # outside the mask: neutral grey


def test_nothing_usable_is_a_clear_error_with_report(tmp_path):
    root = tmp_path / "raw"
    _write_aptos(root, [("a", "0"), ("b", "1")])
    (root / "train_images" / "a.png").write_bytes(b"")
    (root / "train_images" / "b.png").write_text("nope")
    with pytest.raises(DataError, match="no image could be prepared"):
        prepare_dataset("aptos", root, tmp_path / "out", size=SIZE, workers=1, progress=False)
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text())["counts"]["quarantined"] == 2
    assert not (tmp_path / "out" / MANIFEST_FILE).exists()


def test_output_names_are_safe_and_unique():
    assert output_name("0a1b2c") == "0a1b2c.jpg"
    odd = [output_name(s) for s in ("imgs/a b.png", "imgs_a_b.png", "../x", ".hidden")]
    assert all("/" not in n and not n.startswith(".") for n in odd)
    assert len(set(odd)) == len(odd)


def test_bad_arguments(raw, tmp_path):
    with pytest.raises(ValueError, match="size"):
        prepare_dataset("aptos", raw, tmp_path / "o", size=8, progress=False)
    with pytest.raises(ValueError, match="workers"):
        prepare_dataset("aptos", raw, tmp_path / "o", workers=0, progress=False)


def test_worker_turns_unexpected_errors_into_quarantine_records(raw, tmp_path, monkeypatch):
    import data_pipeline.prepare as prep

    def boom(*args, **kwargs):
        raise MemoryError("simulated")
    monkeypatch.setattr(prep, "prepare_image", boom)
    task = {"source_id": "rgb0", "src": str(raw / "train_images" / "rgb0.png"), "out_dir": str(tmp_path),
            "name": "rgb0.jpg", "params": {"size": SIZE, "ben_graham": False}, "expect": None}
    result = prep.process_one(task)
    assert result["status"] == "quarantined" and result["reason"] == "MemoryError: simulated"
