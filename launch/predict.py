"""`metaloss predict CHECKPOINT IMAGES... | --dir DIR --out preds.csv [--tta flip]`: grade new fundus images.

Each image goes through what the training images went through (RUN/preprocessing.json, written by the trainer):
for a model trained on a prepared dir, the prepare crop + resize at the recorded size (and Ben Graham filter) and
the JPEG q95 round trip, then the eval transform; for a model trained on a raw layout, the same decode and the eval
transform only. Output, one row per image: grade, per-grade probabilities, P(referable) and the referable flag
(predicted grade >= eval.referable_from, as in metrics.json). An unreadable image gets a row with status `error` and
the reason -- it never stops the others. ``--tta flip`` averages the probabilities of the image and its mirror.
"""
from __future__ import annotations

import csv
import io
import logging
import sys
from pathlib import Path

from launch.errors import UsageError, user_errors_exit

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def add_predict_args(p) -> None:
    p.add_argument("checkpoint", help="run dir (its newest checkpoint) or a checkpoint dir")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--dir", default=None, help="grade every image file under DIR (recursively)")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--tta", choices=["none", "flip"], default="none", help="flip: average with the mirrored image")
    p.add_argument("--batch-size", type=int, default=32)


def _inputs(args) -> list[Path]:
    paths = [Path(p) for p in args.images]
    if args.dir:
        root = Path(args.dir)
        if not root.is_dir():
            raise UsageError(f"--dir {root}: not a directory")
        paths += sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UsageError("no images: give image files or --dir DIR (with .png/.jpg/.jpeg/.tif/.bmp files)")
    return paths


def preprocessor(pre: dict):
    """path -> normalised 3 x S x S tensor, repeating the training data's preprocessing."""
    from PIL import Image

    from data_pipeline.backends.transforms import eval_transform
    from data_pipeline.image_ops import encode_jpeg, load_rgb, prepare_image

    transform = eval_transform(int(pre["image_size"]))
    prepared = pre.get("prepared")
    if prepared and prepared.get("size") is None:
        from trainer.engine.inference import InferenceError

        raise InferenceError("the run trained on a prepared dir without prepare_report.json, so its crop size is "
                             "unknown: prepare the images with `metaloss prepare` and grade the prepared files")

    def load(path: Path):
        if prepared:
            img = prepare_image(str(path), int(prepared["size"]), ben=bool(prepared["ben_graham"]))
            img = Image.open(io.BytesIO(encode_jpeg(img))).convert("RGB")  # the prepared set is JPEG q95
        else:
            img = load_rgb(str(path))[0]
        return transform(img)
    return load


@user_errors_exit
def run_predict(args, *, debug: bool = False) -> list[dict]:
    import torch

    from common.atomic import atomic_write
    from data_pipeline.records import class_names
    from trainer.clinical_metrics import referable_enabled
    from trainer.engine.inference import InferenceError, load_trained_model
    from trainer.engine.provenance import describe_preprocessing, read_preprocessing

    paths = _inputs(args)
    loaded = load_trained_model(args.checkpoint)
    cfg, k = loaded.cfg, loaded.num_classes
    pre = read_preprocessing(loaded.run_dir)
    if pre is None:
        try:  # a run from before preprocessing.json: its data set may still be there to describe
            pre = describe_preprocessing(cfg)
        except Exception:  # noqa: BLE001
            raise InferenceError(f"{loaded.run_dir}: no preprocessing.json and its data set {cfg.data.root!r} is "
                                 "gone, so the training preprocessing is unknown") from None
    load = preprocessor(pre)
    ref = cfg.eval.referable_from if referable_enabled(cfg.eval.referable_from, k) else None
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.train.cpu else "cpu")
    model = loaded.model.to(device)
    names = class_names(k)
    rows: list[dict] = []
    batch: list[tuple[Path, torch.Tensor]] = []

    def flush():
        if not batch:
            return
        x = torch.stack([t for _, t in batch]).to(device)
        with torch.no_grad():
            probs = torch.softmax(model(x).float(), 1)
            if args.tta == "flip":
                probs = (probs + torch.softmax(model(torch.flip(x, dims=[3])).float(), 1)) / 2
        for (path, _), p in zip(batch, probs.cpu().numpy()):
            grade = int(p.argmax())
            row = {"path": str(path), "status": "ok", "grade": grade, "grade_name": names[grade],
                   **{f"prob_{c}": f"{p[c]:.6f}" for c in range(k)}, "error": ""}
            if ref is not None:
                row.update(p_referable=f"{p[ref:].sum():.6f}", referable=int(grade >= ref))
            rows.append(row)
        batch.clear()

    for path in paths:
        try:
            batch.append((path, load(path)))
        except Exception as e:  # noqa: BLE001 -- any decoder failure is this image's problem, not the run's
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            rows.append({"path": str(path), "status": "error", "error": reason})
        if len(batch) >= args.batch_size:
            flush()
    flush()
    order = {str(p): i for i, p in enumerate(paths)}
    rows.sort(key=lambda r: order[r["path"]])
    cols = ["path", "status", "grade", "grade_name", *(f"prob_{c}" for c in range(k))]
    cols += ["p_referable", "referable"] if ref is not None else []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        w = csv.DictWriter(f, fieldnames=cols + ["error"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    bad = [r for r in rows if r["status"] == "error"]
    for r in bad:
        print(f"metaloss predict: unreadable, skipped: {r['path']}: {r['error']}", file=sys.stderr)
    print(f"{out}: {len(rows) - len(bad)} graded, {len(bad)} unreadable (tta {args.tta}, "
          f"preprocessing {'prepare crop ' + str(pre['prepared']['size']) + ' px' if pre.get('prepared') else 'raw'}"
          f" -> {pre['image_size']} px)")
    return rows
