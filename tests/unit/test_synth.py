"""Synthetic fundus generator: determinism across worker counts, APTOS class mix, fundus look, grade signal."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from data_pipeline.readers import read_dataset
from data_pipeline.synth import APTOS_COUNTS, generate_synthetic, synthetic_class_counts


def _rows(root: Path) -> list[tuple[str, int]]:
    with open(root / "train.csv", newline="") as f:
        return [(r["id_code"], int(r["diagnosis"])) for r in csv.DictReader(f)]


def _pixels(root: Path, id_code: str) -> np.ndarray:
    return np.asarray(Image.open(root / "train_images" / f"{id_code}.png"))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synth") / "set", n=30, size=96, seed=5, workers=1,
                              progress=False)


def test_identical_bytes_for_any_worker_count(tmp_path):
    one = generate_synthetic(tmp_path / "w1", n=20, size=64, seed=3, workers=1, progress=False)
    two = generate_synthetic(tmp_path / "w2", n=20, size=64, seed=3, workers=2, progress=False)
    assert (one / "train.csv").read_bytes() == (two / "train.csv").read_bytes()
    names = sorted(p.name for p in (one / "train_images").iterdir())
    assert len(names) == 20 and names == sorted(p.name for p in (two / "train_images").iterdir())
    for name in names:
        assert (one / "train_images" / name).read_bytes() == (two / "train_images" / name).read_bytes(), name


def test_another_seed_gives_other_images(tmp_path):
    a = generate_synthetic(tmp_path / "a", n=4, size=48, seed=0, workers=1, progress=False)
    b = generate_synthetic(tmp_path / "b", n=4, size=48, seed=1, workers=1, progress=False)
    assert {i for i, _ in _rows(a)}.isdisjoint({i for i, _ in _rows(b)})
    assert not np.array_equal(_pixels(a, _rows(a)[0][0]), _pixels(b, _rows(b)[0][0]))


def test_class_counts_follow_aptos_proportions():
    assert synthetic_class_counts(3662) == list(APTOS_COUNTS)
    total = sum(APTOS_COUNTS)
    for n in (100, 600, 1000):
        counts = synthetic_class_counts(n)
        assert sum(counts) == n
        for c, ref in zip(counts, APTOS_COUNTS):
            assert abs(c - n * ref / total) < 1
    # Small sets: every class gets 3 (one per split) once n >= 15; below that plain proportions.
    assert synthetic_class_counts(15) == [3, 3, 3, 3, 3]
    assert min(synthetic_class_counts(40)) == 3
    assert synthetic_class_counts(10) == [5, 1, 3, 0, 1]


def test_layout_matches_aptos_and_reads_back(small_set):
    rows = _rows(small_set)
    assert [sum(lbl == k for _, lbl in rows) for k in range(5)] == synthetic_class_counts(30)
    assert all(len(i) == 12 and int(i, 16) >= 0 for i, _ in rows)
    records = read_dataset("aptos", small_set)
    assert [(r.source_id, r.label) for r in records] == rows
    # Atomic writes leave no temp files behind.
    assert sorted(p.name for p in (small_set / "train_images").iterdir()) == sorted(f"{i}.png" for i, _ in rows)


def test_images_look_like_fundus_photographs(small_set):
    for id_code, _ in _rows(small_set):
        img = Image.open(small_set / "train_images" / f"{id_code}.png")
        assert img.mode == "RGB" and img.size == (96, 96)
        a = np.asarray(img).astype(np.int32)
        for corner in (a[:4, :4], a[:4, -4:], a[-4:, :4], a[-4:, -4:]):
            assert corner.max() <= 12, id_code          # black border
        r, g, b = a[36:60, 36:60].reshape(-1, 3).mean(axis=0)
        assert r > g > b and r > 90, (id_code, r, g, b)   # orange-red retina in the middle


def _lesion_pixels(path: Path) -> int:
    """Pixels that look like lesions: yellow (exudates) or much darker red than the local background
    (micro-aneurysms, haemorrhages, tangles). Vessels are only mildly darker and the optic disc is pale, so both
    stay mostly below these thresholds; what they do add is the same for every grade."""
    img = Image.open(path).convert("RGB")
    a = np.asarray(img, dtype=np.float32)
    background = np.asarray(img.filter(ImageFilter.GaussianBlur(img.width / 16)), dtype=np.float32)
    fundus = Image.fromarray(((a.max(-1) > 40) * 255).astype(np.uint8)).filter(ImageFilter.MinFilter(9))
    inside = np.asarray(fundus) > 0
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    yellow = inside & (r > 120) & (g > 0.75 * r) & (b < 0.45 * g)
    dark_red = inside & (r < 0.6 * background[..., 0])
    return int((yellow | dark_red).sum())


def test_lesion_pixels_rise_with_grade(tmp_path):
    root = generate_synthetic(tmp_path / "grades", n=200, size=128, seed=0, progress=False)
    per_grade: dict[int, list[int]] = {k: [] for k in range(5)}
    for id_code, label in _rows(root):
        per_grade[label].append(_lesion_pixels(root / "train_images" / f"{id_code}.png"))
    means = [float(np.mean(per_grade[k])) for k in range(5)]
    assert all(lo < hi for lo, hi in zip(means, means[1:])), means
    # ... yet adjacent grades overlap (the task is not trivially separable): the busiest grade-1 image has more
    # lesion pixels than the quietest grade-2 image.
    assert max(per_grade[1]) > min(per_grade[2])


@pytest.mark.parametrize("kwargs, match", [({"n": 0}, "n must be"), ({"size": 16}, "size must be"),
                                           ({"workers": 0}, "workers must be"), ({"seed": -1}, "seed must be")])
def test_bad_arguments_are_refused(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_synthetic(tmp_path / "x", **{"n": 4, "size": 48, "progress": False, **kwargs})
