"""Synthetic labelled records for the split tests: big enough per class that the "at least one per split" rule never
binds (n * 0.15 >= 1.5), so every split count must sit within one sample of its quota."""
from __future__ import annotations

from data_pipeline.records import Record

CLASS_COUNTS = (100, 20, 50, 10, 15)


def records_per_class(counts=CLASS_COUNTS) -> list[Record]:
    """``counts[label]`` records of each label, with stable paths and source ids."""
    out = []
    for label, n in enumerate(counts):
        out += [Record(f"/data/img_{label}_{i:03d}.png", label, f"id{label}_{i:03d}") for i in range(n)]
    return out
