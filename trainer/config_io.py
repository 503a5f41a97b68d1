"""Reading a YAML file, writing a resolved config and comparing two (resume safety): plain dicts and YAML, no config
classes needed."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml


def read_yaml(path: str | Path, error: type[Exception], what: str) -> Any:
    """The content of a YAML file (``{}`` when empty), or ``error`` in one line naming the file: ``what`` (e.g.
    "config file") not found, or not valid YAML."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None


def save_config(cfg, path: str | Path, comment: str | None = None) -> None:
    """``cfg``: a ``trainer.config.Config``. ``comment``: a header line (how the run was launched) that loading the
    file ignores."""
    header = f"# {comment}\n" if comment else ""
    Path(path).write_text(header + yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def diff_configs(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two config dicts (for resume safety)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(diff_configs(a, b, dotted + "."))
        elif a != b:
            out.append((dotted, a, b))
    return out
