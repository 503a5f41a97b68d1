"""Atomic file writes: a temp file in the target's folder, renamed over the target only once it is complete.

A kill at any moment leaves either the old file or the new one, never half of one (os.replace is atomic within a
file system, hence the temp file in the same folder). Used for every output a later step trusts: images, labels,
manifests, reports, splits, metrics.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """``with atomic_write(p) as f: ...`` -- text mode writes UTF-8 with newline="" (what the csv module wants).

    On failure the temp file is removed and the target left as it was. An OSError is re-raised naming ``path``:
    the ENOSPC of a full disk comes from ``write()``, which names no file, and the user needs to know which output
    could not be written.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        text = {} if "b" in mode else {"newline": "", "encoding": "utf-8"}
        with os.fdopen(fd, mode, **text) as f:
            yield f
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
