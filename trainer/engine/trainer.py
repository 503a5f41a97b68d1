"""The Trainer: builds every component from the config, runs epochs, evaluates, checkpoints, writes the run dir.

Read ``fit`` top to bottom for the loop; the step itself lives in ``steps.py``, the logging in
``trainer/observability/run_logging.py``.
Many ranks: every rank runs this same loop in lock-step (same number of steps, the same checkpoints, the same stop
decision -- see ``StopAgreement``); only the main process writes files.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time

import torch
from accelerate.utils import set_seed

from data_pipeline.records import class_names
from data_pipeline.factory import build_streams
from data_pipeline.settings import DataSettings

from trainer.engine.accel import (StopAgreement, bare_model, broadcast_buffers, build_accelerator,
                                  match_buffer_dtypes, run_environment)
from trainer.engine.checkpoint import (CheckpointError, FaultInjection, TrainState, clear_preempted, load_latest,
                                      mark_preempted, resolve_resume, save_checkpoint, written_by_ranks)
from trainer.clinical_metrics import bootstrap_clinical
from trainer.config import Config
from trainer.engine.evaluation import Predictions, evaluate
from trainer.components.losses import build_loss
from trainer.components.models import build_model, check_model_config, to_memory_format
from trainer.components.optim import apply_optim_config, build_optimizer, build_scheduler
from trainer.engine.provenance import write_preprocessing
from trainer.engine.run_dir import on_main_then_share, prepare_run_dir, load_splits, stream_tables
from trainer.observability.run_logging import RunLogger
from trainer.engine.steps import StepRunner
from common.errors import UserError

log = logging.getLogger(__name__)


class TrainingStopped(UserError, RuntimeError):
    """Training stopped on purpose (too many bad steps); the last good state was checkpointed."""

    same_on_every_rank = True  # the ranks agree on it (an all-reduce): rank 0 alone reports it


_SIGNAL_NAMES = {StopAgreement.TERM: "SIGTERM", StopAgreement.INT: "SIGINT"}
# a repeat within this many seconds is the same Ctrl-C delivered twice (terminal + a launcher forwarding it)
_SECOND_INTERRUPT_AFTER_S = 1.0


class Trainer:
    def __init__(self, cfg: Config, *, resume: str | None = None, overwrite: bool = False, force: bool = False,
                 quiet: bool = False):
        self.cfg = cfg
        lookahead = cfg.meta.lookahead if cfg.train.loss == "meta" else None
        check_model_config(cfg.model, cfg.data.image_size, lookahead)  # before the run dir is written
        self.accelerator = acc = build_accelerator(cfg)  # refuses unsupported distributed combinations first
        set_seed(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # every batch shape is fixed (train drops its partial batch, eval pads its last one), so cuDNN's per-shape
        # algorithm search runs once per shape and then pays off every step
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark and not cfg.train.deterministic
        self.run_dir = on_main_then_share(acc, lambda: prepare_run_dir(
            cfg, is_main=True, resume=bool(resume), overwrite=overwrite, force=force,
            environment=run_environment(cfg, acc)))
        data = DataSettings.from_config(cfg)  # all the data layer reads of the config
        self.splits = load_splits(data, self.run_dir, acc)
        if acc.is_main_process:
            write_preprocessing(cfg, self.run_dir)  # so `metaloss predict` can repeat it on raw images
        self.streams = build_streams(data, stream_tables(cfg, self.splits), acc.process_index, acc.num_processes,
                                     device=acc.device)
        k = cfg.model.num_classes
        self.class_names = class_names(k)

        model = to_memory_format(build_model(cfg.model, image_size=cfg.data.image_size, lookahead=lookahead),
                                 cfg.model, acc.device)
        fused = cfg.train.distributed != "deepspeed"  # fused kernels skip non-finite steps on the device
        optimizer = build_optimizer(cfg.optim, model.parameters(), fused=fused)
        self.steps_per_epoch = len(self.streams.train)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        scheduler = build_scheduler(cfg.optim, optimizer, self.total_steps)
        # class tables as device buffers: a CPU table would be copied (and the stream synced) every step
        self.loss_fn = build_loss(cfg.train.loss, cfg.loss, self.streams.class_counts, cfg.train.epochs).to(acc.device)
        self.reweighter = None
        if cfg.train.loss == "meta":
            from trainer.meta import MetaReweighter

            self.reweighter = MetaReweighter(cfg.meta, num_classes=k)
            self.reweighter.to(acc.device)
            self.reweighter.broadcast_from(0)  # φ replicated, not DDP-wrapped: start identical on every rank
        # θ: DDP or a DeepSpeed engine. The meta step looks ahead on the unwrapped module (rank-local gradient);
        # the real step goes through the wrapper (gradient all-reduce / ZeRO).
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        match_buffer_dtypes(bare_model(acc, self.model))  # DeepSpeed bf16 casts parameters, not BatchNorm buffers
        if cfg.model.compile:
            # the real step and evaluation run compiled (the DDP wrapper inside, so DDPOptimizer keeps the gradient
            # all-reduce overlapped with the backward); the meta step takes the eager module (forward-mode AD and
            # functional_call need it) via bare_model, which never rewires the compiled wrapper. Both share the
            # same parameters, and Accelerate checkpoints the prepared (uncompiled) model.
            # dynamic=False: every shape the compiled model sees is fixed (train drops its partial batch, eval pads
            # its last one), so static-shape kernels, and a new shape would be a bug worth a recompile warning
            self.model = torch.compile(self.model, backend=cfg.model.compile_backend, dynamic=False)
        self.input_dtype = torch.bfloat16 if (cfg.train.distributed == "deepspeed"
                                              and cfg.train.precision == "bf16") else None
        self.state = TrainState(world_size=acc.num_processes)
        # saved by rank 0 only: each of these is the same on every rank (φ by the invariant, positions by design)
        for obj in (self.state, self.streams.train, self.streams.meta, self.reweighter):
            if obj is not None:
                acc.register_for_checkpointing(obj)
        # `runner` keeps the fault counters; `step_runner` is what the loop calls (tests may wrap it)
        self.runner = self.step_runner = StepRunner(
            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, loss_fn=self.loss_fn,
            reweighter=self.reweighter, meta_stream=self.streams.meta, accelerator=acc, cfg=cfg,
            input_dtype=self.input_dtype)
        candidates = resolve_resume(self.run_dir, resume)
        if cfg.train.distributed == "deepspeed":
            self._refuse_other_world(candidates)
        self.resumed_from = load_latest(acc, candidates)
        if self.resumed_from is not None:
            self._check_resumed_world()
            self.runner.restore_counters(bad_steps=self.state.bad_steps)
            if cfg.train.distributed != "deepspeed":  # DeepSpeed's engine owns its optimiser (guarded keys refuse)
                for change in apply_optim_config(self.optimizer, self.scheduler, cfg.optim):
                    log.warning("resume applies the new config: %s", change)
            log.info("resumed from %s (step %d, epoch %d)", self.resumed_from, self.state.step, self.state.epoch)
        # TensorBoard drops what an earlier attempt logged after the resumed step (it is being trained again)
        self.logger = RunLogger(cfg, self.run_dir, acc, self.class_names, quiet=quiet, total_steps=self.total_steps,
                                purge_step=self.state.step + 1 if self.resumed_from is not None else None)
        self.logger.restart_clock()  # building the streams and loading a checkpoint are not training time
        self.stop = StopAgreement(acc.num_processes)
        self.faults = FaultInjection.from_env(acc.process_index)
        self.faults.during_start()
        self._stopping = 0  # the agreed StopAgreement reason once the ranks stop early
        self._first_interrupt_at = None
        self._last_checkpoint_step = self.state.step if self.resumed_from is not None else -1

    def _refuse_other_world(self, candidates) -> None:
        """DeepSpeed writes one ZeRO partition per rank: say so before the engine fails on a missing file."""
        now = self.accelerator.num_processes
        for path in candidates[:1]:
            saved = written_by_ranks(path)
            if saved is not None and saved != now:
                raise CheckpointError(f"{path} was written by {saved} rank(s), this run has {now}: DeepSpeed ZeRO "
                                      "checkpoints are partitioned per rank; resume with the same number of ranks")

    def _check_resumed_world(self) -> None:
        """Stream positions count batches of a per-rank shard: they only mean the same thing with the same ranks."""
        saved, now = self.state.world_size, self.accelerator.num_processes
        if saved == now:
            return
        position = self.streams.train.state_dict()
        if position.get("consumed", 0) and position.get("epoch") == self.state.epoch:
            raise CheckpointError(f"{self.resumed_from} was written mid-epoch by {saved} rank(s), this run has {now}: "
                                  "the data position cannot be mapped onto the new shards; resume with the same "
                                  "number of ranks or from an epoch-end checkpoint")
        log.warning("resuming a %d-rank checkpoint on %d ranks: epochs now have %d steps each", saved, now,
                    self.steps_per_epoch)
        self.state.world_size = now

    # --- the loop -------------------------------------------------------------------------------------------------
    def fit(self, early_signals: list[int] | None = None) -> dict:
        """Train to the end, or to the step boundary after SIGTERM/SIGINT. ``early_signals``: signals caught while
        the trainer was being built (launch/train.py defers SIGTERM over start-up, which can take minutes on a large
        data set); they stop the run at its first step boundary, as if they arrived now."""
        if self.accelerator.is_main_process:
            clear_preempted(self.run_dir)  # this run is training again: no longer a pre-empted one
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        if early_signals:  # read after our handler is in place: a signal from here on reaches it directly
            log.warning("signal %d arrived during start-up", early_signals[0])
            self._on_signal(early_signals[0], None)
        try:
            result = self._run()
            # every rank got here at the same step: finish the last stop all-reduce (skipped after an error, when
            # the other ranks may be gone)
            self.stop.close()
            return result
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.logger.close()

    def _run(self) -> dict:
        cfg, st = self.cfg, self.state
        if st.step == 0:
            self.logger.start(self.streams, self.splits)
        while st.epoch < cfg.train.epochs and not self._done():
            completed = self._train_epoch()
            if self._stopping:
                return self._preempted()
            if completed or self._done():
                self._end_epoch()
        return self._finish()

    def _done(self) -> bool:
        return bool(self.cfg.train.max_steps) and self.state.step >= self.cfg.train.max_steps

    def _train_epoch(self) -> bool:
        """One (rest of an) epoch. True when the stream ran out (epoch complete), False when stopped early."""
        cfg, st = self.cfg, self.state
        self.loss_fn.set_epoch(st.epoch)
        self.streams.train.set_epoch(st.epoch)
        self.logger.epoch_start(st.epoch, self.steps_per_epoch, st.step % self.steps_per_epoch)
        t_wait = time.perf_counter()
        for batch in self.streams.train:
            t_got = time.perf_counter()
            if st.step == 0:
                self.logger.first_batch(batch.images)
            self.logger.step_begin()
            out = self.step_runner(batch, st.step)
            st.step += 1
            st.images_seen += batch.labels.shape[0] * self.accelerator.num_processes
            self.logger.step(st.step, out, wait_s=t_got - t_wait, step_s=time.perf_counter() - t_got)
            if st.step % cfg.logging.every_steps == 0:
                self._flush_logs()
            if cfg.checkpoint.enabled and cfg.checkpoint.every_steps and st.step % cfg.checkpoint.every_steps == 0:
                self._checkpoint()
                self.logger.restart_clock()
            self.faults.after_step(st.step)
            reason = self.stop.should_stop()  # every rank, every step: the ranks agree on the step they stop at
            if reason:
                self._stopping = reason
                return False
            if self._done():
                return False
            t_wait = time.perf_counter()
        return True

    def _lrs(self) -> dict[str, float]:
        lrs = {"lr/classifier": self.scheduler.get_last_lr()[0]}
        if self.reweighter is not None:
            lrs["lr/meta"] = self.reweighter.optimizer.param_groups[0]["lr"]
        return lrs

    def _sync_logs(self, flags: dict | None = None, publish: bool = False) -> dict[str, float]:
        """Drain the per-step buffers into the state (the one place the hot loop syncs with the device)."""
        reduced = self.logger.flush_steps(self.state, self._lrs(), flags, publish=publish)
        self.state.bad_steps = int(self.runner.bad_steps)
        return reduced

    def _flush_logs(self, publish: bool = True) -> None:
        # a bad batch may be bad on one rank only (the loss is rank-local): stop on every rank or on none, or the
        # stopping rank's checkpoint collective would wait for ranks that went on training. The flag rides in the
        # logger's one all-reduce (mean over ranks > 0 <=> some rank hit the limit).
        too_many = (self.runner.max_consecutive_bad >= self.cfg.train.max_bad_steps).float()
        reduced = self._sync_logs({"too_many_bad": too_many}, publish=publish)
        st = self.state
        if reduced["too_many_bad"] > 0:
            # skipped steps never touched the weights, so the current state *is* the last good one
            self._checkpoint()
            raise TrainingStopped(f"{self.cfg.train.max_bad_steps} consecutive steps had a non-finite loss or "
                                  f"gradient (at step {st.step}); stopped and checkpointed the last good state in "
                                  f"{self.run_dir / 'checkpoints'}")

    def _end_epoch(self) -> None:
        cfg, st = self.cfg, self.state
        self._flush_logs(publish=st.step % cfg.logging.every_steps == 0)  # TensorBoard points at regular steps only
        last = st.epoch + 1 >= cfg.train.epochs or self._done()
        if last or (st.epoch + 1) % cfg.eval.every_epochs == 0:
            # history holds one record per *evaluated* epoch; its train losses cover the steps since the previous one
            val, _ = self._evaluate("meta")
            st.history.append(self.logger.epoch_end(st, val))
        st.epoch += 1
        # the last epoch's checkpoint is written by _finish after the test evaluation
        if cfg.checkpoint.enabled and st.epoch % cfg.checkpoint.every_epochs == 0:
            self._checkpoint()
        self.logger.restart_clock()

    def evaluate(self, split: str = "test") -> tuple[dict, Predictions]:
        """Metrics and gathered predictions of the current weights on ``split`` ("meta", "select" or "test")."""
        if split not in self.streams.eval:
            raise ValueError(f"evaluate: unknown split {split!r} (have {', '.join(self.streams.eval)})")
        return self._evaluate(split)

    def _sync_buffers(self) -> None:
        """DeepSpeed leaves each rank its own BatchNorm statistics; give every rank rank 0's, as DDP would."""
        if self.cfg.train.distributed == "deepspeed":
            broadcast_buffers(bare_model(self.accelerator, self.model), src=0)

    def _evaluate(self, split: str) -> tuple[dict, Predictions]:
        self._sync_buffers()
        stream = self.streams.eval[split]
        with self.logger.progress(f"eval {split}", len(stream)) as bar:
            return evaluate(self.model, stream, self.accelerator, self.cfg.model.num_classes,
                            input_dtype=self.input_dtype, progress=bar, referable_from=self.cfg.eval.referable_from)

    def _checkpoint(self) -> None:
        # drain the logs first: the step history in the checkpoint must cover exactly the steps it contains
        self._sync_logs()
        self._sync_buffers()
        save_checkpoint(self.accelerator, self.run_dir, self.state.step, self.cfg.checkpoint.keep_last,
                        before_rename=self.faults.before_rename(self.state.step))
        self._last_checkpoint_step = self.state.step

    def _on_signal(self, signum, frame) -> None:
        # only set a flag: the loop checkpoints at a step boundary all ranks agree on, where the state is consistent.
        # SLURM signals every process, and the launcher forwards the signal again: say it once per rank.
        reason = StopAgreement.INT if signum == signal.SIGINT else StopAgreement.TERM
        now = time.monotonic()
        if reason == StopAgreement.INT and self._first_interrupt_at is not None:
            if now - self._first_interrupt_at > _SECOND_INTERRUPT_AFTER_S:
                sys.stderr.write("metaloss: second Ctrl-C: exiting now, without a checkpoint of the steps since the "
                                 "last one\n")
                sys.stderr.flush()
                os._exit(130)  # at once: no cleanup that could block on the other ranks or the loader workers
            return
        if reason == StopAgreement.INT:
            self._first_interrupt_at = now
            log.warning("Ctrl-C: checkpointing at the next step boundary, then exiting (Ctrl-C again to exit now)")
        elif not self.stop.local:
            log.warning("SIGTERM received: checkpointing at the next step boundary and exiting")
        self.stop.request(reason)

    def _preempted(self) -> dict:
        self._flush_logs()
        if self._last_checkpoint_step != self.state.step:
            self._checkpoint()
        name = _SIGNAL_NAMES[self._stopping]
        if self.accelerator.is_main_process:
            ckpts = self.run_dir / "checkpoints"
            if self._stopping == StopAgreement.TERM:
                # both a pre-empted and a finished run exit 0: the marker tells a requeue script which one it was
                mark_preempted(self.run_dir, self.state.step)
                log.warning("pre-empted (SIGTERM): checkpointed step %d in %s and left %s; continue with "
                            "--resume auto", self.state.step, ckpts, ckpts / "PREEMPTED")
            else:
                log.warning("interrupted (Ctrl-C): checkpointed step %d in %s; continue with --resume auto",
                            self.state.step, ckpts)
        return {"preempted": True, "step": self.state.step, "signal": name}

    def evaluate_final_test(self):
        """The run's headline test evaluation: metrics plus, on the main process, bootstrap intervals for the
        clinical numbers (computed once here, not at every evaluation: 1000 resamples)."""
        test, pred = self._evaluate("test")
        if len(pred.labels) and self.accelerator.is_main_process:
            test["ci95"] = bootstrap_clinical(pred.labels, pred.probs, self.cfg.model.num_classes,
                                              self.cfg.eval.referable_from)
        return test, pred

    def _finish(self) -> dict:
        st = self.state
        self._flush_logs()
        test, pred = self.evaluate_final_test()
        # the select split (4-way data.split_fractions): what a study chooses settings by, never the test split
        select = self._evaluate("select")[0] if "select" in self.streams.eval else None
        metrics = self.logger.finish(st, test, pred, self.splits["test"], select=select)
        if self.cfg.checkpoint.enabled and self._last_checkpoint_step != st.step:
            self._checkpoint()
        return metrics
