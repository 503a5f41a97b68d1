"""image_ops: every odd input becomes correct 8-bit RGB or an ImageError with a reason; crop / resize / Ben Graham."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data_pipeline import image_ops
from data_pipeline.image_ops import (ImageError, ben_graham, crop_fundus, fundus_box, load_rgb, prepare_image,
                                     resize_short_side, to_rgb8)
from data_pipeline.records import DataError


def _png16_rgb(path, rgb16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def _disc(w=120, h=100, box=(20, 10, 100, 90), color=(180, 90, 40)) -> Image.Image:
    img = Image.new("RGB", (w, h))
    ImageDraw.Draw(img).ellipse(box, fill=color)
    return img


# ------------------------------------------------------------------------------------------------ conversions
def test_grey_is_replicated(tmp_path):
    arr = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) % 256
    Image.fromarray(arr.astype(np.uint8), "L").save(tmp_path / "g.png")
    img, size = load_rgb(str(tmp_path / "g.png"))
    out = np.asarray(img)
    assert img.mode == "RGB" and size == (64, 64)
    assert (out[..., 0] == arr).all() and (out[..., 1] == arr).all() and (out[..., 2] == arr).all()


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 255, 256, 4095, 32768, 65535] * 8] * 48, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    out = np.asarray(load_rgb(str(tmp_path / "g16.png"))[0])
    assert out[0, :6, 0].tolist() == [0, 0, 1, 15, 128, 255]  # >>8; clipping would give 255 from 256 upward
    assert (out[..., 0] == out[..., 2]).all()


def test_sixteen_bit_rgb_png_keeps_the_high_byte(tmp_path):
    rgb16 = np.zeros((40, 40, 3), dtype=np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 0x1234, 0x8000, 0xFFFF
    _png16_rgb(tmp_path / "c16.png", rgb16)
    out = np.asarray(load_rgb(str(tmp_path / "c16.png"))[0])
    assert out[0, 0].tolist() == [0x12, 0x80, 0xFF]


def test_int32_mode_with_eight_bit_values_is_not_darkened():
    arr = np.full((40, 40), 200, dtype=np.int32)
    out = np.asarray(to_rgb8(Image.fromarray(arr, "I")))
    assert (out == 200).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_over_black(mode):
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:, :20, 3] = 255   # opaque left half keeps its colour
    rgba[:, 20:, 3] = 51    # 20% alpha -> 200 * 51 // 255 = 40
    img = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        img = img.convert("LA")
    out = np.asarray(to_rgb8(img))
    assert (out[:, :20] == 200).all() and (out[:, 20:] == 40).all()


def test_palette_with_transparency_and_bilevel():
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    pal.paste(0, (0, 0, 20, 40))
    pal.info["transparency"] = 1  # the red index is transparent -> black
    assert (np.asarray(to_rgb8(pal)) == 0).all()
    del pal.info["transparency"]
    assert np.asarray(to_rgb8(pal))[0, 30].tolist() == [250, 10, 10]
    bilevel = Image.new("1", (40, 40), 1)
    assert (np.asarray(to_rgb8(bilevel)) == 255).all()


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (48, 48), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)  # pure red in CMYK
    img, _ = load_rgb(str(tmp_path / "c.jpg"))
    r, g, b = np.asarray(img).reshape(-1, 3).mean(0)
    assert img.mode == "RGB" and r > 240 and g < 15 and b < 15


# ------------------------------------------------------------------------------------------------ rejections
@pytest.mark.parametrize("case,reason", [
    ("empty", "empty file"),
    ("text", "not a recognised image"),
    ("trunc_png", "truncated"),
    ("trunc_jpg", "truncated"),
    ("tiny", "too small: 10x10"),
    ("missing", "cannot read file"),
])
def test_unusable_files_raise_image_error_with_reason(tmp_path, case, reason):
    path = tmp_path / f"{case}.png"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("id_code,diagnosis\nnot,an image\n")
    elif case in ("trunc_png", "trunc_jpg"):
        full = tmp_path / ("full.png" if case == "trunc_png" else "full.jpg")
        noise = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
        Image.fromarray(noise).save(full)
        data = full.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "tiny":
        Image.new("RGB", (10, 10), (100, 50, 20)).save(path)
    with pytest.raises(ImageError, match=reason) as info:
        load_rgb(str(path))
    assert isinstance(info.value, DataError)


def test_decompression_bomb_guard_stays_on(tmp_path, monkeypatch):
    Image.new("RGB", (200, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)   # 40k px: warning zone (> MAX, < 2*MAX)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_rgb(str(tmp_path / "big.png"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50 * 50)     # error zone
    with pytest.raises(ImageError, match="decompression bomb"):
        load_rgb(str(tmp_path / "big.png"))


# ------------------------------------------------------------------------------------------------ geometry
def test_fundus_box_finds_the_disc_despite_noise_and_specks():
    rng = np.random.default_rng(0)
    img = np.asarray(_disc(600, 400, box=(150, 40, 470, 360))).copy()
    border = img.sum(2) == 0
    img[border] = rng.integers(0, 9, (border.sum(), 3))   # JPEG-like noise in the black border
    img[5:8, 5:8] = 255                                   # a 3x3 white speck in the corner
    box = fundus_box(Image.fromarray(img))
    # analysis runs on a ~256 px copy, blurred: the edge may move by ~2 blur radii + 1 px of that copy
    tol = (2 * image_ops.CROP_BLUR_RADIUS + 1) * 600 / image_ops.CROP_ANALYSIS_SIDE
    assert box is not None
    for got, want in zip(box, (150, 40, 471, 361)):
        assert abs(got - want) <= tol, (box, "vs", (150, 40, 471, 361))


def test_crop_keeps_whole_image_when_nothing_found():
    black = Image.new("RGB", (90, 70))
    assert fundus_box(black) is None
    assert crop_fundus(black).size == (90, 70)


def test_crop_removes_the_border():
    out = crop_fundus(_disc(300, 200, box=(100, 20, 260, 180)))
    assert abs(out.size[0] - 161) <= 6 and abs(out.size[1] - 161) <= 6


@pytest.mark.parametrize("size_in,target,want", [((300, 200), 100, (150, 100)), ((200, 300), 100, (100, 150)),
                                                 ((50, 40), 80, (100, 80)), ((128, 128), 128, (128, 128))])
def test_resize_short_side_keeps_aspect(size_in, target, want):
    assert resize_short_side(Image.new("RGB", size_in), target).size == want


def test_ben_graham_flattens_background_and_amplifies_local_detail():
    img = Image.new("RGB", (128, 128), (150, 80, 40))
    ImageDraw.Draw(img).ellipse((60, 60, 67, 67), fill=(90, 40, 20))   # a small dark lesion at the centre
    out = np.asarray(ben_graham(img, 128)).astype(int)
    assert np.abs(out[30, 64] - 128).max() <= 2          # flat area -> neutral grey, whatever its colour
    # 4*(x - local mean): the lesion centre lands at least 2x its contrast below grey, per channel
    assert (out[64, 64] < 128 - 2 * np.array([60, 40, 20])).all()
    assert (out[1, 1] == 128).all() and (out[126, 2] == 128).all()   # outside the circular mask


def test_prepare_image_decodes_big_jpeg_at_reduced_scale(tmp_path):
    _disc(1600, 1200, box=(200, 0, 1400, 1200)).save(tmp_path / "big.jpg", quality=90)
    out = prepare_image(str(tmp_path / "big.jpg"), 128)
    assert min(out.size) == 128 and out.mode == "RGB"
    img, orig = load_rgb(str(tmp_path / "big.jpg"), draft_short_side=256)
    assert orig == (1600, 1200) and min(img.size) >= 256 and img.size[0] < 1600   # DCT-scaled decode
