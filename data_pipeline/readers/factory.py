"""Pick a reader (by name or by the files under the root), run it, validate every row, report all bad rows."""
from __future__ import annotations

import logging
from pathlib import Path

from common.registry import load
from data_pipeline.readers import idrid, messidor2
from data_pipeline.readers.candidates import find_csv_with, validate
from data_pipeline.readers.registry import FORMATS, READERS
from data_pipeline.readers.table import BadRow, format_bad_rows
from data_pipeline.records import DataError, Record

log = logging.getLogger("data_pipeline.readers")


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
    if find_csv_with(root, idrid.COLUMNS):
        return "idrid"
    if find_csv_with(root, messidor2.COLUMNS):
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
    if fmt not in READERS:
        raise DataError(f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)} or auto")
    cands = load(READERS, fmt)(root, {"path_col": path_col, "label_col": label_col})
    records, bad = validate(cands, num_classes)
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
