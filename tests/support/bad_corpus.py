"""A bad-input corpus in every supported dataset layout, and what the pipeline must do with each case.

`make_bad_corpus(root, layout)` writes one data set that mixes good synthetic fundus images with every kind of bad
input we have met in real DR data sets, and returns an :class:`Expectations` saying, case by case, what must
happen to it:

    case            file                                   expected outcome
    good_*          3 synthetic fundus images per class    in the manifest
    gray            8-bit grey, in the layout's format     converted: (v, v, v)
    rgba            RGBA PNG, transparent border           converted: alpha composited over black
    png16           16-bit grey PNG 0xABCD                 converted: high byte 0xAB
    png16rgb        48-bit RGB PNG                         converted: high byte of every channel
    cmyk            CMYK JPEG                              converted: (255-c)(255-k)/255 per channel
    trunc_png       PNG cut in half                        quarantined by prepare ("truncated")
    trunc_jpg       JPEG cut in half                       quarantined by prepare ("truncated")
    zero_bytes      0-byte file                            quarantined by prepare ("empty file")
    text_as_png     a text file with an image extension    quarantined by prepare ("not a recognised image")
    tiny            10x10 image                            quarantined by prepare ("too small")
    missing         listed, no file                        rejected by the reader ("image not found")
    label7          label 7                                rejected by the reader ("label 7 outside 0..4")
    labeltwo        label "two"                            rejected by the reader ("not an integer")
    nolabel         empty label                            rejected by the reader ("empty label")
    <dup>           good_00 listed a second time           rejected by the reader ("duplicate id")

Every file prepare quarantines is also refused, with the same reason, by the raw-layout training loader.

The label file itself is written with a UTF-8 BOM and CRLF line ends, and (where the layout has a header) extra
columns, one of them a quoted field with a comma -- all of which must parse. PNG-only cases are left out of IDRiD
(its reader only indexes .jpg files, as the real data set has nothing else). DDR label files have no header, so
"extra columns" there is a bad row of its own.

Two more data sets cannot live inside the main one: `make_empty_label_file` (a label file with no rows) and
`make_singleton_class` (a class with one sample, which the stratified split must refuse, naming the class).
No pytest import: this is a plain generator the tests call.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.synth import render_fundus

LAYOUTS = ("aptos", "eyepacs", "csv", "ddr", "idrid", "messidor2")
GOOD_PER_CLASS = 3
IMAGE_SIDE = 64          # >= image_ops.MIN_SIDE (32) so good images are kept; tiny stays below it
NUM_CLASSES = 5

# Flat colours for the convertible cases: a flat image survives crop, resize and JPEG q95 within a grey level or
# two, so the prepared pixel can be compared with a value computed by hand from the source pixel.
GRAY_LEVEL = 0x60
RGBA_COLOR, RGBA_ALPHA = (200, 100, 50), 200
PNG16_LEVEL = 0xABCD
PNG16_RGB = (0x1234, 0x8899, 0xFEDC)
CMYK_COLOR = (32, 128, 192, 64)


@dataclass(frozen=True)
class RowProblem:
    """A label-file row the reader must reject: where it is and a substring of the reason it must give."""
    source_id: str
    line: int
    reason: str


@dataclass(frozen=True)
class ImageProblem:
    """A listed, existing file that `prepare` must quarantine and the raw-layout loader must refuse."""
    source_id: str
    path: Path
    reason: str


@dataclass
class Expectations:
    layout: str
    src: Path                                   # what to give read_dataset / `prepare --src`
    label_file: Path                            # the CSV / TXT the rows are in
    good: dict[str, int] = field(default_factory=dict)       # source_id -> label: must be in the manifest
    converted: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # source_id -> expected RGB
    files: dict[str, Path] = field(default_factory=dict)     # source_id -> image file, for every case that has one
    bad_rows: list[RowProblem] = field(default_factory=list)
    bad_images: list[ImageProblem] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ image bytes
def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _fundus(grade: int, seed: int) -> Image.Image:
    return Image.fromarray(render_fundus(grade, IMAGE_SIDE, np.random.default_rng([seed, grade])))


def png16_rgb_bytes(rgb16: tuple[int, int, int], side: int) -> bytes:
    """A flat 48-bit RGB PNG written by hand (Pillow cannot write 16-bit-per-channel colour)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + struct.pack(">3H", *rgb16) * side   # filter byte 0 (none), then big-endian samples
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * side))
            + chunk(b"IEND", b""))


