"""The data layer: read a data set, split it, and stream batches to the trainer through one contract.

Public API (imported lazily, PEP 562: ``import data_pipeline.prepare`` / ``data_pipeline.synth`` must not pay for
torch, and the trainer pays only for the backend it uses):

* contract: ``Batch``, ``Streams``, ``TrainStream``, ``EndlessStream`` (:mod:`data_pipeline.types`);
* settings: ``DataSettings``, ``AugmentSpec`` (:mod:`data_pipeline.settings`);
* streams: ``build_streams``, ``resolve_backend`` (:mod:`data_pipeline.factory`);
* records: ``Record``, ``DataError``, ``class_names``, ``load_records`` (:mod:`data_pipeline.records`,
  :mod:`data_pipeline.dataset`); ``read_dataset``, ``detect_format`` (:mod:`data_pipeline.readers`);
* splits: ``load_or_make_splits``, ``make_splits`` (:mod:`data_pipeline.splits`).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Batch": "data_pipeline.types", "Streams": "data_pipeline.types", "TrainStream": "data_pipeline.types",
    "EndlessStream": "data_pipeline.types",
    "DataSettings": "data_pipeline.settings", "AugmentSpec": "data_pipeline.settings",
    "build_streams": "data_pipeline.factory", "resolve_backend": "data_pipeline.factory",
    "Record": "data_pipeline.records", "DataError": "data_pipeline.records",
    "class_names": "data_pipeline.records",
    "load_records": "data_pipeline.dataset",
    "read_dataset": "data_pipeline.readers", "detect_format": "data_pipeline.readers",
    "load_or_make_splits": "data_pipeline.splits", "make_splits": "data_pipeline.splits",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
