"""Name -> builder tables without importing the builders: a table maps a config name to ``"module:attribute"``.

The tables live in small dependency-free modules, so the config (choices, validation) and the CLI (argument
choices) read the names without importing torch, and the builder's module is imported only when it is used.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping


def load(table: Mapping[str, str], name: str) -> Any:
    """The object registered under ``name`` (``"pkg.module:attr"``), imported now."""
    module, _, attr = table[name].partition(":")
    return getattr(importlib.import_module(module), attr)
