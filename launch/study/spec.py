"""The study file and the runs it expands to.

A study file (YAML)::

    name: demo                      # optional; default: the file's stem
    base: configs/demo.yaml         # the config every run starts from
    out: runs/study_demo            # optional; default runs/<name>; `--out` wins
    set: {train.epochs: 2}          # overrides for every run (dotted config keys)
    grid:                           # every combination is a cell
      train.loss: [ce, meta]
      train_fraction: [0.5, 1.0]    # short for data.train_fraction
    seeds: [0, 1]                   # train.seed; every cell runs every seed
    world_sizes: [1]                # processes per run (torchrun / accelerate launch for > 1)
    split_seed: 0                   # data.split_seed: one train/meta/test split for every run
    metric: macro_f1                # headline metric of the report (a key of metrics.json's test block)
    selection:                      # optional: choose each method's settings on the select split
      metric: macro_f1              #   (launch/study/selection.py; data.split_fractions needs 4 entries)
      tune: [optim.lr]              #   grid keys that are settings of a method, chosen per cell and seed

A run is (cell, seed); a cell is one value per grid key plus a world size. Run names are derived from the values
alone, so the same study file always maps a run to the same run dir -- that is what makes a re-run resume.
A cell that differs from another only in keys its loss does not read (``meta.lr`` for ce, ...) is not run twice:
see trainer/comparison/relevance.py.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.comparison.relevance import redundant_cell
from trainer.comparison.selection import LOSS_KEY
from trainer.config import ConfigError, load_config
from trainer.config_io import read_yaml

FRACTION_KEY = "data.train_fraction"
_ALIASES = {"train_fraction": FRACTION_KEY}
_TOP_KEYS = ("name", "base", "out", "set", "grid", "seeds", "world_sizes", "split_seed", "metric", "selection")
# keys the study itself owns: a grid or `set` entry for them would silently fight the study's own value
_OWNED = ("train.seed", "run.name", "run.out_dir", "data.split_seed")
# recall of each grade (0-4 on the DR scale; a data set with fewer classes leaves the rest empty): the rare grades
# 3 (severe) and 4 (proliferative) are the ones plain training misses and meta-reweighting claims to recover
GRADE_RECALLS = tuple(f"recall_{k}" for k in range(5))
METRICS = ("accuracy", "macro_f1", "weighted_f1", "qwk", "referable_auc", "referable_sensitivity",
           "referable_specificity", "sens_at_spec90", "sens_at_spec95", "auc_macro", "ece", *GRADE_RECALLS)


class StudyError(ConfigError):
    """A study file problem: names the file and the key (exit 2 through launch.errors, as a ConfigError)."""


@dataclass(frozen=True)
class RunSpec:
    cell: tuple[tuple[str, Any], ...]   # (dotted key, value) per grid key, in the file's order
    world_size: int
    seed: int
    name: str
    control_of: str = ""  # the CE control of this run name (launch/study/selection.py)

    @property
    def cell_name(self) -> str:
        return self.name.rsplit("__seed", 1)[0]


@dataclass
class Study:
    path: Path
    name: str
    base: Path
    out: Path
    fixed: dict[str, Any]
    grid: dict[str, list]
    seeds: list[int]
    world_sizes: list[int]
    split_seed: int
    metric: str
    runs: list[RunSpec] = field(default_factory=list)
    selection: "Selection | None" = None  # the file's 'selection' section (launch/study/selection.py)

    @property
    def runs_dir(self) -> Path:
        return self.out / "runs"

    @property
    def state_dir(self) -> Path:
        return self.out / "study"

    def overrides(self, run: RunSpec) -> list[str]:
        """`key=value` arguments of one run (after the base config), values as YAML so lists survive."""
        values = {**self.fixed, **dict(run.cell), "train.seed": run.seed, "data.split_seed": self.split_seed,
                  "run.out_dir": str(self.runs_dir), "run.name": run.name}
        return [f"{k}={_yaml_scalar(v)}" for k, v in values.items()]


def _yaml_scalar(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value)).strip("-") or "x"


def _short_names(keys: list[str]) -> dict[str, str]:
    """`train.loss` -> `loss` unless two grid keys share the last part (`optim.lr`, `meta.lr`): then the full key."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k.replace(".", "-")) for k, s in zip(keys, last)}


def _list_of(data: dict, key: str, kind, default, where: str) -> list:
    value = data.get(key, default)
    if not isinstance(value, list) or not value or not all(isinstance(v, kind) and not isinstance(v, bool)
                                                           for v in value):
        raise StudyError(f"{where}: '{key}' must be a non-empty list of {kind.__name__}s, got {value!r}")
    if len(set(value)) != len(value):
        raise StudyError(f"{where}: '{key}' lists a value twice: {value}")
    return value


