"""Training on bad input: one error line naming the file, exit 2, no worker or DALI traceback.

Choice, documented: training does NOT skip an undecodable image. Skipping mid-epoch would change the batch count
on one DDP rank (the others would wait for it forever) and silently change the data set between runs; the fix is
one command away -- `metaloss prepare` quarantines the file -- and the message says so. The raw-layout loader
decodes exactly as prepare does, so it refuses exactly the files prepare quarantines and gives converted images
the same pixels.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.support.bad_corpus import LAYOUTS, make_bad_corpus, make_singleton_class
from tests.support.cli import run_cli, tiny_overrides
from data_pipeline.records import DataError
from data_pipeline.backends.torch_backend import load_rgb
from launch.errors import user_message


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("metaloss: error:")]


def _train(data_dir, out_dir, name, *extra):
    return run_cli("-m", "launch.cli", "train", "configs/demo.yaml",
                   *tiny_overrides(data_dir, out_dir, name, "train.epochs=1", "data.num_workers=2", *extra),
                   "--quiet", check=False)


@pytest.fixture(scope="module")
def aptos_corpus(tmp_path_factory):
    return make_bad_corpus(tmp_path_factory.mktemp("bad") / "aptos", "aptos")


# ------------------------------------------------------------------------------------------------ the loader
@pytest.mark.parametrize("layout", LAYOUTS)
def test_raw_loader_refuses_what_prepare_quarantines_and_converts_the_same_way(tmp_path, layout):
    exp = make_bad_corpus(tmp_path / layout, layout)
    for bad in exp.bad_images:
        with pytest.raises(DataError) as info:
            load_rgb(str(bad.path))
        msg = str(info.value)
        assert msg.startswith(f"{bad.path}: cannot read image (") and bad.reason in msg, msg
    for source_id, rgb in exp.converted.items():
        img = load_rgb(str(exp.files[source_id]))
        assert img.mode == "RGB"
        # no resize, no JPEG: the centre pixel is exactly the hand-computed value (16-bit -> high byte, alpha over
        # black, CMYK multiplied out) -- Pillow's plain convert("RGB") would give white for the 16-bit scans
        centre = np.asarray(img)[img.size[1] // 2, img.size[0] // 2]
        assert tuple(int(v) for v in centre) == rgb, source_id


class _Unreadable(torch.utils.data.Dataset):
    def __init__(self, path: str):
        self.path = path

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return load_rgb(self.path)


def test_worker_error_reaches_the_user_without_the_worker_traceback(tmp_path):
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"")
    with pytest.raises(DataError) as info:
        next(iter(DataLoader(_Unreadable(str(bad)), num_workers=1)))
    assert "Traceback" in str(info.value)   # what torch hands back: the worker's traceback inside the message
    assert user_message(info.value) == (f"{bad}: cannot read image (empty file (0 bytes)); run `metaloss prepare` "
                                        f"to quarantine bad files")


def test_user_message_keeps_a_multi_line_original_message():
    wrapped = DataError("Caught DataError in DataLoader worker process 3.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in f\n    raise DataError(m)\n"
                        "data_pipeline.records.DataError: a.csv: 2 bad rows:\n  line 2 (id 'a'): empty label\n")
    assert user_message(wrapped) == "a.csv: 2 bad rows:\n  line 2 (id 'a'): empty label"
    assert user_message(DataError("plain: message")) == "plain: message"


# ------------------------------------------------------------------------------------------ `metaloss train`
def test_train_refuses_the_bad_corpus_listing_every_bad_row(aptos_corpus, tmp_path):
    exp = aptos_corpus
    proc = _train(exp.src, tmp_path / "runs", "rows")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert _error_lines(proc.stderr) == [f"metaloss: error: {exp.label_file}: {len(exp.bad_rows)} bad rows:"]
    for bad in exp.bad_rows:
        assert f"line {bad.line} (id {bad.source_id!r}): " in proc.stderr


@pytest.mark.slow
def test_train_with_skip_bad_stops_on_an_undecodable_file_naming_it(aptos_corpus, tmp_path):
    exp = aptos_corpus
    proc = _train(exp.src, tmp_path / "runs", "skip", "data.skip_bad=true")   # 2 DataLoader worker processes
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = _error_lines(proc.stderr)
    named = [p for p in exp.bad_images if f"{p.path}: cannot read image (" in line and p.reason in line]
    assert len(named) == 1 and "metaloss prepare" in line, line


@pytest.mark.slow
def test_dali_on_a_damaged_prepared_image_is_one_line_exit_2(aptos_corpus, tmp_path):
    pytest.importorskip("nvidia.dali")
    prepared = tmp_path / "prepared"
    run_cli("-m", "launch.cli", "prepare", "--dataset", "aptos", "--src", str(aptos_corpus.src), "--out",
            str(prepared), "--size", "48", "--workers", "2", "--quiet")
    victim = prepared / "images" / "good_05.jpg"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])   # damaged after prepare
    proc = _train(prepared, tmp_path / "runs", "dali", "data.format=prepared", "data.backend=dali")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = _error_lines(proc.stderr)
    assert f"{victim} (" in line and "metaloss prepare" in line, line


def test_train_on_a_class_with_one_sample_names_the_class(tmp_path):
    src = make_singleton_class(tmp_path / "aptos", "aptos", lonely=4)
    proc = _train(src, tmp_path / "runs", "lonely")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = _error_lines(proc.stderr)
    assert "class 4 (4_proliferative) has 1 sample(s)" in line
