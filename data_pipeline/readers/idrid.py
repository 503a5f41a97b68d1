"""IDRiD (disease grading): a CSV with 'Image name', 'Retinopathy grade' anywhere under the root; images found by
name in one walk of the tree."""
from __future__ import annotations

import logging
from pathlib import Path

from data_pipeline.readers.candidates import Candidate, find_csv_with, index_images, pick_image
from data_pipeline.readers.table import read_csv_table
from data_pipeline.records import DataError

log = logging.getLogger("data_pipeline.readers")
COLUMNS = ("Image name", "Retinopathy grade")


def read(root: Path, opts: dict) -> list[Candidate]:
    csv_path = find_csv_with(root, COLUMNS)
    if csv_path is None:
        raise DataError(f"{root}: no CSV with columns 'Image name', 'Retinopathy grade' found (idrid layout)")
    log.info("idrid: reading labels from %s", csv_path)
    table = read_csv_table(csv_path, COLUMNS)
    index = index_images(root, (".jpg", ".jpeg"))
    cands = []
    for line, v in table.rows:
        name = v["Image name"]
        path, problem = pick_image(index.get(Path(name).stem.lower(), []), csv_path, root, name) if name else (None, "")
        cands.append(Candidate(line, name, v["Retinopathy grade"], path, str(csv_path), problem))
    return cands
