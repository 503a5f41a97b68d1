"""The `metaloss` command: thin argument parsing over the packages (no training logic here)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_pipeline.readers.registry import RAW_FORMATS
from launch.errors import UsageError, setup_logging, user_errors_exit
from launch.train import add_train_args, run_training


@user_errors_exit
def _synth(args, *, debug=False):
    from data_pipeline.synth import generate_synthetic

    out = generate_synthetic(args.out, n=args.n, size=args.size, seed=args.seed, workers=args.workers,
                             progress=not args.quiet)
    print(out)


@user_errors_exit
def _prepare(args, *, debug=False):
    import json

    from data_pipeline.image_ops import MIN_SIDE
    from data_pipeline.prepare import prepare_dataset

    # checked here so a typo is a one-line usage error, not a ValueError traceback from deep inside prepare
    for flag, value, least in (("--size", args.size, MIN_SIDE), ("--workers", args.workers, 1),
                               ("--num-classes", args.num_classes, 2)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    report = prepare_dataset(args.dataset, args.src, args.out, size=args.size, workers=args.workers,
                             ben_graham=args.ben_graham, num_classes=args.num_classes, path_col=args.path_col,
                             label_col=args.label_col, progress=not args.quiet)
    print(json.dumps({k: report[k] for k in ("counts", "per_class", "img_per_s") if k in report}))


@user_errors_exit
def _report(args, *, debug=False):
    from trainer.reporting.report import (load_run, table_one_markdown, table_two_markdown, test_set_warning,
                                          write_report)

    runs = [Path(r) for r in args.runs]
    out = write_report(runs, Path(args.out) if args.out else None, n_boot=args.n_boot)
    loaded = [load_run(r) for r in runs]
    warning = test_set_warning(loaded)
    if warning:
        print(f"metaloss: warning: {warning}", file=sys.stderr)
    print("Table I (test split)\n" + table_one_markdown(loaded))
    print("\nTable II (per-class recall)\n" + table_two_markdown(loaded))
    print(f"\nreport: {out}")


@user_errors_exit
def _bench(args, *, debug=False):
    from launch.bench import run_bench

    run_bench(args)


@user_errors_exit
def _study(args, *, debug=False):
    from launch.study.command import run_study

    code = run_study(args, debug=debug)
    if code:
        sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metaloss", description="Meta-learned loss reweighting for imbalanced images")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="generate a synthetic fundus set in the APTOS layout")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=600)
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=None)
    s.set_defaults(fn=_synth)

    s = sub.add_parser("prepare", help="crop, resize and re-encode a raw fundus set once (JPEG q95 + manifest)")
    s.add_argument("--dataset", required=True, choices=list(RAW_FORMATS))
    s.add_argument("--src", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--size", type=int, default=512)
    s.add_argument("--workers", type=int, default=None)
    s.add_argument("--ben-graham", action="store_true")
    s.add_argument("--num-classes", type=int, default=5)
    s.add_argument("--path-col", default="path")
    s.add_argument("--label-col", default="label")
    s.set_defaults(fn=_prepare)

    s = sub.add_parser("train", help="train a model (one process; use torchrun/accelerate launch for more)")
    add_train_args(s)
    s.set_defaults(fn=lambda a, debug=False: run_training(a, debug=debug))

    s = sub.add_parser("report", help="Markdown report (Table I/II, bootstrap CIs, figures) from run dirs")
    s.add_argument("runs", nargs="+")
    s.add_argument("--out", default=None)
    s.add_argument("--n-boot", type=int, default=1000)
    s.set_defaults(fn=_report)

    s = sub.add_parser("bench", help="throughput benchmarks (meta step modes, data backends)")
    s.add_argument("what", choices=["meta", "meta-precision", "data", "train"])
    s.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the chosen benchmark")
    s.set_defaults(fn=_bench)

    from launch.evaluate import add_eval_args, run_eval

    s = sub.add_parser("eval", help="evaluate a trained run/checkpoint on any data set (metrics, predictions)")
    add_eval_args(s)
    s.set_defaults(fn=run_eval)

    from launch.predict import add_predict_args, run_predict

    s = sub.add_parser("predict", help="grade new images (grade, per-grade probabilities, referable flag)")
    add_predict_args(s)
    s.set_defaults(fn=run_predict)

    from launch.study.command import add_study_args

    s = sub.add_parser("study", help="a grid of runs (config keys, train fractions, world sizes, seeds) + report")
    add_study_args(s)
    s.set_defaults(fn=_study)

    for sp in sub.choices.values():
        if not any(a.dest == "quiet" for a in sp._actions):
            sp.add_argument("--quiet", action="store_true", help="no progress bars")
        if not any(a.dest == "debug" for a in sp._actions):
            sp.add_argument("--debug", action="store_true", help="full tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        # the same parser as `python -m launch.train`, which allows options between the key=value overrides
        from launch.train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    args.fn(args, debug=args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
