"""Training entry point: ``python -m launch.train CONFIG [key.sub=value ...] [--resume auto|PATH]``.

Works as is for one process, and under ``torchrun --nproc_per_node N -m launch.train ...`` or
``accelerate launch --multi_gpu --num_processes N -m launch.train ...`` (Accelerate reads the launcher's env; on CPU
the trainer picks the gloo backend). See docs/DISTRIBUTED.md.

Exit status: 0 when training finished *or* was pre-empted by SIGTERM (the state is checkpointed, and
``RUN/checkpoints/PREEMPTED`` tells the two apart; run the same command with ``--resume auto`` to continue), 130 after
Ctrl-C (checkpointed the same way; a second Ctrl-C exits at once), 2 for a user error (one line on stderr).
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from launch.errors import setup_logging, user_errors_exit


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML preset (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=3")
    p.add_argument("--resume", default=None,
                   help="'auto' (newest loadable checkpoint of the run; a fresh start when there is none) or a "
                        "checkpoint dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run dir of the same name")
    p.add_argument("--force", action="store_true", help="resume even though guarded config keys changed")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="full tracebacks")
    p.add_argument("--control-of", default=None, metavar="META_RUN_DIR",
                   help="train the CE control of a finished meta run: its settings with train.loss=ce and optim.lr "
                        "scaled by its mean meta weight (CONFIG: usually META_RUN_DIR/config.yaml)")


@user_errors_exit
def run_training(args: argparse.Namespace, *, debug: bool = False) -> dict:
    # A SIGTERM while the trainer is built (listing and checking a large data set, building the model, restoring a
    # checkpoint: minutes on a cluster) is kept and handed to fit(), which checkpoints at the first step boundary and
    # leaves the PREEMPTED marker -- killed by the default action instead, the job would not be requeued.
    early_signals: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: early_signals.append(signum))
    try:
        return _build_and_fit(args, early_signals)
    except BaseException:
        if early_signals:  # start-up failed after the signal: nothing was trained, so nothing to checkpoint
            logging.getLogger(__name__).warning("a SIGTERM arrived during start-up, which then failed: no checkpoint")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _build_and_fit(args: argparse.Namespace, early_signals: list[int]) -> dict:
    from trainer.config import load_config
    from trainer.engine.trainer import Trainer

    try:
        control_of = getattr(args, "control_of", None)
        if control_of:
            from trainer.comparison.control import check_control_matches, control_overrides, write_control_record

            cfg = load_config(args.config, control_overrides(control_of) + list(args.overrides))
            check_control_matches(cfg, control_of)
        else:
            cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite, force=args.force, quiet=args.quiet)
    except Exception as e:
        # every rank parses the same command line and reads the same config, run dir and data (rank 0 reads, then
        # shares): rank 0 alone reports. A rank-local failure (a torn RNG file of one rank) says so itself.
        if not hasattr(e, "same_on_every_rank"):
            e.same_on_every_rank = True
        raise
    if control_of and trainer.accelerator.is_main_process:
        write_control_record(trainer.run_dir, control_of, cfg)
    metrics = trainer.fit(early_signals)
    if trainer.accelerator.is_main_process:
        if metrics.get("preempted"):
            print(json.dumps({"run_dir": str(trainer.run_dir), "preempted": True, "step": metrics["step"],
                              "signal": metrics["signal"]}))
        elif "test" in metrics:
            t = metrics["test"]
            print(json.dumps({"run_dir": str(trainer.run_dir), "accuracy": round(t["accuracy"], 4),
                              "macro_f1": round(t["macro_f1"], 4), "qwk": round(t["qwk"], 4)}))
    trainer.accelerator.end_training()  # tears the process group down cleanly (no-op for one process)
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__.splitlines()[0])
    add_train_args(p)
    args = p.parse_intermixed_args(argv)  # `CONFIG --resume auto key=value` as well as `CONFIG key=value --resume auto`
    setup_logging(args.debug)
    try:
        metrics = run_training(args, debug=args.debug)
    except KeyboardInterrupt:
        # Ctrl-C before the training loop installed its handler (reading the data, building the model)
        if args.debug:
            raise
        print("metaloss: interrupted (Ctrl-C) before training started; nothing to checkpoint", file=sys.stderr)
        return 130
    return 130 if metrics.get("signal") == "SIGINT" else 0  # 128 + SIGINT, what a shell reports for Ctrl-C


if __name__ == "__main__":
    sys.exit(main())
