"""Dataset readers: every layout parses, and validation names EVERY bad row (line, id, reason)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from data_pipeline.readers import BadRow, detect_format, read_dataset, read_dataset_report
from data_pipeline.records import DataError


def _img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.new("RGB", (8, 8), (200, 80, 30)).save(path, format=fmt)
    return path


def _aptos(root: Path, rows: list[tuple[str, str]], images=None, *, text: str | None = None) -> Path:
    """APTOS layout; `images` = ids that get a PNG (default: every id in rows)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in (images if images is not None else [r[0] for r in rows]):
        _img(root / "train_images" / f"{i}.png")
    (root / "train_images").mkdir(exist_ok=True)
    (root / "train.csv").write_text(text if text is not None else
                                    "id_code,diagnosis\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return root


# ------------------------------------------------------------------------------------------------------ APTOS
def test_aptos_good_layout_in_file_order(tmp_path):
    root = _aptos(tmp_path / "aptos", [("c3", "2"), ("a1", "0"), ("b2", "4")])
    recs = read_dataset("aptos", root)
    assert [(r.source_id, r.label) for r in recs] == [("c3", 2), ("a1", 0), ("b2", 4)]
    assert recs[0].path == str((root / "train_images" / "c3.png").resolve())
    assert all(Path(r.path).is_absolute() for r in recs)


def test_every_bad_row_is_named_with_line_id_and_reason(tmp_path):
    rows = [("ok1", "0"), ("bad7", "7"), ("ok2", "1"), ("two", "two"), ("nofile", "2"), ("frac", "2.5"),
            ("empty", ""), ("ok1", "3")]
    root = _aptos(tmp_path / "aptos", rows, images=["ok1", "bad7", "ok2", "two", "frac", "empty"])
    with pytest.raises(DataError) as exc:
        read_dataset("aptos", root)
    msg = str(exc.value)
    assert msg.startswith(f"{root / 'train.csv'}: 6 bad rows:")
    expected = {3: ("bad7", "label 7 outside 0..4"), 5: ("two", "label 'two' is not an integer"),
                6: ("nofile", "image not found"), 7: ("frac", "label '2.5' is not an integer"),
                8: ("empty", "empty label"), 9: ("ok1", "duplicate id (first seen on line 2)")}
    for line, (source_id, reason) in expected.items():
        assert f"line {line} (id '{source_id}'): {reason}" in msg
    assert "line 2 " not in msg and "line 4 " not in msg   # good rows are not listed


def test_report_returns_good_records_and_all_bad_rows(tmp_path):
    root = _aptos(tmp_path / "aptos", [("a", "0"), ("b", "9"), ("c", "1"), ("d", "x")])
    with pytest.raises(DataError, match="2 bad rows"):
        read_dataset_report("aptos", root)
    recs, bad = read_dataset_report("aptos", root, skip_bad=True)
    assert [r.source_id for r in recs] == ["a", "c"]
    assert [(b.line, b.source_id) for b in bad] == [(3, "b"), (5, "d")]
    assert all(isinstance(b, BadRow) and b.file == str(root / "train.csv") for b in bad)


def test_skip_bad_returns_good_rows_and_warns_once_with_the_list(tmp_path, caplog):
    root = _aptos(tmp_path / "aptos", [("a", "0"), ("b", "9"), ("c", "1"), ("d", "")], images=["a", "b", "c"])
    with caplog.at_level(logging.WARNING, logger="data_pipeline.readers"):
        recs = read_dataset("aptos", root, skip_bad=True)
    assert [r.source_id for r in recs] == ["a", "c"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "line 3 (id 'b')" in text and "line 5 (id 'd')" in text


def test_skip_bad_with_no_good_row_left_is_still_an_error(tmp_path):
    root = _aptos(tmp_path / "aptos", [("a", "9"), ("b", "x")])
    with pytest.raises(DataError, match="no usable rows(.|\n)*line 2(.|\n)*line 3"):
        read_dataset("aptos", root, skip_bad=True)


def test_bad_row_list_is_capped_but_counts_all(tmp_path):
    root = _aptos(tmp_path / "aptos", [("ok", "0")] + [(f"x{i}", "9") for i in range(60)])
    with pytest.raises(DataError) as exc:
        read_dataset("aptos", root)
    msg = str(exc.value)
    assert "60 bad rows" in msg and "... and 10 more" in msg
    assert msg.count("label 9 outside") == 50


def test_bom_crlf_whitespace_and_extra_columns(tmp_path):
    text = "\ufeff id_code , diagnosis ,notes\r\n a , 1 ,x\r\n\r\nb,\t3,y\r\n"
    root = _aptos(tmp_path / "aptos", [], images=["a", "b"], text=text)
    recs = read_dataset("aptos", root)
    assert [(r.source_id, r.label) for r in recs] == [("a", 1), ("b", 3)]


def test_integral_float_labels_are_accepted(tmp_path):
    root = _aptos(tmp_path / "aptos", [("a", "2.0")])
    assert read_dataset("aptos", root)[0].label == 2


@pytest.mark.parametrize("text, match", [
    ("", "empty CSV"),
    ("id_code,diagnosis\n", "no data rows"),
    ("id_code,grade\na,1\n", "missing required column.*'diagnosis'"),
])
def test_file_level_problems_name_the_csv(tmp_path, text, match):
    root = _aptos(tmp_path / "aptos", [], images=["a"], text=text)
    with pytest.raises(DataError, match=match) as exc:
        read_dataset("aptos", root)
    assert str(root / "train.csv") in str(exc.value)


def test_unreadable_csv_is_a_data_error(tmp_path):
    root = _aptos(tmp_path / "aptos", [], images=["a"], text="")
    (root / "train.csv").write_bytes(b"id_code,diagnosis\n\xff\xfe\x00a,1\n")
    with pytest.raises(DataError, match="unreadable CSV"):
        read_dataset("aptos", root)


def test_num_classes_sets_the_label_range(tmp_path):
    root = _aptos(tmp_path / "aptos", [("a", "0"), ("b", "3")])
    with pytest.raises(DataError, match=r"line 3 \(id 'b'\): label 3 outside 0..2"):
        read_dataset("aptos", root, num_classes=3)


def test_missing_root_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_dataset("aptos", tmp_path / "nope")
    with pytest.raises(DataError, match="unknown dataset format 'kaggle'"):
        read_dataset("kaggle", tmp_path)


# ---------------------------------------------------------------------------------------------------- EyePACS
@pytest.mark.parametrize("folder", ["train", ".", "train_images"])
def test_eyepacs_finds_the_image_folder(tmp_path, folder):
    root = tmp_path / "eyepacs"
    for name in ("10_left", "10_right"):
        _img(root / folder / f"{name}.jpeg")
    (root / "trainLabels.csv").write_text("image,level\n10_left,0\n10_right,3\n")
    recs = read_dataset("eyepacs", root)
    assert [(r.source_id, r.label) for r in recs] == [("10_left", 0), ("10_right", 3)]
    assert recs[1].path == str((root / folder / "10_right.jpeg").resolve())


def test_eyepacs_without_any_image_names_the_folders_searched(tmp_path):
    root = tmp_path / "eyepacs"
    root.mkdir()
    (root / "trainLabels.csv").write_text("image,level\n10_left,0\n")
    with pytest.raises(DataError, match="10_left.jpeg.*train"):
        read_dataset("eyepacs", root)


# -------------------------------------------------------------------------------------------------- generic CSV
def test_csv_relative_paths_resolve_against_the_csv_folder(tmp_path):
    root = tmp_path / "mine"
    _img(root / "imgs" / "a.png")
    absolute = _img(tmp_path / "elsewhere" / "b.jpg")
    (root / "labels.csv").write_text(f"path,label\nimgs/a.png,1\n{absolute},0\n")
    recs = read_dataset("csv", root)
    assert [r.path for r in recs] == [str((root / "imgs" / "a.png").resolve()), str(absolute)]
    assert [r.source_id for r in recs] == ["imgs/a.png", str(absolute)]
    # A CSV path may be given as the root, with custom column names.
    (root / "other.csv").write_text("file,grade,extra\nimgs/a.png,4,z\n")
    recs = read_dataset("csv", root / "other.csv", path_col="file", label_col="grade")
    assert [(r.source_id, r.label) for r in recs] == [("imgs/a.png", 4)]


def test_csv_with_wrong_column_names_names_the_expected_column(tmp_path):
    root = tmp_path / "mine"
    _img(root / "a.png")
    (root / "labels.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(DataError, match="missing required column.*'path'"):
        read_dataset("csv", root)


# --------------------------------------------------------------------------------------------------------- DDR
def _ddr(root: Path, files: dict[str, str]) -> Path:
    for split, text in files.items():
        (root / "DR_grading").mkdir(parents=True, exist_ok=True)
        (root / "DR_grading" / f"{split}.txt").write_text(text)
        for line in text.splitlines():
            if line.split():
                _img(root / "DR_grading" / split / line.split()[0])
    return root


def test_ddr_reads_three_files_and_excludes_ungradable(tmp_path, caplog):
    root = _ddr(tmp_path / "ddr", {"train": "t1.jpg 0\nt2.jpg 5\nt3.jpg 2\n", "valid": "v1.jpg 4\n",
                                   "test": "s1.jpg 5\ns2.jpg 1\n"})
    with caplog.at_level(logging.INFO, logger="data_pipeline.readers"):
        recs = read_dataset("ddr", root)
    assert [(r.source_id, r.label) for r in recs] == [("t1.jpg", 0), ("t3.jpg", 2), ("v1.jpg", 4), ("s2.jpg", 1)]
    assert recs[2].path == str((root / "DR_grading" / "valid" / "v1.jpg").resolve())
    assert any("excluded 2 ungradable" in r.getMessage() for r in caplog.records)


def test_ddr_bad_lines_name_their_own_file(tmp_path):
    root = _ddr(tmp_path / "ddr", {"train": "t1.jpg 0\n", "valid": "v1.jpg 1\nv2.jpg 9\nv3.jpg\n"})
    with pytest.raises(DataError) as exc:
        read_dataset("ddr", root)
    msg = str(exc.value)
    assert f"{root / 'DR_grading' / 'valid.txt'}: 2 bad rows" in msg
    assert "line 2 (id 'v2.jpg'): label 9 outside 0..4" in msg
    assert "line 3 (id 'v3.jpg')" in msg and "expected 'name label'" in msg


# ------------------------------------------------------------------------------------------------------- IDRiD
def test_idrid_header_spaces_nested_images_and_train_test_name_clash(tmp_path):
    root = tmp_path / "idrid" / "B. Disease Grading"
    for split in ("a. Training Set", "b. Testing Set"):
        _img(root / "1. Original Images" / split / "IDRiD_001.jpg")
    _img(root / "1. Original Images" / "a. Training Set" / "IDRiD_002.jpg")
    gt = root / "2. Groundtruths"
    gt.mkdir(parents=True)
    (gt / "a. IDRiD_Disease Grading_Training Labels.csv").write_text(
        "Image name,Retinopathy grade ,Risk of macular edema \nIDRiD_001,3,2\nIDRiD_002,0,0\n,,\n")
    (gt / "b. IDRiD_Disease Grading_Testing Labels.csv").write_text(
        "Image name,Retinopathy grade,Risk of macular edema\nIDRiD_001,4,2\n")
    assert detect_format(tmp_path / "idrid") == "idrid"
    recs = read_dataset("idrid", tmp_path / "idrid")
    assert [(r.source_id, r.label) for r in recs] == [("IDRiD_001", 3), ("IDRiD_002", 0)]
    # IDRiD_001.jpg exists in both sets: the training CSV takes the training image.
    assert "a. Training Set" in recs[0].path


def test_idrid_missing_image_is_a_bad_row(tmp_path):
    root = tmp_path / "idrid"
    _img(root / "imgs" / "IDRiD_001.jpg")
    (root / "labels.csv").write_text(" Image name ,Retinopathy grade\nIDRiD_001,1\nIDRiD_077,2\n")
    with pytest.raises(DataError, match=r"line 3 \(id 'IDRiD_077'\): image 'IDRiD_077' not found"):
        read_dataset("idrid", root)


# -------------------------------------------------------------------------------------------------- Messidor-2
def test_messidor2_excludes_ungradable_and_finds_images_under_IMAGES(tmp_path):
    root = tmp_path / "messidor"
    _img(root / "IMAGES" / "20051020_43808_0100_PP.png")
    _img(root / "IMAGES" / "IM002385.JPG")
    (root / "messidor_data.csv").write_text(
        "image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable\n"
        "20051020_43808_0100_PP.png,2.0,0,1\nIM002385.JPG,0,0,1\nIM009999.JPG,,,0\n")
    assert detect_format(root) == "messidor2"
    recs = read_dataset("messidor2", root)
    assert [(r.source_id, r.label) for r in recs] == [("20051020_43808_0100_PP.png", 2), ("IM002385.JPG", 0)]
    assert recs[1].path == str((root / "IMAGES" / "IM002385.JPG").resolve())


# --------------------------------------------------------------------------------------------------- prepared
def test_prepared_manifest(tmp_path):
    root = tmp_path / "prep"
    _img(root / "images" / "x.jpg")
    (root / "manifest.csv").write_text("path,label,source_id\nimages/x.jpg,3,orig_x\n")
    recs = read_dataset("prepared", root)
    assert [(r.path, r.label, r.source_id) for r in recs] == [(str((root / "images" / "x.jpg").resolve()), 3,
                                                               "orig_x")]


# ----------------------------------------------------------------------------------------------- auto-detection
def test_detect_format_for_each_layout(tmp_path):
    layouts = {"aptos": "train.csv", "eyepacs": "trainLabels.csv", "prepared": "manifest.csv",
               "messidor2": "messidor_data.csv", "csv": "labels.csv"}
    for fmt, name in layouts.items():
        (tmp_path / fmt).mkdir()
        (tmp_path / fmt / name).write_text("x\n")
        assert detect_format(tmp_path / fmt) == fmt
    (tmp_path / "ddr" / "DR_grading").mkdir(parents=True)
    assert detect_format(tmp_path / "ddr") == "ddr"
    assert detect_format(tmp_path / "csv" / "labels.csv") == "csv"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot tell the dataset layout"):
        detect_format(tmp_path / "empty")


def test_auto_format_reads_the_detected_layout(tmp_path):
    root = _aptos(tmp_path / "aptos", [("a", "1")])
    assert [r.source_id for r in read_dataset("auto", root)] == ["a"]
