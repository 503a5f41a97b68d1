"""APTOS 2019: train.csv (id_code, diagnosis) + train_images/<id_code>.png."""
from __future__ import annotations

from pathlib import Path

from data_pipeline.readers.candidates import Candidate, image_path
from data_pipeline.readers.table import read_csv_table
from data_pipeline.records import DataError


def read(root: Path, opts: dict) -> list[Candidate]:
    table = read_csv_table(root / "train.csv", ["id_code", "diagnosis"])
    folder = root / "train_images"
    if not folder.is_dir():
        raise DataError(f"{root}: image folder 'train_images/' not found (the aptos layout keeps images there)")
    return [Candidate(line, v["id_code"], v["diagnosis"], image_path(folder, v["id_code"], ".png"),
                      str(table.path)) for line, v in table.rows]