def _rgba_bytes() -> bytes:
    arr = np.zeros((IMAGE_SIDE, IMAGE_SIDE, 4), np.uint8)
    border = IMAGE_SIDE // 5
    arr[border:-border, border:-border] = (*RGBA_COLOR, RGBA_ALPHA)   # transparent border, half-opaque centre
    return _encode(Image.fromarray(arr, "RGBA"), "PNG")


def _expected_over_black(rgb, alpha) -> tuple[int, int, int]:
    return tuple(c * alpha // 255 for c in rgb)  # type: ignore[return-value]


def _expected_cmyk(cmyk) -> tuple[int, int, int]:
    c, m, y, k = cmyk
    return tuple(round((255 - v) * (255 - k) / 255) for v in (c, m, y))  # type: ignore[return-value]


@dataclass(frozen=True)
class _Case:
    name: str
    ext: str                  # "png" or "jpg": the real format of the bytes (text_as_png lies, on purpose)
    label: str                # label text as written in the label file
    data: bytes | None        # None: the file is not created
    kind: str                 # good | converted | image | row
    reason: str = ""
    rgb: tuple[int, int, int] | None = None


def _cases(png_ok: bool, img_ext: str) -> list[_Case]:
    """Every case in label-file order. `png_ok`: the layout can list PNG files (all but IDRiD); `img_ext`: the
    format of the layout's ordinary images (png or jpg)."""
    enc = "PNG" if img_ext == "png" else "JPEG"
    cases = []
    for k in range(NUM_CLASSES):
        for j in range(GOOD_PER_CLASS):
            i = k * GOOD_PER_CLASS + j
            img = _fundus(k, seed=i)
            cases.append(_Case(f"good_{i:02d}", img_ext, str(k), _encode(img, enc), "good"))
    ref = _fundus(2, seed=99)
    gray = Image.new("L", (IMAGE_SIDE, IMAGE_SIDE), GRAY_LEVEL)
    cases.append(_Case("gray", img_ext, "0", _encode(gray, enc), "converted",
                       rgb=(GRAY_LEVEL,) * 3))
    if png_ok:
        png16 = Image.fromarray(np.full((IMAGE_SIDE, IMAGE_SIDE), PNG16_LEVEL, np.uint16))
        cases += [
            _Case("rgba", "png", "1", _rgba_bytes(), "converted", rgb=_expected_over_black(RGBA_COLOR, RGBA_ALPHA)),
            _Case("png16", "png", "2", _encode(png16, "PNG"), "converted", rgb=(PNG16_LEVEL >> 8,) * 3),
            _Case("png16rgb", "png", "3", png16_rgb_bytes(PNG16_RGB, IMAGE_SIDE), "converted",
                  rgb=tuple(v >> 8 for v in PNG16_RGB)),
        ]
    cmyk = Image.new("CMYK", (IMAGE_SIDE, IMAGE_SIDE), CMYK_COLOR)
    cases.append(_Case("cmyk", "jpg", "4", _encode(cmyk, "JPEG", quality=95), "converted",
                       rgb=_expected_cmyk(CMYK_COLOR)))
    if png_ok:
        full = _encode(ref, "PNG")
        cases.append(_Case("trunc_png", "png", "1", full[: len(full) // 2], "image", "truncated"))
    full = _encode(ref, "JPEG", quality=95)
    cases += [
        _Case("trunc_jpg", "jpg", "2", full[: len(full) // 2], "image", "truncated"),
        _Case("zero_bytes", img_ext, "3", b"", "image", "empty file"),
        _Case("text_as_png" if png_ok else "text_as_jpg", "png" if png_ok else "jpg", "0",
              b"id_code,diagnosis\nthis is a CSV someone saved with an image name\n", "image",
              "not a recognised image"),
        _Case("tiny", img_ext, "4", _encode(ref.resize((10, 10)), enc), "image", "too small"),
        _Case("missing", img_ext, "1", None, "row", "image"),   # "image not found" / "image 'missing' not found"
        _Case("label7", img_ext, "7", _encode(ref, enc), "row", "label 7 outside 0..4"),
        _Case("labeltwo", img_ext, "two", _encode(ref, enc), "row", "label 'two' is not an integer"),
        _Case("nolabel", img_ext, "", _encode(ref, enc), "row", "empty label"),
    ]
    return cases


# ------------------------------------------------------------------------------------------------ label files
def _write_label_file(path: Path, lines: list[str]) -> None:
    """UTF-8 with a BOM and CRLF line ends: what Excel on Windows writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\ufeff" + "".join(line + "\r\n" for line in lines)).encode("utf-8"))


@dataclass(frozen=True)
class _Layout:
    """Where a layout keeps its label file and images, and how a row names an image.

    naming: "bare" -- the row holds the stem and the reader adds `default_ext` (APTOS .png, EyePACS .jpeg); a file
    of another format is listed with its extension, which those readers accept. "ext" -- the row holds the file
    name (DDR, Messidor-2). "stem" -- the row holds the stem, the file is <stem>.jpg (IDRiD). "path" -- the row
    holds a path relative to the CSV (generic csv layout)."""
    label_file: str
    image_dir: str
    header: str | None       # None: no header row, "name label" lines (DDR)
    extra: str               # trailing cells after the label (gradable flag for Messidor-2, then extra columns)
    naming: str
    img_ext: str             # format of the layout's ordinary images
    default_ext: str = ""    # "bare" naming: the extension the reader appends
    png_ok: bool = True

    def listed(self, case: _Case) -> str:
        """The text naming the case's image in the label file (= its source_id after reading)."""
        if self.naming == "bare":
            return case.name if case.ext == self.img_ext else f"{case.name}.{case.ext}"
        if self.naming == "path":
            return f"{self.image_dir}/{case.name}.{case.ext}"
        return case.name if self.naming == "stem" else f"{case.name}.{case.ext}"

    def file_name(self, case: _Case) -> str:
        if self.naming == "bare" and case.ext == self.img_ext:
            return f"{case.name}.{self.default_ext}"
        return f"{case.name}.{case.ext}"

    def row(self, listed: str, label: str) -> str:
        if self.header is None:
            return f"{listed} {label}".rstrip()
        name = f'"{listed}"' if "," in listed else listed
        return f"{name},{label},{self.extra}"


_EXTRA = 'left,"ok, checked"'   # a quoted comma in an extra column must not shift the columns that matter
_LAYOUTS = {
    "aptos": _Layout("train.csv", "train_images", "id_code,diagnosis,eye,comment", _EXTRA, "bare", "png", "png"),
    "eyepacs": _Layout("trainLabels.csv", "train", "image,level,eye,comment", _EXTRA, "bare", "jpg", "jpeg"),
    "csv": _Layout("labels.csv", "imgs", "path,label,eye,comment", _EXTRA, "path", "png"),
    "ddr": _Layout("DR_grading/train.txt", "DR_grading/train", None, "", "ext", "jpg"),
    "idrid": _Layout("2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv",
                     "1. Original Images/a. Training Set", "Image name,Retinopathy grade,Risk of macular edema ",
                     "0", "stem", "jpg", png_ok=False),
    "messidor2": _Layout("messidor_data.csv", "IMAGES",
                         "image_id,adjudicated_dr_grade,adjudicated_gradable,diabetic_macular_edema", "1,0",
                         "ext", "png"),
}


def _spec(layout: str) -> _Layout:
    if layout not in _LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    return _LAYOUTS[layout]


def make_bad_corpus(root: str | Path, layout: str) -> Expectations:
    """Write the bad-input corpus for `layout` under `root`; return what each case must turn into."""
    spec = _spec(layout)
    root = Path(root).resolve()
    image_dir = root / spec.image_dir
    image_dir.mkdir(parents=True, exist_ok=True)
    exp = Expectations(layout, root, root / spec.label_file)
    lines = [spec.header] if spec.header else []

    def add(line: str) -> int:
        lines.append(line)
        return len(lines)   # 1-based line number of the row just added

    line_of: dict[str, int] = {}
    for case in _cases(spec.png_ok, spec.img_ext):
        listed = spec.listed(case)
        path = image_dir / spec.file_name(case)
        if case.data is not None:
            path.write_bytes(case.data)
            exp.files[listed] = path
        line = line_of[listed] = add(spec.row(listed, case.label))
        if case.kind in ("good", "converted"):
            exp.good[listed] = int(case.label)
            if case.rgb is not None:
                exp.converted[listed] = case.rgb
        elif case.kind == "image":
            exp.bad_images.append(ImageProblem(listed, path, case.reason))
        else:
            exp.bad_rows.append(RowProblem(listed, line, case.reason))
    # the first good image listed again (a re-exported sheet): the reader keeps the first row, rejects the copy
    dup = next(iter(exp.good))
    exp.bad_rows.append(RowProblem(dup, add(spec.row(dup, str(exp.good[dup]))),
                                   f"duplicate id (first seen on line {line_of[dup]})"))
    if layout == "ddr":   # no header, so "extra columns" is a malformed row of its own
        exp.bad_rows.append(RowProblem("extra_cols.jpg", add("extra_cols.jpg 1 left"), "expected 'name label'"))
    if layout == "messidor2":   # ungradable rows belong to the data set's definition: dropped, not errors
        (image_dir / "ungradable.png").write_bytes(_encode(_fundus(0, seed=7), "PNG"))
        add("ungradable.png,0,0,0")
    _write_label_file(exp.label_file, lines)
    return exp


# --------------------------------------------------------------------------------------------- other data sets
def make_empty_label_file(root: str | Path, layout: str, *, header: bool = True) -> Path:
    """A layout whose label file has no data rows (header only; 0 bytes with header=False or for DDR), with one
    image present so that emptiness is the only problem. Returns the label file the error must name."""
    spec = _spec(layout)
    root = Path(root).resolve()
    good = _cases(spec.png_ok, spec.img_ext)[0]
    (root / spec.image_dir).mkdir(parents=True, exist_ok=True)
    (root / spec.image_dir / spec.file_name(good)).write_bytes(good.data)
    label_file = root / spec.label_file
    label_file.parent.mkdir(parents=True, exist_ok=True)
    label_file.write_bytes(f"{spec.header}\r\n".encode() if header and spec.header else b"")
    return label_file


def make_singleton_class(root: str | Path, layout: str, lonely: int = 3) -> Path:
    """Good images only: GOOD_PER_CLASS per class, except class `lonely`, which has exactly one. Returns src."""
    spec = _spec(layout)
    root = Path(root).resolve()
    (root / spec.image_dir).mkdir(parents=True, exist_ok=True)
    lines = [spec.header] if spec.header else []
    kept: set[int] = set()
    for case in _cases(spec.png_ok, spec.img_ext):
        label = int(case.label) if case.label.isdigit() else -1
        if case.kind != "good" or (label == lonely and label in kept):
            continue
        kept.add(label)
        (root / spec.image_dir / spec.file_name(case)).write_bytes(case.data)
        lines.append(spec.row(spec.listed(case), case.label))
    _write_label_file(root / spec.label_file, lines)
    return root
