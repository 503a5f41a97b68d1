"""Stratified train / meta [/ select] / test split, its CSV file, and resume-safe reuse of an existing split.

Three fractions give train / meta / test; four give train / meta / select / test. The select split is one no
method trains on (meta-reweighting fits φ on the meta split every step), so settings chosen by its score are
out-of-sample for every method alike (see docs/RESULTS.md, "Protocol").

Stratified per class so the rare grades (APTOS: 193 severe of 3,662) land in every split -- the meta-net's whole
job is to weigh them, and a meta split without them would teach it nothing. Each class is shuffled by its own
Generator seeded with (seed, class), so adding images of one class never reshuffles another.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from common.atomic import atomic_write
from data_pipeline.readers import BadRow, format_bad_rows, parse_int, read_csv_table
from data_pipeline.records import DataError, Record, class_names

log = logging.getLogger(__name__)

SPLITS = ("train", "meta", "test")
SPLITS_WITH_SELECT = ("train", "meta", "select", "test")
ALL_SPLITS = SPLITS_WITH_SELECT  # every name a splits.csv may hold, in file order
EVAL_SPLITS = ("meta", "select", "test")  # the splits the backends build eval streams for, when present
SPLITS_FILE = "splits.csv"


def split_names(n_fractions: int) -> tuple[str, ...]:
    """The split names for 3 (train, meta, test) or 4 (train, meta, select, test) fractions."""
    return SPLITS_WITH_SELECT if n_fractions == 4 else SPLITS


def allocate_largest_remainder(total: int, fractions: Sequence[float], minimum: int = 0) -> list[int]:
    """Integer counts summing to `total`, each within 1 of total*fraction (largest-remainder rounding), then raised
    to `minimum` where possible by taking from the counts that sit most above their quota. Ties go to the earlier
    entry, so the result is deterministic."""
    fr = np.asarray(fractions, dtype=np.float64)
    quota = total * fr / fr.sum()
    counts = np.floor(quota).astype(np.int64)
    order = sorted(range(len(fr)), key=lambda j: (-(quota[j] - counts[j]), j))
    for j in order[: total - int(counts.sum())]:
        counts[j] += 1
    if minimum * len(fr) <= total:
        for j in range(len(fr)):
            while counts[j] < minimum:
                donors = [d for d in range(len(fr)) if counts[d] > minimum]
                donor = max(donors, key=lambda d: (counts[d] - quota[d], -d))
                counts[donor] -= 1
                counts[j] += 1
    return [int(c) for c in counts]


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    if len(fractions) not in (3, 4) or any(not f > 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be 3 (train, meta, test) or 4 (train, meta, select, test) positive "
                         f"numbers summing to 1, got {list(fractions)}")
    return tuple(float(f) for f in fractions)


def _sort_key(r: Record) -> tuple[str, str]:
    return (r.source_id, r.path)


def make_splits(records: Sequence[Record], fractions: Sequence[float] = (0.70, 0.15, 0.15), seed: int = 0,
                num_classes: int = 5) -> dict[str, list[Record]]:
    """Deterministic, disjoint, covering stratified split; every class in every split; each split sorted by
    source_id (shuffling is the loaders' job, and a stable order makes splits.csv diff-able)."""
    fractions = _check_fractions(fractions)
    split_list = split_names(len(fractions))
    names = class_names(num_classes)
    by_class: list[list[Record]] = [[] for _ in range(num_classes)]
    for r in records:
        if not 0 <= r.label < num_classes:
            raise DataError(f"record {r.source_id!r} has label {r.label} outside 0..{num_classes - 1}")
        by_class[r.label].append(r)
    for k, members in enumerate(by_class):
        if len(members) < len(split_list):
            plain = allocate_largest_remainder(len(members), fractions)
            empty = [s for s, c in zip(split_list, plain) if c == 0]
            raise DataError(f"class {k} ({names[k]}) has {len(members)} sample(s); at least {len(split_list)} are "
                            f"needed so that {', '.join(split_list)} each get one ({' and '.join(empty)} would have "
                            "none)")
    out: dict[str, list[Record]] = {s: [] for s in split_list}
    for k, members in enumerate(by_class):
        # Sort first: the split must not depend on the order the reader happened to return.
        members = sorted(members, key=_sort_key)
        perm = np.random.default_rng([seed, k]).permutation(len(members))
        counts = allocate_largest_remainder(len(members), fractions, minimum=1)
        start = 0
        for split, count in zip(split_list, counts):
            out[split].extend(members[i] for i in perm[start:start + count])
            start += count
    for split in split_list:
        out[split].sort(key=_sort_key)
    return out


def subsample_train(splits: dict[str, list[Record]], fraction: float, seed: int,
                    num_classes: int) -> dict[str, list[Record]]:
    """Keep a stratified ``fraction`` of the train split (at least one image per class); meta and test unchanged.

    Each class is ordered by its own permutation drawn from (seed, class, "subsample") and the first
    round(fraction * n) are kept, so the subsample at a smaller fraction is contained in the one at a larger fraction
    (a scaling study adds images, it never swaps them)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return splits
    by_class: list[list[Record]] = [[] for _ in range(num_classes)]
    for r in splits["train"]:
        by_class[r.label].append(r)
    kept: list[Record] = []
    for k, members in enumerate(by_class):
        members = sorted(members, key=_sort_key)
        # 0x5AB5 keeps this stream apart from make_splits' (seed, class) permutation
        perm = np.random.default_rng([seed, k, 0x5AB5]).permutation(len(members))
        n_keep = min(len(members), max(1, int(round(fraction * len(members)))))
        kept.extend(members[i] for i in perm[:n_keep])
    return {**splits, "train": sorted(kept, key=_sort_key)}


def write_splits(path: str | Path, splits: dict[str, list[Record]]) -> None:
    """CSV `path,label,source_id,split`, written to a temp file and renamed so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "label", "source_id", "split"])
        for split in ALL_SPLITS:
            for r in splits.get(split, []):
                w.writerow([r.path, r.label, r.source_id, split])


