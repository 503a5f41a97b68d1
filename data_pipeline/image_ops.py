"""Pixel-level operations behind `metaloss prepare`: robust loading, fundus crop, resize, Ben Graham.

Everything here works on one image and raises :class:`ImageError` (a :class:`DataError`) with a human reason for
anything it cannot turn into a sensible 8-bit RGB picture, so the caller can quarantine the file instead of crashing.
No torch import: this runs in `prepare`'s worker processes, where start-up time matters.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageFilter, ImageOps, UnidentifiedImageError

from data_pipeline.records import DataError

# A truncated file must be refused, not silently padded with grey (Pillow's default is already False; pin it).
ImageFile.LOAD_TRUNCATED_IMAGES = False

MIN_SIDE = 32            # below this the image carries no usable retina; quarantine rather than upscale noise
CROP_ANALYSIS_SIDE = 256  # the border is found on a small copy: the bounding box needs no more resolution
CROP_THRESHOLD = 15      # grey level (0..255, after blur) above which a pixel counts as retina, not black border
CROP_MIN_FRACTION = 0.08  # a row/column counts when >= 8% of it is foreground: specks and burnt-in marks smaller than
                         # that do not widen the box; a circle loses only ~0.3% of its radius to this rule
CROP_BLUR_RADIUS = 1     # px at analysis scale: enough to smooth JPEG noise, small enough to keep the edge tight
JPEG_QUALITY = 95


class ImageError(DataError):
    """One image cannot be used; ``str(e)`` is the reason written to the quarantine list."""


def _sixteen_to_eight(arr: np.ndarray) -> np.ndarray:
    """16-bit samples -> 8-bit by keeping the high byte (>>8): scales the full range, never clips to 255."""
    return (np.clip(arr, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)


def _over_black(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite onto black: transparent areas become border-black, which the fundus crop then removes."""
    out = rgb.astype(np.uint16) * alpha.astype(np.uint16)[..., None] // 255
    return out.astype(np.uint8)


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Grey is replicated, alpha composited over black, 16-bit scaled (>>8)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("L", "1"):
        return img.convert("L").convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img)
        if mode == "I" and int(arr.max(initial=0)) <= 255:
            grey = np.clip(arr, 0, 255).astype(np.uint8)  # 8-bit data stored in a 32-bit container
        else:
            grey = _sixteen_to_eight(arr)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ImageError("float image contains NaN/inf pixels")
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0  # [0,1] floats are the common convention
        grey = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    if mode in ("LA", "La", "PA", "RGBA", "RGBa", "P"):
        if mode == "P" and "transparency" not in img.info:
            return img.convert("RGB")
        rgba = np.asarray(img.convert("RGBA"))
        return Image.fromarray(_over_black(rgba[..., :3], rgba[..., 3]), "RGB")
    try:  # CMYK, YCbCr, LAB, HSV, ...: Pillow knows the conversion (CMYK JPEG inversion is handled on open)
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"unsupported pixel mode {mode}: {e}") from None


