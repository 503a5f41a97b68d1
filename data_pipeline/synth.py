"""Synthetic fundus photographs in the APTOS 2019 layout, for demos, tests and benchmarks without the real data.

Each image: black border, orange-red retina with radial shading (vignetting) and a darker macula, a bright
yellowish optic disc, dark-red vessels branching out of the disc, and grade-dependent lesions:

    grade 1  micro-aneurysms (small dark-red dots)
    grade 2  + blot haemorrhages, hard exudates (yellow)
    grade 3  many haemorrhages and exudates + cotton-wool spots (pale, fuzzy)
    grade 4  + neovascular tangles (fine tortuous vessels) near the disc

Lesion counts are Poisson draws driven by a *latent severity* = grade + noise, so adjacent grades overlap the way
human-graded data does, while brightness, colour, disc position/size and noise vary per image. A CNN can learn
it, but not perfectly.

Every image draws from its own Generator seeded with (seed, i), so the output is byte-identical for any worker
count. Drawing is vectorised numpy on coordinate grids plus PIL ImageDraw for the strokes.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from common.atomic import atomic_write
from data_pipeline.records import APTOS_COUNTS
from data_pipeline.splits import allocate_largest_remainder

MIN_PER_CLASS = 3          # so that a stratified train/meta/test split has every class in every split
_CHUNK = 8                 # images per worker task: amortises process overhead, keeps the progress bar moving


def synthetic_class_counts(n: int) -> list[int]:
    """APTOS proportions by largest remainder; at least 3 per class once n >= 15 (5 classes x 3 splits)."""
    return allocate_largest_remainder(n, APTOS_COUNTS, minimum=MIN_PER_CLASS if n >= 5 * MIN_PER_CLASS else 0)


def synthetic_labels(n: int, seed: int) -> list[int]:
    counts = synthetic_class_counts(n)
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng([seed, 2**31]).shuffle(labels)   # its own stream: never collides with an image's (seed, i)
    return [int(v) for v in labels]


def synthetic_id(seed: int, i: int) -> str:
    """12 hex digits like APTOS' id_code, stable for (seed, i)."""
    return hashlib.sha1(f"metaloss-synth:{seed}:{i}".encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------- drawing
@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency texture: a cells x cells Gaussian grid upsampled bicubically to size x size."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((size, size), Image.BICUBIC))


def _walk(draw: ImageDraw.ImageDraw, rng, x, y, angle, steps, step_len, width, curl, bend, branch_p, depth):
    """A vessel: a random walk whose width tapers; it forks with probability branch_p per step (depth levels)."""
    pts = [(x, y)]
    for k in range(steps):
        angle += bend + rng.normal(0.0, curl)
        x += step_len * math.cos(angle)
        y += step_len * math.sin(angle)
        pts.append((x, y))
        if depth > 0 and k > 1 and rng.random() < branch_p:
            side = 1 if rng.random() < 0.5 else -1
            _walk(draw, rng, x, y, angle + side * rng.uniform(0.4, 1.0), max(3, int((steps - k) * 0.6)),
                  step_len, width * 0.65, curl, bend * 0.5, branch_p * 0.8, depth - 1)
    # Taper: draw the walk in three pieces of decreasing width.
    third = max(1, len(pts) // 3)
    for j, piece in enumerate((pts[: third + 1], pts[third: 2 * third + 1], pts[2 * third:])):
        if len(piece) > 1:
            draw.line(piece, fill=255, width=max(1, round(width * (1.0 - 0.22 * j))))


def _blend(img: np.ndarray, mask: Image.Image, color, strength: float, blur: float) -> np.ndarray:
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    a = np.asarray(mask, dtype=np.float32)[..., None] * (strength / 255.0)
    return img * (1.0 - a) + np.asarray(color, dtype=np.float32) * a


def _random_points(rng, n, cx, cy, radius, avoid=None):
    """n uniform points in the disc (cx, cy, radius), re-drawing any that land in `avoid` = (x, y, r)."""
    pts = []
    while len(pts) < n:
        r, t = radius * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
        px, py = cx + r * math.cos(t), cy + r * math.sin(t)
        if avoid is None or math.hypot(px - avoid[0], py - avoid[1]) > avoid[2]:
            pts.append((px, py))
    return pts


def _dot(draw, x, y, rx, ry=None):
    ry = rx if ry is None else ry
    draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=255)


def render_fundus(grade: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One synthetic fundus photograph of DR `grade` (0..4) as a size x size x 3 uint8 array."""
    S, u = size, size / 256.0   # u: lesion and stroke sizes are specified at 256 px and scaled
    yy, xx = _grid(S)
    cx, cy = S / 2 + rng.uniform(-0.03, 0.03) * S, S / 2 + rng.uniform(-0.03, 0.03) * S
    R = S * rng.uniform(0.42, 0.48)
    bright = rng.uniform(0.75, 1.1)

    # Retina: orange-red, darker towards the rim (vignetting), with smooth blotchy texture and a darker macula.
    base = np.array([rng.uniform(0.74, 0.90), rng.uniform(0.28, 0.40), rng.uniform(0.08, 0.16)], np.float32) * bright
    rho = np.hypot(xx - cx, yy - cy) / R
    shade = 1.0 - rng.uniform(0.35, 0.55) * rho ** 2.2 + 0.05 * _smooth_noise(rng, S, 6)
    side = 1 if rng.random() < 0.5 else -1   # left/right eye: which side the optic disc sits on
    mx, my = cx - side * R * rng.uniform(0.05, 0.15), cy + R * rng.uniform(-0.06, 0.06)
    shade *= 1.0 - rng.uniform(0.15, 0.3) * np.exp(-((xx - mx) ** 2 + (yy - my) ** 2) / (0.18 * R) ** 2)
    img = base * shade[..., None]

    # Optic disc: flat-topped bright yellowish blob with a paler cup.
    ox, oy = cx + side * R * rng.uniform(0.3, 0.42), cy + R * rng.uniform(-0.1, 0.1)
    orad = R * rng.uniform(0.12, 0.16)
    od2 = ((xx - ox) ** 2 + (yy - oy) ** 2) / orad ** 2
    disc = np.exp(-od2 ** 3)[..., None]
    img = img * (1 - disc) + np.array([1.0, 0.86, 0.52], np.float32) * min(1.0, bright + 0.1) * disc
    cup = 0.5 * np.exp(-(od2 / 0.2) ** 2)[..., None]
    img = img * (1 - cup) + np.array([1.0, 0.96, 0.82], np.float32) * cup

    # Vessels: two arcades curving around the macula, two or three nasal trunks, all branching.
    vessels = Image.new("L", (S, S), 0)
    vd = ImageDraw.Draw(vessels)
    towards_macula = math.atan2(my - oy, mx - ox)
    for sign in (-1, 1):
        _walk(vd, rng, ox, oy, towards_macula + sign * rng.uniform(0.9, 1.3), int(rng.integers(28, 38)), 4 * u,
              3.6 * u, 0.06, -sign * 0.045, 0.12, 2)
    for _ in range(int(rng.integers(2, 4))):
        _walk(vd, rng, ox, oy, towards_macula + math.pi + rng.uniform(-1.0, 1.0), int(rng.integers(14, 22)), 4 * u,
              2.8 * u, 0.12, 0.0, 0.12, 2)
    vessel_color = np.array([0.45, 0.06, 0.05], np.float32) * bright
    img = _blend(img, vessels, vessel_color, 0.6, 0.6 * u)

    # Lesions. Counts: Poisson in the latent severity, so a "high" grade 1 can look like a "low" grade 2.
    sev = max(0.0, grade + rng.normal(0.0, 0.4))
    ramp = lambda start: max(0.0, sev - start)  # noqa: E731
    n_ma = rng.poisson(12 * ramp(0.4) ** 0.8)
    n_hem = rng.poisson(3.5 * ramp(1.4) ** 1.2)
    n_exu_clusters = rng.poisson(1.6 * ramp(1.3))
    n_cws = rng.poisson(2.2 * ramp(2.4))
    n_nv = rng.poisson(2.5 * ramp(3.3))
    avoid = (ox, oy, orad * 1.1)
    dark = Image.new("L", (S, S), 0)
    dd = ImageDraw.Draw(dark)
    for x, y in _random_points(rng, n_ma, cx, cy, 0.85 * R, avoid):
        _dot(dd, x, y, rng.uniform(0.9, 1.8) * u)
    for x, y in _random_points(rng, n_hem, cx, cy, 0.8 * R, avoid):
        r = rng.uniform(2.5, 6.5) * u
        for _ in range(int(rng.integers(2, 5))):   # a blot: a few overlapping ellipses
            _dot(dd, x + rng.normal(0, r / 2), y + rng.normal(0, r / 2), r * rng.uniform(0.6, 1.0),
                 r * rng.uniform(0.5, 1.0))
    for _ in range(n_nv):   # neovascular tangle: fine, very tortuous vessels just outside the disc
        t = rng.uniform(0, 2 * math.pi)
        d = orad * rng.uniform(1.1, 2.2)
        for _ in range(int(rng.integers(4, 8))):
            _walk(dd, rng, ox + d * math.cos(t), oy + d * math.sin(t), rng.uniform(0, 2 * math.pi),
                  int(rng.integers(16, 30)), 2.0 * u, 1.2 * u, 0.8, 0.0, 0.0, 0)
    img = _blend(img, dark, np.array([0.33, 0.03, 0.03], np.float32) * bright, 0.85, 0.45 * u)

    yellow = Image.new("L", (S, S), 0)
    yd = ImageDraw.Draw(yellow)
    for x, y in _random_points(rng, n_exu_clusters, cx, cy, 0.7 * R, (ox, oy, orad * 1.5)):
        spread = rng.uniform(4, 12) * u   # hard exudates come in clusters
        for _ in range(int(rng.integers(3, 12))):
            _dot(yd, x + rng.normal(0, spread), y + rng.normal(0, spread), rng.uniform(1.0, 2.6) * u)
    img = _blend(img, yellow, np.array([0.98, 0.84, 0.32], np.float32), 0.9, 0.35 * u)

    if n_cws:
        pale = Image.new("L", (S, S), 0)
        pd = ImageDraw.Draw(pale)
        for x, y in _random_points(rng, n_cws, cx, cy, 0.65 * R, (ox, oy, orad * 1.3)):
            r = rng.uniform(4, 9) * u
            _dot(pd, x, y, r, r * rng.uniform(0.6, 1.0))
        img = _blend(img, pale, np.array([0.95, 0.86, 0.76], np.float32), 0.7, 2.0 * u)

    # Camera: per-channel colour cast, sensor noise, then the circular aperture (soft edge) on a black frame.
    img *= (1.0 + rng.normal(0.0, 0.05, 3)).astype(np.float32)
    img += rng.standard_normal((S, S, 3), dtype=np.float32) * np.float32(rng.uniform(0.008, 0.025))
    aperture = np.clip((1.0 - rho) * R / (1.5 * u), 0.0, 1.0)[..., None]
    img = img * aperture + np.float32(rng.uniform(0.0, 0.015)) * (1.0 - aperture)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ writing
def _atomic_write_png(array: np.ndarray, path: Path) -> None:
    with atomic_write(path, "wb") as f:
        Image.fromarray(array, mode="RGB").save(f, format="PNG")


def _render_chunk(image_dir: str, size: int, seed: int, items: list[tuple[int, str, int]]) -> int:
    """Worker task: render and write a few images. Top-level so ProcessPoolExecutor can pickle it."""
    for i, id_code, label in items:
        rng = np.random.default_rng([seed, i])
        _atomic_write_png(render_fundus(label, size, rng), Path(image_dir) / f"{id_code}.png")
    return len(items)


def _write_labels_csv(path: Path, rows: list[tuple[str, int]]) -> None:
    with atomic_write(path) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id_code", "diagnosis"])
        w.writerows(rows)


def generate_synthetic(out_dir: str | Path, n: int = 600, size: int = 256, seed: int = 0, workers: int | None = None,
                       progress: bool = True) -> Path:
    """Write `out_dir/train.csv` (id_code,diagnosis) and `out_dir/train_images/<id_code>.png`; returns out_dir."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir)
    image_dir = out / "train_images"
    image_dir.mkdir(parents=True, exist_ok=True)
    labels = synthetic_labels(n, seed)
    items = [(i, synthetic_id(seed, i), labels[i]) for i in range(n)]
    if len({it[1] for it in items}) != n:   # 48-bit ids: a clash is astronomically unlikely, but never silent
        raise RuntimeError("synthetic id collision; use another seed")
    chunks = [items[j:j + _CHUNK] for j in range(0, n, _CHUNK)]

    bar = tqdm(total=n, desc="synth", unit="img", disable=not progress or not sys.stderr.isatty())
    try:
        if workers == 1 or len(chunks) == 1:
            for chunk in chunks:
                bar.update(_render_chunk(str(image_dir), size, seed, chunk))
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
                futures = [pool.submit(_render_chunk, str(image_dir), size, seed, c) for c in chunks]
                for fut in as_completed(futures):
                    bar.update(fut.result())
    finally:
        bar.close()
    # The CSV goes last: a data set with a train.csv is complete, whatever was interrupted before.
    _write_labels_csv(out / "train.csv", [(id_code, label) for _, id_code, label in items])
    return out
