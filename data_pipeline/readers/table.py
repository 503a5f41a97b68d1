"""CSV tables and bad-row reports shared by every reader (and by ``splits``, which re-reads splits.csv)."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from data_pipeline.records import DataError

MAX_LISTED_ROWS = 50


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


def read_header(path: Path) -> list[str]:
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
