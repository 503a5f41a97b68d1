"""Bad input in every layout (tests/support/bad_corpus.py): the reader names every bad row, `prepare` converts what it can
and quarantines the rest with a reason, nothing ends in a worker traceback, and the rest of the data set is used."""
from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from PIL import Image

from tests.support.bad_corpus import LAYOUTS, make_bad_corpus, make_empty_label_file, make_singleton_class
from tests.support.cli import run_cli
from data_pipeline.readers import read_dataset, read_dataset_report
from data_pipeline.records import DataError
from data_pipeline.splits import make_splits

PREPARE_SIZE = 48
# JPEG q95 of a flat colour is exact in grey and within a level or two in saturated colours (the YCbCr round trip);
# anything wrong in the conversion itself (clipping 16-bit to 255, dropping alpha, ignoring K) is off by >= 20.
JPEG_TOLERANCE = 2


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """One corpus per layout, generated once: the reader tests only read it, prepare writes elsewhere."""
    base = tmp_path_factory.mktemp("bad_corpus")
    return {layout: make_bad_corpus(base / layout, layout) for layout in LAYOUTS}


def _message_line(msg: str, line: int, source_id: str) -> str:
    """The line of a bad-row listing that names (line, id)."""
    hits = [m for m in msg.splitlines() if m.strip().startswith(f"line {line} (id {source_id!r}):")]
    assert len(hits) == 1, f"line {line} (id {source_id!r}) is not named exactly once in:\n{msg}"
    return hits[0]


# ----------------------------------------------------------------------------------------------------- reader
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reader_names_every_bad_row_in_one_error(corpora, layout):
    exp = corpora[layout]
    with pytest.raises(DataError) as info:
        read_dataset(layout, exp.src)
    msg = str(info.value)
    assert msg.startswith(f"{exp.label_file}: {len(exp.bad_rows)} bad rows:")
    for bad in exp.bad_rows:
        assert bad.reason in _message_line(msg, bad.line, bad.source_id)
    if layout == "ddr":   # "name label extra": one reason, the field count -- not also a bogus label complaint
        extra = next(b for b in exp.bad_rows if b.source_id == "extra_cols.jpg")
        assert _message_line(msg, extra.line, extra.source_id).strip() == (
            f"line {extra.line} (id 'extra_cols.jpg'): expected 'name label', got 'extra_cols.jpg 1 left'")
    listed = re.findall(r"^\s+line \d+ \(id '([^']*)'\)", msg, flags=re.M)
    assert len(listed) == len(exp.bad_rows)   # nothing else: BOM, CRLF, extra columns and images are not row errors


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reader_with_skip_bad_keeps_every_other_row_in_file_order(corpora, layout):
    exp = corpora[layout]
    records, bad = read_dataset_report(layout, exp.src, skip_bad=True)
    # the reader does not decode images: undecodable files are prepare's (or the loader's) to find
    undecodable = {p.source_id for p in exp.bad_images}
    assert {r.source_id for r in records} == set(exp.good) | undecodable
    assert len(records) == len(exp.good) + len(undecodable)
    assert all(r.label == exp.good[r.source_id] for r in records if r.source_id in exp.good)
    assert [r.source_id for r in records if r.source_id in exp.good] == list(exp.good)   # file order
    assert [(b.line, b.source_id) for b in bad] == [(p.line, p.source_id) for p in exp.bad_rows]
    assert all(b.file == str(exp.label_file) for b in bad)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("header", [True, False], ids=["header_only", "zero_bytes"])
def test_empty_label_file_is_an_error_naming_it(tmp_path, layout, header):
    label_file = make_empty_label_file(tmp_path / layout, layout, header=header)
    with pytest.raises(DataError) as info:
        read_dataset(layout, tmp_path / layout)
    msg = str(info.value)
    if layout == "idrid" and not header:
        # a 0-byte CSV has no column names, so nothing marks it as IDRiD's: the error names the folder searched
        # and the columns it looked for
        assert str(tmp_path / layout) in msg and "'Image name', 'Retinopathy grade'" in msg
    else:
        assert str(label_file) in msg and "empty" in msg


