"""The data set layouts by name (``data.format``, ``metaloss prepare --dataset``): name -> its reader's ``read``.

A reader is one module with ``read(root: Path, opts: dict) -> list[Candidate]`` (``opts``: path_col, label_col);
the shared validator in ``candidates.py`` checks what it returns. A new layout is that module plus one line here
(and, if it can be recognised from its files, one rule in ``factory.detect_format``). The config's choices and the
CLI's ``--dataset`` choices follow from this table. The order is the order error messages list the formats in.
"""
from __future__ import annotations

READERS: dict[str, str] = {
    "aptos": "data_pipeline.readers.aptos:read",
    "eyepacs": "data_pipeline.readers.eyepacs:read",
    "csv": "data_pipeline.readers.generic_csv:read",
    "ddr": "data_pipeline.readers.ddr:read",
    "idrid": "data_pipeline.readers.idrid:read",
    "messidor2": "data_pipeline.readers.messidor2:read",
    "prepared": "data_pipeline.readers.prepared:read",
}
FORMATS: tuple[str, ...] = tuple(READERS)
# the raw layouts `metaloss prepare` converts (a prepared dir is its output, not an input), the generic CSV layout
# last: the order `metaloss prepare --dataset` has always listed its choices in (help text and usage errors)
RAW_FORMATS: tuple[str, ...] = tuple(sorted((f for f in FORMATS if f != "prepared"), key=lambda f: f == "csv"))
