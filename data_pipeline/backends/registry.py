"""The stream backends by name (``data.backend``): each entry builds train / meta / eval streams.

A builder is ``build(settings: DataSettings, splits, rank, world, device=None) -> Streams`` (contract in
``data_pipeline/types.py``). A new backend is one module with such a builder and one line here; the config's
choices, its validation and the factory follow from this table. Torch-free on purpose (the config imports it).
"""
from __future__ import annotations

BACKENDS: dict[str, str] = {
    "dali": "data_pipeline.backends.dali.streams:build_dali_streams",
    "torch": "data_pipeline.backends.torch_backend:build_torch_streams",
    "synthetic": "data_pipeline.backends.synthetic:build_synthetic_streams",
}

# data.dali_sharding: DALI's own reader sharding (default) or explicit per-epoch file lists (see dali/streams.py)
DALI_SHARDING: tuple[str, ...] = ("reader", "explicit")
