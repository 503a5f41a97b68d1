"""What a reader returns -- candidate rows -- and the one validator that checks them all, plus the file-finding
helpers several layouts share."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from data_pipeline.readers.table import BadRow, parse_int, read_header
from data_pipeline.records import Record

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class Candidate:
    line: int
    source_id: str
    label_text: str
    path: Path | None
    file: str
    problem: str = ""   # a problem found while locating the image (not found anywhere, ambiguous)


class _DirListing:
    """Existence checks from one directory listing per folder: 35k stat() calls on a network disk are slow."""

    def __init__(self) -> None:
        self._names: dict[Path, set[str]] = {}

    def exists(self, path: Path) -> bool:
        parent = path.parent
        if parent not in self._names:
            try:
                self._names[parent] = set(os.listdir(parent))
            except OSError:
                self._names[parent] = set()
        return path.name in self._names[parent]


def validate(cands: list[Candidate], num_classes: int) -> tuple[list[Record], list[BadRow]]:
    records, bad = [], []
    first_line: dict[str, int] = {}
    listing = _DirListing()
    for c in cands:
        reasons = []
        if not c.source_id:
            reasons.append("empty id")
        elif c.source_id in first_line:
            reasons.append(f"duplicate id (first seen on line {first_line[c.source_id]})")
        else:
            first_line[c.source_id] = c.line
        label = parse_int(c.label_text)
        if not c.label_text:
            reasons.append("empty label")
        elif label is None:
            reasons.append(f"label {c.label_text!r} is not an integer")
        elif not 0 <= label < num_classes:
            reasons.append(f"label {label} outside 0..{num_classes - 1}")
        if c.problem:
            reasons.append(c.problem)
        elif c.path is not None and not listing.exists(c.path):
            reasons.append(f"image not found: {c.path}")
        if reasons:
            bad.append(BadRow(c.line, c.source_id, "; ".join(reasons), c.file))
        else:
            records.append(Record(str(c.path), int(label), c.source_id))
    return records, bad


def image_path(folder: Path, name: str, default_ext: str) -> Path:
    """`name` may already carry an extension (some re-packaged sets); otherwise the layout's default is added."""
    return folder / name if Path(name).suffix.lower() in IMAGE_EXTS else folder / (name + default_ext)


def resolve(folder: Path, text: str) -> Path:
    p = Path(text)
    return p if p.is_absolute() else folder / p


def find_csv_with(root: Path, columns: Sequence[str]) -> Path | None:
    for p in sorted(root.rglob("*.csv")):
        if all(c in read_header(p) for c in columns):
            return p
    return None


def index_images(root: Path, exts: Sequence[str]) -> dict[str, list[Path]]:
    """lower-cased file name AND stem -> paths, from one walk of the tree."""
    index: dict[str, list[Path]] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in exts and p.is_file():
            for key in {p.name.lower(), p.stem.lower()}:
                index.setdefault(key, []).append(p)
    return index


def pick_image(matches: list[Path], csv_path: Path, root: Path, name: str) -> tuple[Path | None, str]:
    """One match -> it. Several (IDRiD repeats IDRiD_001.jpg in its training and testing folders) -> the one whose
    path shares the CSV's 'train'/'test' word; still tied -> a bad row, never a silent guess."""
    if not matches:
        return None, f"image {name!r} not found under {root}"
    if len(matches) > 1:
        words = [w for w in ("train", "test", "valid") if w in csv_path.name.lower()]
        preferred = [m for m in matches if any(w in str(m.relative_to(root)).lower() for w in words)]
        if len(preferred) != 1:
            return None, f"image {name!r} is ambiguous: {len(matches)} files match under {root}"
        return preferred[0], ""
    return matches[0], ""
