"""The output of `metaloss prepare`: manifest.csv (path, label, source_id), paths relative to the folder."""
from __future__ import annotations

from pathlib import Path

from data_pipeline.readers.candidates import Candidate, resolve
from data_pipeline.readers.table import read_csv_table


def read(root: Path, opts: dict) -> list[Candidate]:
    table = read_csv_table(root / "manifest.csv", ["path", "label", "source_id"])
    return [Candidate(line, v["source_id"], v["label"], resolve(root, v["path"]) if v["path"] else None,
                      str(table.path), "" if v["path"] else "empty path") for line, v in table.rows]
