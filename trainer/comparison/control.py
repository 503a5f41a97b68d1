"""The CE control of a meta-reweighted run: plain CE with the learning rate scaled by the run's mean meta weight.

With ``meta.granularity: batch`` the meta-net only rescales each step's loss, L_w = w̄·mean(ℓ), which for SGD is the
same as scaling the learning rate by w̄ (Adam normalises a constant scale away, a changing one not). The control
trains CE on exactly the meta run's data, model, optimiser, schedule and seed, at ``optim.lr × meta_weight_mean``;
the meta run minus its control is what the look-ahead itself contributes beyond a learning-rate change.

``metaloss train CONFIG --control-of META_RUN_DIR``: CONFIG is usually META_RUN_DIR/config.yaml; keys that decide
what is trained must match the meta run's (checked, naming every mismatch); ``control.json`` in the control's run
dir records where its learning rate came from.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from trainer.config import Config, ConfigError, config_to_dict, diff_configs

CONTROL_FILE = "control.json"
# What may differ between a meta run and its control: where it is written, how it is logged, the loss and what only
# meta-reweighting reads, the learning rate (that is the point) and how many workers decode images.
_MAY_DIFFER = ("run.", "logging.", "checkpoint.", "meta.", "train.loss", "optim.lr", "data.num_workers",
               "data.baselines_use_meta_split", "train.eval_batch_size", "train.cpu")


def _read_meta_run(run_dir: Path) -> tuple[dict, dict]:
    cfg_path, metrics_path = run_dir / "config.yaml", run_dir / "metrics.json"
    for path in (cfg_path, metrics_path):
        if not path.is_file():
            raise ConfigError(f"--control-of {run_dir}: {path.name} not found (the meta run must have finished)")
    saved = yaml.safe_load(cfg_path.read_text()) or {}
    metrics = json.loads(metrics_path.read_text())
    if saved.get("train", {}).get("loss") != "meta":
        raise ConfigError(f"--control-of {run_dir}: train.loss is {saved.get('train', {}).get('loss')!r}, not "
                          "meta; a control is made for a meta-reweighted run")
    if not isinstance(metrics.get("meta_weight_mean"), (int, float)):
        raise ConfigError(f"--control-of {run_dir}: {metrics_path} has no meta_weight_mean (written by metaloss "
                          "since the select split was added; re-run the meta run)")
    return saved, metrics


def control_overrides(meta_run_dir: str | Path) -> list[str]:
    """``key=value`` overrides that turn the meta run's config into its control (applied before the user's)."""
    run_dir = Path(meta_run_dir)
    saved, metrics = _read_meta_run(run_dir)
    lr = float(saved["optim"]["lr"]) * float(metrics["meta_weight_mean"])
    return ["train.loss=ce", f"optim.lr={lr:.10e}", "data.baselines_use_meta_split=false",
            f"run.name={saved['run']['name']}_ce_control"]


def check_control_matches(cfg: Config, meta_run_dir: str | Path) -> None:
    """Refuse a control whose data, model, optimiser or schedule differ from the meta run's (every key named)."""
    run_dir = Path(meta_run_dir)
    saved, _ = _read_meta_run(run_dir)
    changed = [d for d in diff_configs(saved, config_to_dict(cfg))
               if not any(d[0] == k or (k.endswith(".") and d[0].startswith(k)) for k in _MAY_DIFFER)]
    if changed:
        listing = "; ".join(f"{k}: {a!r} (meta run) vs {b!r}" for k, a, b in changed)
        raise ConfigError(f"--control-of {run_dir}: the control must train what the meta run trained, but {listing} "
                          f"(start from {run_dir / 'config.yaml'})")


def write_control_record(control_run_dir: Path, meta_run_dir: str | Path, cfg: Config) -> None:
    _, metrics = _read_meta_run(Path(meta_run_dir))
    record = {"control_of": str(meta_run_dir), "meta_weight_mean": metrics["meta_weight_mean"], "lr": cfg.optim.lr}
    (Path(control_run_dir) / CONTROL_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_control_record(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / CONTROL_FILE
    return json.loads(path.read_text()) if path.is_file() else None