def load_rgb(path: str, *, draft_short_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Open, fully decode and convert one image to 8-bit RGB.

    Returns (image, original (width, height)). ``draft_short_side``: for JPEGs, let libjpeg decode at a reduced
    DCT scale as long as the short side stays >= this many pixels -- decoding a 4k EyePACS photo at 1/2 or 1/4
    scale is several times faster and no worse than decoding fully and resizing down afterwards.
    Raises ImageError for empty, truncated, non-image, too small or decompression-bomb files.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or e}") from None
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # MAX_IMAGE_PIXELS stays in force: above it Pillow only warns; we treat that as a bomb too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            orig_size = img.size
            if min(orig_size) < MIN_SIDE:
                raise ImageError(f"image too small: {orig_size[0]}x{orig_size[1]} px (minimum side {MIN_SIDE})")
            if draft_short_side and img.format == "JPEG":
                w, h = img.size
                scale = draft_short_side / min(w, h)
                if scale < 1.0:
                    img.draft(None, (int(np.ceil(w * scale)), int(np.ceil(h * scale))))
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"decompression bomb guard: {e}") from None
    except UnidentifiedImageError:
        raise ImageError("not a recognised image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated / corrupt streams surface as these
        raise ImageError(f"corrupt or truncated image: {e}") from None
    return to_rgb8(img), orig_size


def fundus_box(img: Image.Image, *, threshold: int = CROP_THRESHOLD) -> tuple[int, int, int, int] | None:
    """Bounding box (left, top, right, bottom) of the retina, or None when no foreground is found.

    Works on a blurred grey copy at <= CROP_ANALYSIS_SIDE px: the blur suppresses JPEG noise in the black border
    and the row/column fraction rule ignores isolated specks (dust, text burnt into the corner).
    """
    w, h = img.size
    factor = max(w, h) / CROP_ANALYSIS_SIDE
    small = img.convert("L")
    if factor > 1:
        small = small.resize((max(1, round(w / factor)), max(1, round(h / factor))), Image.Resampling.BILINEAR,
                             reducing_gap=2.0)
    small = small.filter(ImageFilter.GaussianBlur(radius=CROP_BLUR_RADIUS))
    mask = np.asarray(small) > threshold
    sh, sw = mask.shape
    rows = np.flatnonzero(mask.sum(axis=1) >= max(1, CROP_MIN_FRACTION * sw))
    cols = np.flatnonzero(mask.sum(axis=0) >= max(1, CROP_MIN_FRACTION * sh))
    if rows.size == 0 or cols.size == 0:
        return None
    sx, sy = w / sw, h / sh
    left, right = int(np.floor(cols[0] * sx)), int(np.ceil((cols[-1] + 1) * sx))
    top, bottom = int(np.floor(rows[0] * sy)), int(np.ceil((rows[-1] + 1) * sy))
    return max(0, left), max(0, top), min(w, right), min(h, bottom)


def crop_fundus(img: Image.Image) -> Image.Image:
    """Crop the black border around the circular fundus; keep the whole image when nothing (usable) is found."""
    box = fundus_box(img)
    if box is None:
        return img
    left, top, right, bottom = box
    if min(right - left, bottom - top) < MIN_SIDE:
        return img  # a speck, not a retina
    return img.crop(box)


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Scale so the SHORT side is ``size`` px, keeping aspect. LANCZOS with reducing_gap: a cheap integer box
    reduction first, then Lanczos for the last factor <= 3 -- visually identical to full Lanczos, 2-4x faster."""
    w, h = img.size
    scale = size / min(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new == (w, h):
        return img
    return img.resize(new, Image.Resampling.LANCZOS, reducing_gap=3.0)


def ben_graham(img: Image.Image, size: int | None = None) -> Image.Image:
    """Ben Graham's local-average subtraction: 4*img - 4*GaussianBlur(img, sigma=size/30) + 128, then a circular
    mask (radius 0.9 x the eye's radius) set to the neutral 128 -- the mask hides the bright ring the blur makes
    where the retina meets the black border. ``size`` defaults to the short side."""
    w, h = img.size
    sigma = (size or min(w, h)) / 30.0
    arr = np.asarray(img, dtype=np.int16)
    blur = np.asarray(img.filter(ImageFilter.GaussianBlur(radius=sigma)), dtype=np.int16)
    out = np.clip(4 * arr - 4 * blur + 128, 0, 255).astype(np.uint8)
    # After the fundus crop the eye spans the long side (it may be cut at the short side), so its radius is
    # max(w, h)/2, centred.
    yy, xx = np.ogrid[:h, :w]
    radius = 0.9 * max(w, h) / 2.0
    outside = (xx - (w - 1) / 2.0) ** 2 + (yy - (h - 1) / 2.0) ** 2 > radius ** 2
    out[outside] = 128
    return Image.fromarray(out, "RGB")


def prepare_image(path: str, size: int, *, ben: bool = False) -> Image.Image:
    """The whole per-image recipe of `metaloss prepare`: load -> crop border -> short side to ``size`` -> [Ben]."""
    # Decode at >= 2x the target so a crop that removes up to half the short side still has full resolution.
    img, _ = load_rgb(path, draft_short_side=2 * size)
    img = resize_short_side(crop_fundus(img), size)
    if ben:
        img = ben_graham(img, size)
    return img


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