def load_study(path: str | Path, out: str | Path | None = None) -> Study:
    path = Path(path)
    data = read_yaml(path, StudyError, "study file")
    if not isinstance(data, dict):
        raise StudyError(f"{path}: a study file is a mapping with keys {', '.join(_TOP_KEYS)}")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {unknown} (known: {', '.join(_TOP_KEYS)})")
    if "base" not in data:
        raise StudyError(f"{path}: missing key 'base' (the config every run starts from)")
    base = Path(str(data["base"]))
    if not base.is_file() and (path.parent / base).is_file():
        base = path.parent / base
    name = str(data.get("name") or path.stem)
    fixed = data.get("set") or {}
    grid = data.get("grid") or {}
    for key, value in (("set", fixed), ("grid", grid)):
        if not isinstance(value, dict):
            raise StudyError(f"{path}: '{key}' must be a mapping of dotted config keys, got {value!r}")
    fixed = {_ALIASES.get(k, k): v for k, v in fixed.items()}
    grid = {_ALIASES.get(k, k): v for k, v in grid.items()}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise StudyError(f"{path}: grid key '{key}' must be a non-empty list of values, got {values!r}")
    for key in (*fixed, *grid):
        if key in _OWNED:
            raise StudyError(f"{path}: '{key}' is set by the study itself (use 'seeds' / 'split_seed' / --out)")
        if key in fixed and key in grid:
            raise StudyError(f"{path}: '{key}' is both in 'set' and in 'grid'")
    split_seed = data.get("split_seed", 0)
    if not isinstance(split_seed, int) or isinstance(split_seed, bool):
        raise StudyError(f"{path}: 'split_seed' must be an integer, got {split_seed!r}")
    metric = str(data.get("metric", "macro_f1"))
    if metric not in METRICS:
        raise StudyError(f"{path}: 'metric' must be one of {', '.join(METRICS)}, got {metric!r}")
    world_sizes = _list_of(data, "world_sizes", int, [1], str(path))
    if any(w < 1 for w in world_sizes):
        raise StudyError(f"{path}: 'world_sizes' must be >= 1, got {world_sizes}")
    study = Study(path=path, name=name, base=base, out=Path(out or data.get("out") or Path("runs") / name),
                  fixed=fixed, grid=grid, seeds=_list_of(data, "seeds", int, [0], str(path)),
                  world_sizes=world_sizes, split_seed=split_seed, metric=metric)
    study.selection = parse_selection(data.get("selection"), grid, str(path))
    study.runs = expand_runs(study)
    check_configs(study)
    return study


def expand_runs(study: Study) -> list[RunSpec]:
    """Cells in the file's order (grid keys vary last-key-fastest, then world size), every seed of a cell together."""
    keys = list(study.grid)
    short = _short_names(keys)
    runs = []
    for values in itertools.product(*(study.grid[k] for k in keys)):
        if redundant_cell(dict(zip(keys, values)), study.grid, study.fixed.get(LOSS_KEY)):
            continue  # trains what an earlier cell trains: its loss ignores a key this cell varies
        for ws in study.world_sizes:
            parts = [f"{short[k]}-{_slug(v)}" for k, v in zip(keys, values)] + [f"ws{ws}"]
            for seed in study.seeds:
                runs.append(RunSpec(cell=tuple(zip(keys, values)), world_size=ws, seed=seed,
                                    name="_".join(parts) + f"__seed{seed}"))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise StudyError(f"{study.path}: grid values map to the same run name {dup[:3]}: make the values distinct")
    return runs


def check_configs(study: Study) -> None:
    """Build every run's config before anything runs: a bad key fails the study at once, naming the run."""
    if not study.base.is_file():
        raise StudyError(f"{study.path}: base config not found: {study.base}")
    for run in study.runs:
        try:
            cfg = load_config(study.base, study.overrides(run))
        except ConfigError as e:
            raise StudyError(f"{study.path}: run {run.name}: {e}") from None
        check_select_split(study, cfg, run)


# --- the `selection` section (choosing settings on the select split; used by launch/study/selection.py) ---


@dataclass(frozen=True)
class Selection:
    metric: str
    tune: tuple[str, ...]
    controls: bool = True


def parse_selection(data, grid: dict, where: str) -> Selection | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise StudyError(f"{where}: 'selection' must be a mapping with keys metric, tune, controls")
    unknown = sorted(set(data) - {"metric", "tune", "controls"})
    if unknown:
        raise StudyError(f"{where}: unknown key(s) {unknown} under 'selection' (known: metric, tune, controls)")
    metric = str(data.get("metric", "macro_f1"))
    if metric not in METRICS:
        raise StudyError(f"{where}: 'selection.metric' must be one of {', '.join(METRICS)}, got {metric!r}")
    tune = data.get("tune") or []
    if not isinstance(tune, list) or not all(isinstance(k, str) for k in tune):
        raise StudyError(f"{where}: 'selection.tune' must be a list of grid keys, got {tune!r}")
    missing = [k for k in tune if k not in grid]
    if missing:
        raise StudyError(f"{where}: 'selection.tune' names {missing}, which are not grid keys (a setting to choose "
                         "must be swept in 'grid')")
    controls = data.get("controls", True)
    if not isinstance(controls, bool):
        raise StudyError(f"{where}: 'selection.controls' must be true or false, got {controls!r}")
    return Selection(metric, tuple(tune), controls)


def check_select_split(study: Study, cfg, run: RunSpec) -> None:
    if study.selection is not None and len(cfg.data.split_fractions) != 4:
        raise StudyError(f"{study.path}: run {run.name}: 'selection' chooses on the select split, but "
                         f"data.split_fractions is {cfg.data.split_fractions}: give 4 fractions (train, meta, "
                         "select, test), e.g. set: {data.split_fractions: [0.6, 0.15, 0.1, 0.15]}")
