"""`metaloss eval RUN_DIR|CHECKPOINT --data ROOT [--format F] [--split all|test] --out DIR`.

Cross-data-set testing: a trained model on any supported layout (train on EyePACS, test on APTOS or Messidor-2).
Writes OUT/metrics.json, OUT/predictions_test.csv and OUT/confusion.png in the schema of a training run (so
`metaloss report OUT ...` reads them). Runs on one process or under torchrun / accelerate launch with N ranks: the
images are sharded and gathered exactly as the trainer's test evaluation does (same stream, same `evaluate`).
``--split test`` evaluates the test split of ROOT made with the run's split fractions and split seed; ``all``
(default) every image of ROOT.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from launch.errors import user_errors_exit

log = logging.getLogger(__name__)


def add_eval_args(p) -> None:
    p.add_argument("checkpoint", help="run dir (its newest checkpoint) or a checkpoint dir")
    p.add_argument("--data", required=True, help="data set root (any supported layout)")
    from trainer.config import CHOICES

    p.add_argument("--format", default="auto", choices=CHOICES["data.format"], help="data layout (default: detect)")
    p.add_argument("--split", choices=["all", "test"], default="all")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's train.eval_batch_size")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--image-size", type=int, default=None, help="must equal the run's (checked)")
    p.add_argument("--num-classes", type=int, default=None, help="grades in --data; must equal the run's (checked)")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples for the clinical intervals")


def _records(cfg, split: str):
    from data_pipeline.dataset import load_records
    from data_pipeline.records import DataError
    from data_pipeline.settings import DataSettings
    from data_pipeline.splits import make_splits
    from trainer.engine.inference import InferenceError

    try:
        records = load_records(DataSettings.from_config(cfg))
    except DataError as e:
        if "outside 0.." in str(e):
            raise InferenceError(f"{cfg.data.root}: labels outside the checkpoint's {cfg.model.num_classes} classes "
                                 f"(0..{cfg.model.num_classes - 1}); a model cannot be scored on grades it never "
                                 f"had -- {str(e).splitlines()[0]}") from None
        raise
    if split == "all":
        return records
    seed = cfg.train.seed if cfg.data.split_seed is None else cfg.data.split_seed
    return make_splits(records, cfg.data.split_fractions, seed, cfg.model.num_classes)["test"]


def check_preprocessing(cfg, trained: dict | None) -> None:
    """The images must be made the way the training images were (``trained``: the run's preprocessing.json).

    A model trained on `metaloss prepare` output (fundus crop, resized, JPEG) scored on a raw layout would see
    uncropped originals -- a different input distribution, silently -- so that is refused with the prepare command
    that makes the data fit. A prepared set smaller than the model's input would be upsampled: refused too."""
    from trainer.engine.inference import InferenceError
    from trainer.engine.provenance import describe_preprocessing

    here = describe_preprocessing(cfg)
    was = (trained or {}).get("prepared")
    if was and not here["prepared"]:
        size, ben = was.get("size"), bool(was.get("ben_graham"))
        how = "".join([f" --size {size}" if size else "", " --ben-graham" if ben else ""])
        raise InferenceError(f"the model was trained on images made by `metaloss prepare` (fundus crop"
                             f"{f', {size} px' if size else ''}{', Ben Graham filter' if ben else ''}), but "
                             f"{cfg.data.root} is a raw {here['data_format']} layout: run `metaloss prepare --dataset "
                             f"{here['data_format']} --src {cfg.data.root} --out DIR{how}` and evaluate DIR")
    prepared = here["prepared"]
    if prepared and prepared["size"] is not None and prepared["size"] < cfg.data.image_size:
        raise InferenceError(f"{cfg.data.root} was prepared at {prepared['size']} px, the model takes "
                             f"{cfg.data.image_size} px: re-run `metaloss prepare --size {cfg.data.image_size}` (or "
                             "larger) on the raw images")


@user_errors_exit
def run_eval(args, *, debug: bool = False) -> dict:
    import torch

    from data_pipeline.backends.torch_backend import TorchEvalStream
    from data_pipeline.records import class_names
    from data_pipeline.settings import DataSettings
    from trainer.clinical_metrics import bootstrap_clinical
    from trainer.engine.accel import build_accelerator
    from trainer.engine.evaluation import evaluate
    from trainer.engine.inference import load_trained_model
    from trainer.observability.run_logging import RunLogger
    from trainer.engine.checkpoint import TrainState

    loaded = load_trained_model(args.checkpoint, num_classes=args.num_classes, image_size=args.image_size)
    cfg = loaded.cfg
    cfg.data.root, cfg.data.format, cfg.data.backend = str(args.data), args.format, "torch"
    cfg.data.num_workers = args.num_workers
    cfg.data.skip_bad = False
    cfg.train.distributed = "ddp"  # the weights are consolidated: no engine needed to run them
    if args.batch_size:
        cfg.train.eval_batch_size = args.batch_size
    cfg.run.out_dir, cfg.run.name = str(Path(args.out).parent), Path(args.out).name
    cfg.logging.log_images = False
    acc = build_accelerator(cfg)
    from trainer.engine.provenance import read_preprocessing

    check_preprocessing(cfg, read_preprocessing(loaded.run_dir))
    records = _records(cfg, args.split)
    model = loaded.model.to(acc.device)
    stream = TorchEvalStream(records, DataSettings.from_config(cfg), acc.process_index, acc.num_processes)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" and acc.device.type == "cuda" else None
    metrics, pred = evaluate(model, stream, acc, cfg.model.num_classes, referable_from=cfg.eval.referable_from,
                             input_dtype=dtype)
    out = Path(args.out)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        metrics["ci95"] = bootstrap_clinical(pred.labels, pred.probs, cfg.model.num_classes,
                                             cfg.eval.referable_from, n_boot=args.n_boot)
        cfg.logging.tensorboard = False
        logger = RunLogger(cfg, out, acc, class_names(cfg.model.num_classes), quiet=True)
        state = TrainState(world_size=acc.num_processes)
        result = logger.finish(state, metrics, pred, records)  # metrics.json + predictions_test.csv, training's schema
        result.update(evaluated={"checkpoint": str(loaded.checkpoint), "data": str(args.data), "split": args.split,
                                 "ranks": acc.num_processes, "images": len(records)})
        from common.atomic import atomic_write_text
        from trainer.reporting.figures import plot_confusion

        atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
        plot_confusion(metrics["confusion"], class_names(cfg.model.num_classes),
                       f"{args.data} ({args.split}) confusion (rows = truth)", out / "confusion.png")
        print(json.dumps({"out": str(out), "n": metrics["n"], "accuracy": round(metrics["accuracy"], 4),
                          "macro_f1": round(metrics["macro_f1"], 4), "qwk": round(metrics["qwk"], 4),
                          "referable_auc": (metrics.get("referable") or {}).get("auc")}))
    acc.wait_for_everyone()
    acc.end_training()
    return metrics

