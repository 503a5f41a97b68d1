"""Stratified train/meta/test split: proportions, disjointness, determinism, file round trip, resume reuse."""
from __future__ import annotations

import random

import pytest

from data_pipeline.records import DataError
from data_pipeline.splits import (SPLITS, allocate_largest_remainder, load_or_make_splits, make_splits, read_splits,
                                  write_splits)
from tests.support.split_records import CLASS_COUNTS, records_per_class

FRACTIONS = (0.70, 0.15, 0.15)


def _ids(splits) -> dict[str, list[str]]:
    return {s: [r.source_id for r in rs] for s, rs in splits.items()}


def test_each_class_is_split_within_one_sample_of_its_target():
    splits = make_splits(records_per_class(), FRACTIONS, seed=0, num_classes=5)
    assert set(splits) == set(SPLITS)
    for label, n in enumerate(CLASS_COUNTS):
        got = [sum(r.label == label for r in splits[s]) for s in SPLITS]
        assert sum(got) == n
        for count, frac in zip(got, FRACTIONS):
            assert abs(count - n * frac) <= 1, (label, got)


def test_splits_are_disjoint_and_cover_every_record_once():
    records = records_per_class()
    splits = make_splits(records, FRACTIONS, seed=3)
    ids = [r.source_id for s in SPLITS for r in splits[s]]
    assert len(ids) == len(set(ids)) == len(records)
    assert set(ids) == {r.source_id for r in records}
    # Records pass through untouched (path and label stay paired with their id).
    assert {r for s in SPLITS for r in splits[s]} == set(records)


def test_same_seed_same_split_other_seed_different_split():
    a = make_splits(records_per_class(), FRACTIONS, seed=7)
    b = make_splits(records_per_class(), FRACTIONS, seed=7)
    c = make_splits(records_per_class(), FRACTIONS, seed=8)
    assert _ids(a) == _ids(b)
    assert _ids(a) != _ids(c)
    # Still the same sizes: a different seed only changes which images go where.
    assert {s: len(v) for s, v in a.items()} == {s: len(v) for s, v in c.items()}


def test_split_does_not_depend_on_input_order():
    records = records_per_class()
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    assert _ids(make_splits(records, FRACTIONS, seed=2)) == _ids(make_splits(shuffled, FRACTIONS, seed=2))


def test_each_split_is_sorted_by_source_id():
    splits = make_splits(records_per_class(), FRACTIONS, seed=0)
    for s in SPLITS:
        ids = [r.source_id for r in splits[s]]
        assert ids == sorted(ids)


def test_class_of_exactly_three_puts_one_in_each_split():
    splits = make_splits(records_per_class((30, 3, 30, 3, 3)), FRACTIONS, seed=0)
    for label in (1, 3, 4):
        assert [sum(r.label == label for r in splits[s]) for s in SPLITS] == [1, 1, 1]


def test_too_small_class_error_names_class_count_and_empty_split():
    with pytest.raises(DataError) as exc:
        make_splits(records_per_class((30, 10, 30, 2, 10)), FRACTIONS, seed=0)
    msg = str(exc.value)
    assert "3_severe" in msg and "2 sample" in msg
    assert "meta" in msg and "test" in msg and "would have none" in msg


def test_missing_class_is_an_error_too():
    with pytest.raises(DataError, match="4_proliferative.*0 sample"):
        make_splits(records_per_class((30, 10, 30, 10, 0)), FRACTIONS, seed=0)


@pytest.mark.parametrize("fractions", [(0.7, 0.3), (0.7, 0.3, 0.0), (0.5, 0.2, 0.2), (1.2, -0.1, -0.1)])
def test_bad_fractions_are_refused(fractions):
    with pytest.raises(ValueError, match="fractions"):
        make_splits(records_per_class(), fractions)


def test_label_outside_num_classes_is_refused():
    with pytest.raises(DataError, match="outside 0..2"):
        make_splits(records_per_class((5, 5, 5, 5)), FRACTIONS, num_classes=3)


def test_largest_remainder_reproduces_exact_quotas_and_respects_minimum():
    assert allocate_largest_remainder(3662, (1805, 370, 999, 193, 295)) == [1805, 370, 999, 193, 295]
    counts = allocate_largest_remainder(10, (0.70, 0.15, 0.15))
    assert counts == [7, 2, 1]   # remainders .5/.5: the tie goes to the earlier entry
    assert allocate_largest_remainder(3, (0.70, 0.15, 0.15), minimum=1) == [1, 1, 1]
    counts = allocate_largest_remainder(15, (1805, 370, 999, 193, 295), minimum=3)
    assert counts == [3, 3, 3, 3, 3]
    counts = allocate_largest_remainder(40, (1805, 370, 999, 193, 295), minimum=3)
    assert sum(counts) == 40 and min(counts) == 3


def test_write_read_round_trip(tmp_path):
    splits = make_splits(records_per_class(), FRACTIONS, seed=0)
    path = tmp_path / "run" / "splits.csv"
    write_splits(path, splits)
    assert path.read_text().splitlines()[0] == "path,label,source_id,split"
    assert read_splits(path) == splits
    assert [p.name for p in path.parent.iterdir()] == ["splits.csv"]   # no temp file left behind


def test_read_splits_names_every_malformed_row(tmp_path):
    path = tmp_path / "splits.csv"
    path.write_text("path,label,source_id,split\n"
                    "/a.png,0,a,train\n"
                    "/b.png,x,b,train\n"          # line 3: bad label
                    "/c.png,1,c,validation\n"     # line 4: unknown split
                    "/d.png,1,a,meta\n"           # line 5: duplicate id
                    "/e.png,2,e,test\n")
    with pytest.raises(DataError) as exc:
        read_splits(path)
    msg = str(exc.value)
    assert str(path) in msg and "3 bad rows" in msg
    for fragment in ("line 3 (id 'b')", "line 4 (id 'c')", "line 5 (id 'a')", "validation", "duplicate"):
        assert fragment in msg


def test_read_splits_missing_column_or_empty_split(tmp_path):
    path = tmp_path / "splits.csv"
    path.write_text("path,label,source_id\n/a.png,0,a\n")
    with pytest.raises(DataError, match="missing required column.*'split'"):
        read_splits(path)
    path.write_text("path,label,source_id,split\n/a.png,0,a,train\n/b.png,0,b,meta\n")
    with pytest.raises(DataError, match=f"{path}.*test"):
        read_splits(path)


def test_load_or_make_splits_writes_once_then_reuses_unchanged(tmp_path):
    records = records_per_class()
    first = load_or_make_splits(tmp_path, records, FRACTIONS, seed=0, num_classes=5)
    stored = (tmp_path / "splits.csv").read_bytes()
    # A resumed run with another seed (or re-ordered records) must still get the stored split.
    again = load_or_make_splits(tmp_path, list(reversed(records)), FRACTIONS, seed=99, num_classes=5)
    assert again == first
    assert (tmp_path / "splits.csv").read_bytes() == stored
    assert _ids(again) != _ids(make_splits(records, FRACTIONS, seed=99))


def test_load_or_make_splits_refuses_stored_labels_beyond_num_classes(tmp_path):
    load_or_make_splits(tmp_path, records_per_class(), FRACTIONS, seed=0, num_classes=5)
    with pytest.raises(DataError, match="outside 0..2"):
        load_or_make_splits(tmp_path, records_per_class(), FRACTIONS, seed=0, num_classes=3)
