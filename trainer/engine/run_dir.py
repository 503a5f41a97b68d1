"""The run directory: resolved config, resume checks, and the split tables shared by every rank (splits.csv).

Only the main process writes; the others wait at a barrier and read what it wrote, so every rank trains on the
byte-identical split (splits.csv is the single source of truth, re-used unchanged on resume).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from data_pipeline.dataset import load_records
from data_pipeline.records import DataError, Record
from data_pipeline.settings import DataSettings
from data_pipeline.splits import load_or_make_splits, with_meta_in_train

from trainer.config import Config, config_to_dict, diff_configs, save_config
from trainer.engine.checkpoint import checkpoint_dir
from common.errors import UserError

log = logging.getLogger(__name__)

# Keys that change what is trained on or what is being trained: a resume that changes them is refused (--force
# applies them; the optimiser's through trainer.components.optim.apply_optim_config).
RESUME_GUARDED = ("data.root", "data.format", "data.split_fractions", "data.split_seed", "data.train_fraction",
                  "data.image_size", "data.baselines_use_meta_split", "model.", "meta.", "optim.",
                  "train.loss", "train.seed", "train.batch_size")


class RunDirError(UserError, ValueError):
    """The run dir cannot be used as asked (exists without --overwrite/--resume, or config changed on resume)."""


def check_resume_config(run_dir: Path, cfg: Config, *, force: bool) -> None:
    """Refuse to resume with a config that changes data, split, model or meta settings (unless --force)."""
    import yaml

    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    # a key added after the run was saved is absent there: it trained with that key's default, which is no change
    defaults = config_to_dict(Config())
    changed = [d for d in diff_configs(saved, config_to_dict(cfg))
               if not (_absent(saved, d[0]) and d[2] == _lookup(defaults, d[0]))]
    changed = [d for d in changed
               if any(d[0] == g or (g.endswith(".") and d[0].startswith(g)) for g in RESUME_GUARDED)]
    lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in changed)
    optim = [k for k, _, _ in changed if k.startswith("optim.")]
    if optim and cfg.train.distributed == "deepspeed":
        # DeepSpeed's engine restores its own optimiser and nothing re-applies the config to it: --force would
        # record a learning rate in config.yaml that the run does not use
        raise RunDirError(f"refusing to resume {run_dir}: {', '.join(optim)} cannot change on a DeepSpeed resume, "
                          f"even with --force:\n{lines}\n(start a new run.name)")
    if changed and not force:
        raise RunDirError(f"refusing to resume {run_dir}: the config changes what is trained:\n{lines}\n"
                          "(pass --force to resume anyway, or start a new run.name)")


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _absent(tree: dict, dotted: str) -> bool:
    *parents, leaf = dotted.split(".")
    node = _lookup(tree, ".".join(parents)) if parents else tree
    return not isinstance(node, dict) or leaf not in node


# What a start writes before its first checkpoint. A directory holding anything else (a user's files, a run.name
# pointed at the wrong folder, outputs of a later tool) is not recognised as a failed start and is never deleted.
_FAILED_START_ENTRIES = frozenset({"config.yaml", "splits.csv", "preprocessing.json", "control.json", "tb",
                                   "checkpoints"})


def is_failed_start(run_dir: Path) -> bool:
    """A run dir with no complete checkpoint and no finished metrics holds nothing to continue or keep: an earlier
    start failed (a typo in data.root, a missing file) before it trained anything worth saving.

    Only a directory that the trainer demonstrably wrote counts (its config.yaml, nothing but start-up artefacts,
    and in checkpoints/ only partial saves), because the caller deletes it."""
    if not (run_dir / "config.yaml").is_file() or (run_dir / "metrics.json").exists():
        return False
    if any(p.name not in _FAILED_START_ENTRIES for p in run_dir.iterdir()):
        return False
    ckpts = checkpoint_dir(run_dir)
    if ckpts.is_dir() and any(not p.name.startswith(".tmp-step_") for p in ckpts.iterdir()):
        return False  # step_* dirs (complete or not), a PREEMPTED marker, anything else: keep, let the user decide
    return True


def prepare_run_dir(cfg: Config, *, is_main: bool, resume: bool, overwrite: bool, force: bool = False,
                    environment: dict | None = None) -> Path:
    run_dir = cfg.run_dir
    if is_main:
        exists = run_dir.exists() and any(run_dir.iterdir())
        if exists and not overwrite and is_failed_start(run_dir):
            # the corrected command (or a requeued job, which always passes --resume auto) must just work, and
            # start clean: a splits.csv left by the failed start would otherwise be silently re-used
            log.warning("run dir %s holds no checkpoint and no results (an earlier start failed): starting it "
                        "afresh", run_dir)
            shutil.rmtree(run_dir)
            exists = False
        if exists and resume:
            check_resume_config(run_dir, cfg, force=force)
        elif exists and overwrite:
            shutil.rmtree(run_dir)
        elif exists:
            raise RunDirError(f"run dir {run_dir} already exists: choose another run.name, pass --overwrite to "
                              "replace it, or --resume auto to continue it")
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml", comment=(
            "launched with " + ", ".join(f"{k}: {v}" for k, v in environment.items())) if environment else None)
    return run_dir


def on_main_then_share(accelerator, fn):
    """Run ``fn`` on the main process only and hand its result (or its error) to every rank.

    Without this, a bad data set raises on rank 0 while the other ranks sit in a barrier until the process-group
    timeout; here every rank raises the same user-facing error at once.
    """
    if accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    box = [None, None]
    if accelerator.is_main_process:
        try:
            box[0] = fn()
        except (DataError, RunDirError, ValueError, OSError) as e:
            box[1] = e
    broadcast_object_list(box, from_process=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


def load_splits(data: DataSettings, run_dir: Path, accelerator) -> dict[str, list[Record]]:
    """The run's split tables: read the data set (data_pipeline) on the main process, splits.csv in the run dir."""
    def make():
        return load_or_make_splits(run_dir, load_records(data), list(data.split_fractions), data.split_seed,
                                   data.num_classes, train_fraction=data.train_fraction)
    return on_main_then_share(accelerator, make)


def stream_tables(cfg: Config, splits: dict[str, list[Record]]) -> dict[str, list[Record]]:
    """The tables the streams are built over: the split itself, or train ∪ meta as the train table for a fixed loss
    under data.baselines_use_meta_split (meta-reweighting needs the meta split for φ, so it ignores the switch)."""
    if cfg.data.baselines_use_meta_split and cfg.train.loss != "meta":
        return with_meta_in_train(splits)
    return splits