def read_splits(path: str | Path) -> dict[str, list[Record]]:
    """Read a splits.csv; every malformed row is named in one DataError. A `select` key only when the file has
    select rows (a three-way file reads back exactly as before)."""
    table = read_csv_table(path, ["path", "label", "source_id", "split"])
    out: dict[str, list[Record]] = {s: [] for s in ALL_SPLITS}
    bad, first_line = [], {}
    for line, v in table.rows:
        reasons = []
        label = parse_int(v["label"])
        if label is None or label < 0:
            reasons.append(f"label {v['label']!r} is not a non-negative integer")
        if v["split"] not in out:
            reasons.append(f"split {v['split']!r} is not one of {', '.join(ALL_SPLITS)}")
        if not v["path"]:
            reasons.append("empty path")
        if not v["source_id"]:
            reasons.append("empty source_id")
        elif v["source_id"] in first_line:
            reasons.append(f"duplicate source_id (first seen on line {first_line[v['source_id']]})")
        else:
            first_line[v["source_id"]] = line
        if reasons:
            bad.append(BadRow(line, v["source_id"], "; ".join(reasons), str(table.path)))
        else:
            out[v["split"]].append(Record(v["path"], int(label), v["source_id"]))
    if bad:
        raise DataError(format_bad_rows(bad))
    if not out["select"]:
        del out["select"]
    empty = [s for s in SPLITS if not out[s]]
    if empty:
        raise DataError(f"{table.path}: split(s) {', '.join(empty)} have no rows")
    return out


def load_or_make_splits(run_dir: str | Path, records: Sequence[Record], fractions: Sequence[float], seed: int,
                        num_classes: int, *, train_fraction: float = 1.0) -> dict[str, list[Record]]:
    """Reuse run_dir/splits.csv unchanged when it exists (a resumed run must evaluate on the same test images);
    otherwise make the split (train subsampled to ``train_fraction``) and write it there."""
    path = Path(run_dir) / SPLITS_FILE
    if path.is_file():
        splits = read_splits(path)
        too_big = sorted({r.label for rs in splits.values() for r in rs if r.label >= num_classes})
        if too_big:
            raise DataError(f"{path}: labels {too_big} outside 0..{num_classes - 1} (model.num_classes)")
        stored = {r.source_id for rs in splits.values() for r in rs}
        current = {r.source_id for r in records}
        # a train subsample leaves images of the data set out on purpose: only ids missing from it count then
        if stored - current or (train_fraction == 1.0 and current - stored):
            log.warning("%s: re-using the stored split, but the data set differs from it (%d ids only in the split, "
                        "%d only in the data set)", path, len(stored - current), len(current - stored))
        else:
            log.info("re-using the split in %s", path)
        return splits
    splits = subsample_train(make_splits(records, fractions, seed, num_classes), train_fraction, seed, num_classes)
    write_splits(path, splits)
    log.info("wrote %s (%s)", path, ", ".join(f"{s} {len(rs)}" for s, rs in splits.items()))
    return splits


def with_meta_in_train(splits: dict[str, list[Record]]) -> dict[str, list[Record]]:
    """The tables a fixed loss trains on under `data.baselines_use_meta_split`: train ∪ meta as the train table
    (sorted like every split), the other tables unchanged. splits.csv keeps the real split; only the streams see
    the union, so the same labels reach a fixed loss as reach meta-reweighting (θ on train, φ on meta)."""
    out = dict(splits)
    out["train"] = sorted([*splits["train"], *splits["meta"]], key=_sort_key)
    return out
