"""DDR: DR_grading/{train,valid,test}.txt ('name label' lines) + DR_grading/<split>/<name>; label 5 = ungradable."""
from __future__ import annotations

import logging
from pathlib import Path

from data_pipeline.readers.candidates import Candidate
from data_pipeline.readers.table import parse_int
from data_pipeline.records import DataError

log = logging.getLogger("data_pipeline.readers")


def read(root: Path, opts: dict) -> list[Candidate]:
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
                cands.append(Candidate(lineno, parts[0], parts[1] if len(parts) > 1 else "", None, str(txt),
                                       f"expected 'name label', got {raw.strip()!r}"))
                continue
            if parse_int(parts[1]) == 5:   # DDR's grade 5 = ungradable image: not part of the 0..4 task
                ungradable += 1
                continue
            cands.append(Candidate(lineno, parts[0], parts[1], base / split / parts[0], str(txt)))
        if len(cands) == n_before and not text.strip():
            raise DataError(f"{txt}: empty label file (no data rows)")
    if not found:
        raise DataError(f"{root}: no DDR label files (expected DR_grading/train.txt, valid.txt, test.txt)")
    if ungradable:
        log.info("ddr: excluded %d ungradable images (label 5) under %s", ungradable, base)
    return cands
