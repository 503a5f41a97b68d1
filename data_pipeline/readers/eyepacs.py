"""EyePACS (Kaggle 2015): trainLabels.csv (image, level) + <image>.jpeg in train/, the root or train_images/."""
from __future__ import annotations

from pathlib import Path

from data_pipeline.readers.candidates import Candidate, image_path
from data_pipeline.readers.table import read_csv_table
from data_pipeline.records import DataError


def read(root: Path, opts: dict) -> list[Candidate]:
    table = read_csv_table(root / "trainLabels.csv", ["image", "level"])
    folders = [root / "train", root, root / "train_images"]
    # The first folder holding one of the first few images; checking several rows keeps one missing image from
    # sending the whole set to the wrong folder.
    probe = [v["image"] for _, v in table.rows[:20] if v["image"]]
    folder = next((d for d in folders for name in probe if image_path(d, name, ".jpeg").is_file()), None)
    if folder is None:
        example = f" (e.g. {probe[0]}.jpeg)" if probe else ""
        raise DataError(f"{table.path}: none of the first {len(probe)} images{example} found in any of "
                        f"{', '.join(str(d) for d in folders)}")
    return [Candidate(line, v["image"], v["level"], image_path(folder, v["image"], ".jpeg"), str(table.path))
            for line, v in table.rows]
