"""Any set with a labels CSV: ``root/labels.csv`` (or the CSV itself) with ``path_col`` / ``label_col`` columns;
relative paths are relative to the CSV's folder."""
from __future__ import annotations

from pathlib import Path

from data_pipeline.readers.candidates import Candidate, resolve
from data_pipeline.readers.table import read_csv_table


def read(root: Path, opts: dict) -> list[Candidate]:
    csv_path = root if root.is_file() else root / "labels.csv"
    path_col, label_col = opts["path_col"], opts["label_col"]
    table = read_csv_table(csv_path, [path_col, label_col])
    base = csv_path.parent.resolve()
    return [Candidate(line, v[path_col], v[label_col], resolve(base, v[path_col]) if v[path_col] else None,
                      str(table.path)) for line, v in table.rows]
