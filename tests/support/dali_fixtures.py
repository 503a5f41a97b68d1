"""Shared DALI test data: tiny fundus-like JPEGs (the `records` fixture, imported by conftest.py),
pipeline specs and the torch reference. Imports DALI lazily so collecting other tests never needs it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from data_pipeline.records import Record
from common.normalization import IMAGENET_MEAN, IMAGENET_STD
from data_pipeline.backends.transforms import eval_transform

S = 32  # output side: small keeps the whole file fast on 2 cores
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _fundus(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A small fundus-like JPEG: black border, textured disc. Pixel values stay <= ~200 so brightness x1.5 rarely
    clips (the brightness test needs unclipped pixels)."""
    texture = (rng.random((h // 6 + 1, w // 6 + 1, 3)) * 150 + 40).astype(np.uint8)
    img = Image.fromarray(texture).resize((w, h), Image.Resampling.BICUBIC)
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).ellipse((w * 0.08, h * 0.05, w * 0.92, h * 0.95), fill=255)
    return Image.composite(img, Image.new("RGB", (w, h)), mask)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[Record]:
    root = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(0)
    out = []
    for i in range(23):  # prime: no batch size used below divides it
        path = root / f"img{i:02d}.jpg"
        _fundus(rng, int(rng.integers(60, 120)), int(rng.integers(60, 120))).save(path, quality=95)
        out.append(Record(str(path), i % 5, f"img{i:02d}"))
    return out


def _spec(batch: int, augment=None):
    from data_pipeline.backends.dali.pipelines import PipelineSpec

    return PipelineSpec(S, batch, 2, None, augment)


def _reference(rec: Record) -> torch.Tensor:
    with Image.open(rec.path) as im:
        return eval_transform(S)(im.convert("RGB"))


def _eval_images(records) -> dict[int, torch.Tensor]:
    from data_pipeline.backends.dali.streams import DaliEvalStream

    out = {}
    for b in DaliEvalStream(records, _spec(5), 0, 1, "test"):
        out.update({int(i): img for i, img in zip(b.ids, b.images) if i >= 0})  # -1: padding of the last batch
    return out


def _to_255(img: torch.Tensor) -> torch.Tensor:
    return (img * STD + MEAN) * 255.0
