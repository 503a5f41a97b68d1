"""The records a run trains on: a data set read and checked (every image header opened once), or a synthetic
table for ``data.backend: synthetic`` without a data set."""
from __future__ import annotations

import logging
from pathlib import Path

from data_pipeline.readers import detect_format, read_dataset
from data_pipeline.records import APTOS_COUNTS, DataError, Record
from data_pipeline.settings import DataSettings

log = logging.getLogger(__name__)


def synthetic_records(n: int, num_classes: int) -> list[Record]:
    """Fake table for `data.backend: synthetic` without a data set: APTOS-like imbalance, no files."""
    props = list(APTOS_COUNTS[:num_classes]) if num_classes <= len(APTOS_COUNTS) else [1] * num_classes
    total = sum(props)
    out, i = [], 0
    for k, p in enumerate(props):
        for _ in range(max(3, round(n * p / total))):
            out.append(Record(path="", label=k, source_id=f"synthetic_{i:06d}"))
            i += 1
    return out


def check_image_headers(records: list[Record], *, skip_bad: bool) -> list[Record]:
    """Open every image's header (no pixel decode: ~0.1 ms each) before training starts.

    A zero-byte or non-image file in the test split would otherwise surface only at the final evaluation, after
    the whole run; here every such file is named at once (or dropped with a warning under data.skip_bad).
    """
    from PIL import Image, UnidentifiedImageError

    bad = []
    for r in records:
        try:
            with Image.open(r.path) as im:
                im.size  # noqa: B018 -- parsing the header is the check
        except (OSError, UnidentifiedImageError, ValueError) as e:
            bad.append((r, str(e).split("\n")[0]))
    if not bad:
        return records
    listing = "\n".join(f"  {r.path} (id {r.source_id!r}): {why}" for r, why in bad[:50])
    more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
    if not skip_bad:
        raise DataError(f"{len(bad)} unreadable image(s):\n{listing}{more}\n(run `metaloss prepare` to quarantine "
                        "them, or set data.skip_bad=true to train without them)")
    log.warning("skipping %d unreadable image(s) (data.skip_bad):\n%s%s", len(bad), listing, more)
    dropped = {id(r) for r, _ in bad}
    return [r for r in records if id(r) not in dropped]


def load_records(settings: DataSettings) -> list[Record]:
    """Every usable record of the data set the settings name (validated rows, readable image headers)."""
    if settings.backend == "synthetic" and not settings.root:
        return synthetic_records(settings.synthetic_samples, settings.num_classes)
    if not settings.root:
        raise DataError("config key 'data.root' is empty: point it at a data set (or use data.backend=synthetic)")
    if not Path(settings.root).exists():
        raise DataError(f"config key 'data.root': {settings.root} not found (point it at a data set directory, e.g. "
                        "data.root=demo_data/synthetic)")
    fmt = settings.format if settings.format != "auto" else detect_format(settings.root)
    records = read_dataset(fmt, settings.root, num_classes=settings.num_classes, path_col=settings.path_col,
                           label_col=settings.label_col, skip_bad=settings.skip_bad)
    if settings.backend == "synthetic":
        return records
    return check_image_headers(records, skip_bad=settings.skip_bad)
