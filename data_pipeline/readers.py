"""Readers for the supported dataset layouts, with validation that names every bad row.

Each layout is turned into a list of *candidate rows* (line, id, label text, image path, source file); one shared
validator then checks every candidate (id present and unique, label an integer in 0..K-1, image file present) and
collects ALL problems before refusing the data set -- a user fixing a 35k-row CSV wants the full list, not the first.
Rows a layout marks as ungradable (DDR label 5, Messidor-2 ``adjudicated_gradable`` 0) are dropped with a logged
count: they are part of the data set's definition, not mistakes.

The CSV helpers (`read_csv_table`, `parse_int`, `format_bad_rows`) are public because `splits` reuses them.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from data_pipeline.records import DataError, Record

log = logging.getLogger(__name__)

FORMATS = ("aptos", "eyepacs", "csv", "ddr", "idrid", "messidor2", "prepared")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MAX_LISTED_ROWS = 50
_MESSIDOR_COLS = ("image_id", "adjudicated_dr_grade", "adjudicated_gradable")
_IDRID_COLS = ("Image name", "Retinopathy grade")


@dataclass(frozen=True)
class BadRow:
    line: int        # 1-based line number in `file`
    source_id: str
    reason: str
    file: str = ""   # the CSV/TXT the row came from (DDR rows come from three files)


@dataclass
class CsvTable:
    path: Path
    columns: list[str]                       # header names, surrounding whitespace stripped
    rows: list[tuple[int, dict[str, str]]]   # (1-based line number, {column: stripped value}), blank rows skipped


@dataclass
class _Candidate:
    line: int
    source_id: str
    label_text: str
    path: Path | None
    file: str
    problem: str = ""   # a problem found while locating the image (not found anywhere, ambiguous)


# ---------------------------------------------------------------------------------------------------------- CSV
def _read_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [c.strip() for c in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def read_csv_table(path: str | Path, required: Sequence[str]) -> CsvTable:
    """Read a CSV (UTF-8, optional BOM, LF or CRLF) and check that it has `required` columns and data rows."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: CSV file not found")
    try:
        # utf-8-sig drops a BOM (Excel writes one); newline="" lets the csv module handle CRLF and quoted newlines.
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty CSV (no header row)")
            columns = [c.strip() for c in header]
            missing = [c for c in required if c not in columns]
            if missing:
                raise DataError(f"{path}: missing required column(s) {', '.join(repr(c) for c in missing)} "
                                f"(found: {', '.join(repr(c) for c in columns)})")
            index = {}
            for j, c in enumerate(columns):
                index.setdefault(c, j)   # a duplicated header name: the first column wins
            rows = []
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                values = {c: (row[j].strip() if j < len(row) else "") for c, j in index.items()}
                rows.append((reader.line_num, values))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: unreadable CSV, not UTF-8 text ({exc})") from None
    except (OSError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable CSV ({exc})") from None
    if not rows:
        raise DataError(f"{path}: empty CSV (no data rows)")
    return CsvTable(path, columns, rows)


def parse_int(text: str) -> int | None:
    """'3' -> 3; '3.0' -> 3 (pandas writes integer columns with gaps as floats); 'two', '2.5', '' -> None."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def format_bad_rows(bad: Sequence[BadRow], limit: int = MAX_LISTED_ROWS) -> str:
    """'<file>: N bad rows:\\n  line L (id 'x'): reason' per source file; at most `limit` rows listed in total."""
    by_file: dict[str, list[BadRow]] = {}
    for b in bad:
        by_file.setdefault(b.file, []).append(b)
    lines, shown = [], 0
    for file, rows in by_file.items():
        lines.append(f"{file}: {len(rows)} bad row{'s' if len(rows) != 1 else ''}:")
        for b in rows:
            if shown < limit:
                lines.append(f"  line {b.line} (id {b.source_id!r}): {b.reason}")
            shown += 1
    if shown > limit:
        lines.append(f"  ... and {shown - limit} more")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- validation
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


def _validate(cands: list[_Candidate], num_classes: int) -> tuple[list[Record], list[BadRow]]:
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


# ------------------------------------------------------------------------------------------------------ layouts
def _image_path(folder: Path, name: str, default_ext: str) -> Path:
    """`name` may already carry an extension (some re-packaged sets); otherwise the layout's default is added."""
    return folder / name if Path(name).suffix.lower() in IMAGE_EXTS else folder / (name + default_ext)


def _read_aptos(root: Path, opts: dict) -> list[_Candidate]:
    table = read_csv_table(root / "train.csv", ["id_code", "diagnosis"])
    folder = root / "train_images"
    if not folder.is_dir():
        raise DataError(f"{root}: image folder 'train_images/' not found (the aptos layout keeps images there)")
    return [_Candidate(line, v["id_code"], v["diagnosis"], _image_path(folder, v["id_code"], ".png"),
                       str(table.path)) for line, v in table.rows]


def _read_eyepacs(root: Path, opts: dict) -> list[_Candidate]:
    table = read_csv_table(root / "trainLabels.csv", ["image", "level"])
    folders = [root / "train", root, root / "train_images"]
    # The first folder holding one of the first few images; checking several rows keeps one missing image from
    # sending the whole set to the wrong folder.
    probe = [v["image"] for _, v in table.rows[:20] if v["image"]]
    folder = next((d for d in folders for name in probe if _image_path(d, name, ".jpeg").is_file()), None)
    if folder is None:
        example = f" (e.g. {probe[0]}.jpeg)" if probe else ""
        raise DataError(f"{table.path}: none of the first {len(probe)} images{example} found in any of "
                        f"{', '.join(str(d) for d in folders)}")
    return [_Candidate(line, v["image"], v["level"], _image_path(folder, v["image"], ".jpeg"), str(table.path))
            for line, v in table.rows]


def _resolve(folder: Path, text: str) -> Path:
    p = Path(text)
    return p if p.is_absolute() else folder / p


def _read_csv(root: Path, opts: dict) -> list[_Candidate]:
    csv_path = root if root.is_file() else root / "labels.csv"
    path_col, label_col = opts["path_col"], opts["label_col"]
    table = read_csv_table(csv_path, [path_col, label_col])
    base = csv_path.parent.resolve()
    return [_Candidate(line, v[path_col], v[label_col], _resolve(base, v[path_col]) if v[path_col] else None,
                       str(table.path)) for line, v in table.rows]


def _read_prepared(root: Path, opts: dict) -> list[_Candidate]:
    table = read_csv_table(root / "manifest.csv", ["path", "label", "source_id"])
    return [_Candidate(line, v["source_id"], v["label"], _resolve(root, v["path"]) if v["path"] else None,
                       str(table.path), "" if v["path"] else "empty path") for line, v in table.rows]


def _read_ddr(root: Path, opts: dict) -> list[_Candidate]:
    base = root / "DR_grading"
    cands, ungradable, found = [], 0, 0
    for split in ("train", "valid", "test"):
        txt = base / f"{split}.txt"
        if not txt.is_file():
            continue
        found += 1
        try:
            text = txt.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{txt}: unreadable label file ({exc})") from None
        n_before = len(cands)
        for lineno, raw in enumerate(text.splitlines(), 1):
            parts = raw.split()
            if not parts:
                continue
            if len(parts) != 2:
                # the label is the second field: a trailing extra field must not be reported as a bad label too
                cands.append(_Candidate(lineno, parts[0], parts[1] if len(parts) > 1 else "", None, str(txt),
                                        f"expected 'name label', got {raw.strip()!r}"))
                continue
            if parse_int(parts[1]) == 5:   # DDR's grade 5 = ungradable image: not part of the 0..4 task
                ungradable += 1
                continue
            cands.append(_Candidate(lineno, parts[0], parts[1], base / split / parts[0], str(txt)))
        if len(cands) == n_before and not text.strip():
            raise DataError(f"{txt}: empty label file (no data rows)")
    if not found:
        raise DataError(f"{root}: no DDR label files (expected DR_grading/train.txt, valid.txt, test.txt)")
    if ungradable:
        log.info("ddr: excluded %d ungradable images (label 5) under %s", ungradable, base)
    return cands


def _find_csv_with(root: Path, columns: Sequence[str]) -> Path | None:
    for p in sorted(root.rglob("*.csv")):
        if all(c in _read_header(p) for c in columns):
            return p
    return None


def _index_images(root: Path, exts: Sequence[str]) -> dict[str, list[Path]]:
    """lower-cased file name AND stem -> paths, from one walk of the tree."""
    index: dict[str, list[Path]] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in exts and p.is_file():
            for key in {p.name.lower(), p.stem.lower()}:
                index.setdefault(key, []).append(p)
    return index


def _pick_image(matches: list[Path], csv_path: Path, root: Path, name: str) -> tuple[Path | None, str]:
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


def _read_idrid(root: Path, opts: dict) -> list[_Candidate]:
    csv_path = _find_csv_with(root, _IDRID_COLS)
    if csv_path is None:
        raise DataError(f"{root}: no CSV with columns 'Image name', 'Retinopathy grade' found (idrid layout)")
    log.info("idrid: reading labels from %s", csv_path)
    table = read_csv_table(csv_path, _IDRID_COLS)
    index = _index_images(root, (".jpg", ".jpeg"))
    cands = []
    for line, v in table.rows:
        name = v["Image name"]
        path, problem = _pick_image(index.get(Path(name).stem.lower(), []), csv_path, root, name) if name else (None, "")
        cands.append(_Candidate(line, name, v["Retinopathy grade"], path, str(csv_path), problem))
    return cands


def _read_messidor2(root: Path, opts: dict) -> list[_Candidate]:
    csv_path = root / "messidor_data.csv"
    if not csv_path.is_file():
        csv_path = _find_csv_with(root, _MESSIDOR_COLS)
        if csv_path is None:
            raise DataError(f"{root}: no messidor_data.csv (or CSV with columns {', '.join(_MESSIDOR_COLS)})")
    table = read_csv_table(csv_path, _MESSIDOR_COLS)
    index = _index_images(root, IMAGE_EXTS)
    cands, ungradable = [], 0
    for line, v in table.rows:
        name, gradable = v["image_id"], parse_int(v["adjudicated_gradable"])
        if gradable == 0:
            ungradable += 1
            continue
        path, problem = _pick_image(index.get(name.lower(), []), csv_path, root, name) if name else (None, "")
        if gradable != 1:
            problem = "; ".join(filter(None, [f"adjudicated_gradable {v['adjudicated_gradable']!r} is not 0 or 1",
                                              problem]))
        cands.append(_Candidate(line, name, v["adjudicated_dr_grade"], path, str(csv_path), problem))
    if ungradable:
        log.info("messidor2: excluded %d ungradable images (adjudicated_gradable 0) from %s", ungradable, csv_path)
    return cands


_READERS = {"aptos": _read_aptos, "eyepacs": _read_eyepacs, "csv": _read_csv, "ddr": _read_ddr,
            "idrid": _read_idrid, "messidor2": _read_messidor2, "prepared": _read_prepared}


# ---------------------------------------------------------------------------------------------------- public API
def detect_format(root: str | Path) -> str:
    """Guess the layout from the files under `root` (cheap checks first, one tree walk for IDRiD/Messidor-2 last)."""
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return "csv"
        raise DataError(f"{root}: a file that is not a CSV; give a dataset folder or a labels CSV")
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    fixed = [("manifest.csv", "prepared"), ("train.csv", "aptos"), ("trainLabels.csv", "eyepacs"),
             ("DR_grading", "ddr"), ("messidor_data.csv", "messidor2"), ("labels.csv", "csv")]
    for name, fmt in fixed:
        if (root / name).exists():
            return fmt
    if _find_csv_with(root, _IDRID_COLS):
        return "idrid"
    if _find_csv_with(root, _MESSIDOR_COLS):
        return "messidor2"
    raise DataError(f"{root}: cannot tell the dataset layout (looked for manifest.csv, train.csv, trainLabels.csv, "
                    f"DR_grading/, messidor_data.csv, labels.csv, or a CSV with IDRiD/Messidor-2 columns); "
                    f"set data.format to one of {', '.join(FORMATS)}")


def read_dataset_report(fmt: str, root: str | Path, *, num_classes: int = 5, path_col: str = "path",
                        label_col: str = "label", skip_bad: bool = False) -> tuple[list[Record], list[BadRow]]:
    """(good records in file order, the bad rows that were skipped); `prepare` writes the latter to its report.

    Bad rows -> one DataError listing them all, or with skip_bad one warning listing them. File-level problems
    (missing/unreadable/empty CSV, missing column) and a data set with no usable row are always errors."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise DataError(f"{root}: dataset path not found")
    if fmt == "auto":
        fmt = detect_format(root)
    if fmt not in _READERS:
        raise DataError(f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)} or auto")
    cands = _READERS[fmt](root, {"path_col": path_col, "label_col": label_col})
    records, bad = _validate(cands, num_classes)
    if not records:
        detail = format_bad_rows(bad) if bad else "every row was excluded as ungradable"
        raise DataError(f"{fmt} data set at {root} has no usable rows:\n{detail}")
    if bad and not skip_bad:
        raise DataError(format_bad_rows(bad) + "\n(fix these rows, or set data.skip_bad=true to drop them)")
    if bad:
        log.warning("skipping %d bad rows (data.skip_bad=true):\n%s", len(bad), format_bad_rows(bad))
    return records, bad


def read_dataset(fmt: str, root: str | Path, *, num_classes: int = 5, path_col: str = "path",
                 label_col: str = "label", skip_bad: bool = False) -> list[Record]:
    """Read and validate a data set: `read_dataset_report` without the list of skipped rows."""
    return read_dataset_report(fmt, root, num_classes=num_classes, path_col=path_col, label_col=label_col,
                               skip_bad=skip_bad)[0]