@pytest.mark.parametrize("layout", ["aptos", "eyepacs", "csv"])
def test_class_with_one_sample_is_a_split_error_naming_the_class(tmp_path, layout):
    records = read_dataset(layout, make_singleton_class(tmp_path / layout, layout, lonely=3))
    assert sorted(r.label for r in records).count(3) == 1
    with pytest.raises(DataError, match=r"class 3 \(3_severe\) has 1 sample\(s\)"):
        make_splits(records)


# ---------------------------------------------------------------------------------------------------- prepare
def _prepare(exp, out, *extra):
    return run_cli("-m", "launch.cli", "prepare", "--dataset", exp.layout, "--src", str(exp.src), "--out", str(out),
                   "--workers", "2", "--size", str(PREPARE_SIZE), "--quiet", *extra, check=False)


def _centre(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB"
        arr = np.asarray(im)
    h, w, _ = arr.shape
    assert min(h, w) == PREPARE_SIZE
    # the middle: JPEG ringing from the RGBA case's transparent border stays near the edges
    return arr[3 * h // 8:5 * h // 8, 3 * w // 8:5 * w // 8].reshape(-1, 3).astype(int)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prepare_converts_what_it_can_and_quarantines_the_rest_with_reasons(corpora, tmp_path, layout):
    exp = corpora[layout]
    out = tmp_path / "prepared"
    proc = _prepare(exp, out)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr

    with open(out / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    assert {r["source_id"]: int(r["label"]) for r in manifest} == exp.good
    assert len(manifest) == len(exp.good)
    for row in manifest:
        _centre(out / row["path"])   # every output is 8-bit RGB at the requested size
    for source_id, rgb in exp.converted.items():
        path = out / next(r["path"] for r in manifest if r["source_id"] == source_id)
        err = np.abs(_centre(path) - np.array(rgb)).max()
        assert err <= JPEG_TOLERANCE, f"{source_id}: centre differs from {rgb} by {err}"

    report = json.loads((out / "prepare_report.json").read_text())
    quarantined = report["quarantined"]
    assert len(quarantined) == len(exp.bad_images) + len(exp.bad_rows) == report["counts"]["quarantined"]
    for bad in exp.bad_images:
        entry = next(q for q in quarantined if q["source_id"] == bad.source_id)
        assert entry["file"] == str(bad.path) and bad.reason in entry["reason"], entry
    for bad in exp.bad_rows:
        entry = next(q for q in quarantined if q["file"] == f"{exp.label_file}:{bad.line}")
        assert entry["source_id"] == bad.source_id and bad.reason in entry["reason"], entry
    assert report["counts"]["written"] == len(exp.good)
    assert sum(report["per_class"].values()) == len(exp.good)


def test_prepared_output_of_the_bad_corpus_reads_as_a_clean_data_set(corpora, tmp_path):
    exp = corpora["aptos"]
    out = tmp_path / "prepared"
    assert _prepare(exp, out).returncode == 0
    records = read_dataset("prepared", out)   # strict: not one bad row left
    assert {r.source_id for r in records} == set(exp.good)
    splits = make_splits(records)
    assert all({r.label for r in splits[s]} == set(range(5)) for s in splits)


@pytest.mark.parametrize("flag, value", [("--size", "10"), ("--workers", "0"), ("--num-classes", "1")])
def test_bad_prepare_arguments_are_one_line_errors(corpora, tmp_path, flag, value):
    proc = run_cli("-m", "launch.cli", "prepare", "--dataset", "aptos", "--src", str(corpora["aptos"].src),
                   "--out", str(tmp_path / "out"), flag, value, "--quiet", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"metaloss: error: {flag} must be >= "
                                                f"{ {'--size': 32, '--workers': 1, '--num-classes': 2}[flag]}, "
                                                f"got {value}"]
    assert not (tmp_path / "out").exists()   # refused before anything was written


@pytest.mark.parametrize("layout", ["aptos", "ddr"])
def test_prepare_on_an_empty_label_file_is_one_line_naming_it(tmp_path, layout):
    label_file = make_empty_label_file(tmp_path / layout, layout)
    proc = run_cli("-m", "launch.cli", "prepare", "--dataset", layout, "--src", str(tmp_path / layout), "--out",
                   str(tmp_path / "out"), "--quiet", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"metaloss: error: {label_file}: empty")
