"""Messidor-2: messidor_data.csv (or any CSV with its columns); rows with adjudicated_gradable 0 are dropped."""
from __future__ import annotations

import logging
from pathlib import Path

from data_pipeline.readers.candidates import IMAGE_EXTS, Candidate, find_csv_with, index_images, pick_image
from data_pipeline.readers.table import parse_int, read_csv_table
from data_pipeline.records import DataError

log = logging.getLogger("data_pipeline.readers")
COLUMNS = ("image_id", "adjudicated_dr_grade", "adjudicated_gradable")


def read(root: Path, opts: dict) -> list[Candidate]:
    csv_path = root / "messidor_data.csv"
    if not csv_path.is_file():
        csv_path = find_csv_with(root, COLUMNS)
        if csv_path is None:
            raise DataError(f"{root}: no messidor_data.csv (or CSV with columns {', '.join(COLUMNS)})")
    table = read_csv_table(csv_path, COLUMNS)
    index = index_images(root, IMAGE_EXTS)
    cands, ungradable = [], 0
    for line, v in table.rows:
        name, gradable = v["image_id"], parse_int(v["adjudicated_gradable"])
        if gradable == 0:
            ungradable += 1
            continue
        path, problem = pick_image(index.get(name.lower(), []), csv_path, root, name) if name else (None, "")
        if gradable != 1:
            problem = "; ".join(filter(None, [f"adjudicated_gradable {v['adjudicated_gradable']!r} is not 0 or 1",
                                              problem]))
        cands.append(Candidate(line, name, v["adjudicated_dr_grade"], path, str(csv_path), problem))
    if ungradable:
        log.info("messidor2: excluded %d ungradable images (adjudicated_gradable 0) from %s", ungradable, csv_path)
    return cands
