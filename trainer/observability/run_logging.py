"""Everything the Trainer reports: TensorBoard, progress bars, per-step history, metrics.json, predictions.

Per-step statistics stay on the device (``DeviceScalarBuffer``) until a logging interval, where all of them are
reduced across ranks (mean) in ONE collective and copied to the host once; the meta-weight histograms are copied on
the main process only. Only the main process writes files.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common.atomic import atomic_write, atomic_write_text

from trainer.config import config_to_dict
from trainer.engine.accel import run_environment
from trainer.observability.step_clock import IdleClock
from trainer.observability.tb_logging import DeviceScalarBuffer, TBLogger

log = logging.getLogger(__name__)

_STEP_KEYS = ("train_loss", "weighted_loss", "meta_loss", "w_mean", "w_std", "w_min", "w_max")


class RunLogger:
    def __init__(self, cfg, run_dir: Path, accelerator, class_names: list[str], *, quiet: bool = False,
                 purge_step: int | None = None, total_steps: int = 0):
        self.cfg, self.run_dir, self.acc, self.class_names = cfg, Path(run_dir), accelerator, class_names
        self.is_main = accelerator.is_main_process
        self.tb = TBLogger(self.run_dir / "tb", enabled=self.is_main and cfg.logging.tensorboard,
                           class_names=class_names, purge_step=purge_step)
        progress = self.is_main and cfg.logging.progress and not quiet
        self.show_progress = progress and sys.stderr.isatty()
        # a log file (SLURM, `make demo > log`) gets a line per logging interval instead of a redrawn bar
        self.progress_lines = progress and not sys.stderr.isatty()
        self.total_steps = total_steps
        self.environment = run_environment(cfg, accelerator)
        self.pending_rows: list[dict] = []  # drained steps not yet published (a checkpoint came between intervals)
        self.pending_s = 0.0
        self.buffer = DeviceScalarBuffer()
        self.weights: list[torch.Tensor] = []  # the last interval's meta weights, for the histogram
        self.weight_labels: list[torch.Tensor] = []
        self.steps: list[int] = []
        self.stat_steps: dict[str, list[int]] = {}  # which steps each buffered statistic came from
        self.wait_s = self.step_s = 0.0
        self.images = 0
        self.t_interval = time.perf_counter()
        self.idle = IdleClock(accelerator.device)
        self.intervals: list[dict] = []  # per logging interval: last step, img/s, data wait (for `metaloss bench`)
        self.bar = None
        self.collapsed_run = 0  # consecutive steps whose meta weights all sat at 0 or 1
        self.collapse_warned = False

    # --- start / epochs -------------------------------------------------------------------------------------------
    def start(self, streams, splits) -> None:
        import yaml

        self.tb.text("config", "```yaml\n" + yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False) + "\n```")
        sizes = {k: len(v) for k, v in splits.items()}
        log.info("run dir %s | backend %s | split sizes %s | train class counts %s", self.run_dir,
                 streams.backend, sizes, streams.class_counts)

    def epoch_start(self, epoch: int, steps: int, done: int) -> None:
        if self.show_progress:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}",
                            leave=False, dynamic_ncols=True)

    @contextlib.contextmanager
    def progress(self, desc: str, total: int):
        if not self.show_progress:
            yield None
            return
        from tqdm import tqdm

        with tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True) as bar:
            yield bar

    def restart_clock(self) -> None:
        """Training throughput counts training only: restart after evaluation, checkpoints and resume loading."""
        self.t_interval = time.perf_counter()
        self.idle.restart()

    def first_batch(self, images: torch.Tensor) -> None:
        """One augmented training batch, as the network sees it (de-normalised by the TB logger)."""
        if self.tb.active and self.cfg.logging.log_images:
            self.tb.image_grid("train/images", images[:32].float().cpu(), 0)

    # --- per step (no sync) ---------------------------------------------------------------------------------------
    def step_begin(self) -> None:
        """Right before the step is queued (after its batch arrived): the device's idle gap ends here."""
        self.idle.begin()

    def step(self, step: int, out, *, wait_s: float, step_s: float) -> None:
        self.idle.end()
        self.steps.append(step)
        for key in _STEP_KEYS + ("bad_step",):
            if key in out.stats:
                self.buffer.add(key, out.stats[key])
                self.stat_steps.setdefault(key, []).append(step)
        if out.weights is not None:
            self.weights.append(out.weights)
            self.weight_labels.append(out.labels)
        self.wait_s += wait_s
        self.step_s += step_s
        self.images += self.cfg.train.batch_size * self.acc.num_processes
        if self.bar is not None:
            self.bar.update(1)

    def _reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(stacked, reduction="mean") if self.acc.num_processes > 1 else stacked

    def flush_steps(self, state, lrs: dict[str, float], flags: dict[str, torch.Tensor] | None = None, *,
                    publish: bool = True) -> dict[str, float]:
        """Logging interval: reduce across ranks, copy to host once, append to history, write TensorBoard.

        ``flags`` (0-dim device tensors) ride in the same all-reduce and come back as their mean over ranks, so
        the trainer's cross-rank decisions cost no collective of their own. ``publish=False`` (a checkpoint or an
        epoch end between two logging steps) only drains the buffers into the history the checkpoint needs;
        TensorBoard and the progress line keep one point per ``logging.every_steps``, at regular steps, averaged
        over all the steps since the last point."""
        for name, value in (flags or {}).items():
            self.buffer.add(f"flag/{name}", value)
        values = self.buffer.drain(reduce=self._reduce)
        reduced_flags = {name: values.pop(f"flag/{name}")[0] for name in flags or {}}
        if self.steps:
            per_step: dict[int, dict] = {s: {"step": s} for s in self.steps}
            for key, vals in values.items():
                for step, v in zip(self.stat_steps[key], vals):
                    per_step[step][key] = v
            rows = [per_step[s] for s in self.steps]
            state.step_history.extend({k: r.get(k) for k in ("step",) + _STEP_KEYS} for r in rows)
            self._check_collapse(rows)
            elapsed = time.perf_counter() - self.t_interval  # real: the drain's copy above waited for the device
            state.train_seconds += elapsed
            self.pending_rows += rows
            self.pending_s += elapsed
            self.steps, self.stat_steps = [], {}
            self.t_interval = time.perf_counter()
        if publish and self.pending_rows:
            self._publish(state, lrs)
        return reduced_flags

    def _publish(self, state, lrs: dict[str, float]) -> None:
        rows, elapsed = self.pending_rows, self.pending_s
        img_s = self.images / max(elapsed, 1e-9)
        last = rows[-1]["step"]
        scalars = {f"train/{'loss' if k == 'train_loss' else k}": float(np.mean([r[k] for r in rows if k in r]))
                   for k in ("train_loss", "weighted_loss") if any(k in r for r in rows)}
        for k in ("meta_loss", "w_mean", "w_std", "w_min", "w_max"):
            got = [r[k] for r in rows if k in r]
            if got:
                scalars[{"meta_loss": "meta/loss"}.get(k, f"meta/weight_{k[2:]}")] = float(np.mean(got))
        # cumulative: state.bad_steps is the total up to the previous interval (the trainer updates it after this)
        scalars["faults/bad_steps"] = float(state.bad_steps + sum(r.get("bad_step", 0) for r in rows))
        scalars["perf/img_per_s"] = img_s
        scalars["perf/data_wait_frac"] = self.idle.idle_fraction(host_wait_s=self.wait_s, wall_s=elapsed)
        if self.acc.device.type == "cuda":
            scalars["perf/gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        scalars.update(lrs)
        # an x-axis that means the same for any world size: curves of 1 and 8 ranks line up against it
        scalars["progress/images_seen"] = float(state.images_seen)
        self.intervals.append({"step": last, "steps": len(rows), "img_per_s": img_s,
                               "data_wait_frac": scalars["perf/data_wait_frac"]})
        self.tb.scalars(last, scalars)
        if self.weights and self.tb.active:  # only the main process writes them: no copy on the other ranks
            self._weight_histograms(last)
        # on disk now, not when the writer's timer fires: a SIGKILLed or OOM-killed job keeps every point it
        # published (the resume purges what comes after its checkpoint), and TensorBoard shows the interval at once
        self.tb.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{scalars['train/loss']:.3f}", img_s=f"{img_s:.0f}")
        if self.progress_lines:
            self._progress_line(state, last, scalars.get("train/loss"), img_s, elapsed / len(rows))
        self.pending_rows, self.pending_s = [], 0.0
        self.weights, self.weight_labels = [], []
        self.wait_s = self.step_s = 0.0
        self.images = 0
        self.idle.restart()

    def _progress_line(self, state, step: int, loss, img_s: float, s_per_step: float) -> None:
        total = self.total_steps or step
        eta = max(total - step, 0) * s_per_step
        log.info("step %d/%d | epoch %d/%d | loss %s | %.1f img/s | ETA %s", step, total,
                 min(state.epoch + 1, self.cfg.train.epochs),  # the final flush runs after the last epoch ended
                 self.cfg.train.epochs, "n/a" if loss is None else f"{loss:.4f}", img_s,
                 time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 86400 else f"{eta / 3600:.0f} h")

    def _weight_histograms(self, step: int) -> None:
        w = torch.cat(self.weights).float().cpu()
        y = torch.cat(self.weight_labels).cpu()
        keep = torch.isfinite(w)  # a skipped (non-finite) step's weights are not a distribution
        w, y = w[keep], y[keep]
        if not w.numel():
            return
        self.tb.histogram("meta/weights", w, step)
        if self.cfg.meta.granularity == "class":
            for k, name in enumerate(self.class_names):
                if (y == k).any():
                    self.tb.histogram(f"meta/class_weights/{name}", w[y == k], step)

    def _check_collapse(self, rows: list[dict]) -> None:
        """A sigmoid meta-net that saturates stops reweighting: all weights < 1e-3 (the loss vanishes) or > 1-1e-3."""
        for r in rows:
            if r.get("w_max") is None:
                continue
            saturated = r["w_max"] < 1e-3 or r["w_min"] > 1 - 1e-3
            self.collapsed_run = self.collapsed_run + 1 if saturated else 0
            if self.collapsed_run >= self.cfg.meta.collapse_steps and not self.collapse_warned:
                self.collapse_warned = True
                log.warning("meta-weight collapse: every weight has been %s for %d steps (step %d); the meta-net "
                            "no longer reweights -- consider a lower meta.lr or meta.granularity=class",
                            "< 1e-3" if r["w_max"] < 1e-3 else "> 1-1e-3", self.collapsed_run, r["step"])
                self.tb.scalars(r["step"], {"faults/meta_weight_collapse": 1.0})

    # --- evaluation results ---------------------------------------------------------------------------------------
    def epoch_end(self, state, val: dict) -> dict:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        epoch_rows = [r for r in state.step_history if r["step"] > (state.history[-1]["step"] if state.history else 0)]

        def mean_of(key):
            got = [r[key] for r in epoch_rows if r.get(key) is not None]
            return float(np.mean(got)) if got else None

        record = {"epoch": state.epoch + 1, "step": state.step, "train_loss": mean_of("train_loss"),
                  "train_weighted_loss": mean_of("weighted_loss"), "meta_loss": mean_of("meta_loss"), "val": val}
        self.tb.eval_metrics("val", val, state.step)
        if self.is_main:
            log.info("epoch %d step %d | train loss %.4f | val acc %.4f macro-F1 %.4f QWK %.4f", record["epoch"],
                     state.step, record["train_loss"] or float("nan"), val["accuracy"], val["macro_f1"], val["qwk"])
        return record

    def finish(self, state, test: dict, pred, test_records, *, select: dict | None = None) -> dict:
        img_s = state.images_seen / max(state.train_seconds, 1e-9)
        metrics = {
            "run": self.cfg.run.name, "num_classes": self.cfg.model.num_classes, "class_names": self.class_names,
            "loss": self.cfg.train.loss, "test": test, "history": state.history, "step_history": state.step_history,
            "train_img_per_s": img_s, "steps": state.step, "wall_s": state.train_seconds,
            "bad_steps": state.bad_steps, **self.environment,
        }
        w_means = [r["w_mean"] for r in state.step_history if r.get("w_mean") is not None and np.isfinite(r["w_mean"])]
        if w_means:  # what a CE control scales its learning rate by (`metaloss train --control-of`)
            metrics["meta_weight_mean"] = float(np.mean(w_means))
        if select is not None:
            metrics["select"] = select
            self.tb.eval_metrics("select", select, state.step)
        self.tb.eval_metrics("test", test, state.step)
        if self.is_main:
            atomic_write_text(self.run_dir / "metrics.json", json.dumps(metrics, indent=2))
            self._write_predictions(pred, test_records)
        return metrics

    def _write_predictions(self, pred, test_records) -> None:
        k = pred.probs.shape[1] if pred.probs.ndim == 2 else self.cfg.model.num_classes
        with atomic_write(self.run_dir / "predictions_test.csv") as f:
            w = csv.writer(f)
            w.writerow(["source_id", "label", "pred"] + [f"prob_{i}" for i in range(k)])
            for i, y, p, probs in zip(pred.ids, pred.labels, pred.preds, pred.probs):
                w.writerow([test_records[i].source_id, int(y), int(p)] + [f"{x:.6f}" for x in probs])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.tb.close()
