"""``RUN/preprocessing.json``: how the training images were made, so inference on raw images can repeat it.

A model trained on a prepared dir saw fundus crops resized by `metaloss prepare` (short side ``size``, optional Ben
Graham filter, JPEG q95) and then the eval transform (resize to ``image_size``, ImageNet normalisation). A model
trained on a raw layout saw the decoded originals resized to ``image_size``. ``metaloss predict`` reads this file to
put a new raw image through the same steps.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from common.atomic import atomic_write_text

log = logging.getLogger(__name__)

PREPROCESSING_FILE = "preprocessing.json"
PREPARE_REPORT = "prepare_report.json"  # written by data_pipeline.prepare next to manifest.csv


def describe_preprocessing(cfg) -> dict:
    fmt = cfg.data.format
    if fmt == "auto" and cfg.data.root:
        from data_pipeline.readers import detect_format

        fmt = detect_format(cfg.data.root)
    prepared = None
    if fmt == "prepared":
        report_path = Path(cfg.data.root) / PREPARE_REPORT
        try:
            report = json.loads(report_path.read_text())
            prepared = {"size": int(report["size"]), "ben_graham": bool(report["ben_graham"])}
        except (OSError, ValueError, KeyError, TypeError):
            # a hand-made prepared dir: its crop is unknown, predict will say so instead of guessing
            log.warning("%s is missing or unreadable: the prepare crop cannot be recorded for predict", report_path)
            prepared = {"size": None, "ben_graham": None}
    return {"data_format": fmt, "backend": cfg.data.backend, "prepared": prepared,
            "image_size": cfg.data.image_size, "num_classes": cfg.model.num_classes,
            "referable_from": cfg.eval.referable_from, "normalisation": "imagenet"}


def write_preprocessing(cfg, run_dir: Path) -> None:
    if cfg.data.backend == "synthetic" and not cfg.data.root:
        return  # in-memory benchmark data: there is nothing to repeat
    atomic_write_text(Path(run_dir) / PREPROCESSING_FILE, json.dumps(describe_preprocessing(cfg), indent=2) + "\n")


def read_preprocessing(run_dir: Path) -> dict | None:
    path = Path(run_dir) / PREPROCESSING_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())
