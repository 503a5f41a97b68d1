"""`metaloss prepare`: a raw fundus data set -> cropped, resized JPEGs + manifest.csv + prepare_report.json.

Raw APTOS PNGs decode at ~3 img/s per core; training reads every image every epoch, so it pays to crop the black
border, shrink to 512 px and re-encode as JPEG q95 once. Output layout (readable as data.format=prepared):

    OUT/images/<source_id>.jpg     one per usable image
    OUT/manifest.csv               path,label,source_id   (path relative to OUT)
    OUT/prepare_report.json        counts, per-class counts, quarantine list with reasons, timing
    OUT/prepare_state.jsonl        resume record: output size + sha1 + source stamp + parameters per image

Robustness: every image is handled inside a try in its worker and comes back as a result record -- written,
skipped (already done) or quarantined with a reason -- so one corrupt file never stops a 35k-image run and no
worker traceback reaches the user. Writes are atomic (temp file in the same folder + os.replace); the state line is
appended only after the image is in place, so a killed run resumes where it stopped and never trusts a half file.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterable, Iterator

from common.atomic import atomic_write_bytes, atomic_write_text
from data_pipeline.image_ops import MIN_SIDE, encode_jpeg, prepare_image
from data_pipeline.readers import read_dataset_report
from data_pipeline.records import DataError, Record, class_names
from common.errors import UserError

STATE_FILE = "prepare_state.jsonl"
MANIFEST_FILE = "manifest.csv"
REPORT_FILE = "prepare_report.json"
IMAGE_DIR = "images"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def output_name(source_id: str) -> str:
    """File name for a source id: kept as is when filesystem-safe, else sanitised + a hash (ids like
    'imgs/a b.png' from the csv layout must neither create folders nor collide with 'imgs_a_b.png')."""
    safe = _SAFE_NAME.sub("_", source_id)[:150]
    if safe != source_id or safe.startswith("."):
        safe = f"{safe.lstrip('.') or 'id'}-{hashlib.sha1(source_id.encode()).hexdigest()[:8]}"
    return f"{safe}.jpg"


class PrepareAborted(UserError, RuntimeError):
    """The run cannot go on (a worker process died); finished images are kept and a re-run resumes."""


def _sha1_file(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _source_stamp(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _is_done(out_path: Path, expect: dict | None, stamp: list[int], params: dict) -> bool:
    """A previous run's output is reused only if everything that produced it is unchanged and it is intact."""
    if not expect or expect.get("params") != params or expect.get("src") != stamp:
        return False
    try:
        return out_path.stat().st_size == expect["bytes"] and _sha1_file(out_path) == expect["sha1"]
    except OSError:
        return False


def process_one(task: dict) -> dict:
    """Worker: one image -> a result record. Never raises (an exception would surface as a worker traceback)."""
    rec = task["source_id"]
    result = {"source_id": rec, "file": task["src"], "status": "quarantined", "reason": ""}
    try:
        out_path = Path(task["out_dir"]) / IMAGE_DIR / task["name"]
        stamp = _source_stamp(task["src"])
        params = task["params"]
        if _is_done(out_path, task.get("expect"), stamp, params):
            result.update(status="skipped", **{k: task["expect"][k] for k in ("bytes", "sha1")})
            return result
        img = prepare_image(task["src"], params["size"], ben=params["ben_graham"])
        data = encode_jpeg(img)
        try:
            atomic_write_bytes(out_path, data)
        except OSError as e:  # the output's problem (disk full, read-only), not this image's: the run must stop
            result.update(status="write_failed", errno=e.errno, reason=e.strerror, out=str(out_path))
            return result
        result.update(status="written", bytes=len(data), sha1=hashlib.sha1(data).hexdigest(), src=stamp,
                      params=params, width=img.size[0], height=img.size[1])
    except DataError as e:  # ImageError: the image itself is unusable
        result["reason"] = str(e)
    except FileNotFoundError as e:
        result["reason"] = f"file disappeared: {e.filename}"
    except Exception as e:  # noqa: BLE001 -- anything else is still this image's problem, not the run's
        result["reason"] = f"{type(e).__name__}: {e}"
    return result


def load_state(out: Path) -> dict[str, dict]:
    """Last valid state line per source id; a torn last line (killed mid-append) is ignored."""
    state: dict[str, dict] = {}
    path = out / STATE_FILE
    if not path.is_file():
        return state
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
                state[entry["source_id"]] = entry
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return state


def _end_torn_line(path: Path) -> None:
    """A killed run may leave a half line; start on a fresh line so the next entry is not glued to it."""
    try:
        with open(path, "rb+") as f:
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
    except FileNotFoundError:
        pass


def _write_manifest(out: Path, rows: list[tuple[str, int, str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "source_id"])
    w.writerows(rows)
    atomic_write_text(out / MANIFEST_FILE, buf.getvalue())


def _run_tasks(tasks: list[dict], workers: int) -> Iterator[dict]:
    if workers == 1 or len(tasks) <= 1:
        yield from map(process_one, tasks)
        return
    chunksize = max(1, min(16, len(tasks) // (workers * 4)))
    pool = ProcessPoolExecutor(max_workers=workers)
    try:
        yield from pool.map(process_one, tasks, chunksize=chunksize)
    finally:
        # closed early (disk full, Ctrl-C): drop the queued images instead of decoding every one of them first
        pool.shutdown(wait=True, cancel_futures=True)


def _progress(items: Iterable[dict], total: int, enabled: bool) -> Iterable[dict]:
    if not enabled or not sys.stderr.isatty():
        return items
    from tqdm import tqdm
    return tqdm(items, total=total, desc="prepare", unit="img")


def prepare_dataset(dataset: str, src: str | Path, out: str | Path, *, size: int = 512, workers: int | None = None,
                    ben_graham: bool = False, num_classes: int = 5, path_col: str = "path", label_col: str = "label",
                    progress: bool = True) -> dict:
    """Prepare ``src`` (layout ``dataset``) into ``out``; returns the report (also written to prepare_report.json).

    Re-running with the same arguments skips finished images (verified by size + sha1); changing ``size`` or
    ``ben_graham``, or a changed source file, redoes the affected images.
    """
    if size < MIN_SIDE:
        raise ValueError(f"size must be >= {MIN_SIDE} px, got {size}")
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    records, bad_rows = read_dataset_report(dataset, src, num_classes=num_classes, path_col=path_col,
                                            label_col=label_col, skip_bad=True)
    out = Path(out).expanduser().resolve()
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    state = load_state(out)
    params = {"size": int(size), "ben_graham": bool(ben_graham)}
    tasks = [{"source_id": r.source_id, "src": r.path, "out_dir": str(out), "name": output_name(r.source_id),
              "params": params, "expect": state.get(r.source_id)} for r in records]

    results: dict[str, dict] = {}
    runner = _run_tasks(tasks, workers)
    try:
        _end_torn_line(out / STATE_FILE)
        with open(out / STATE_FILE, "a", encoding="utf-8") as state_file:
            for res in _progress(runner, len(tasks), progress):
                if res["status"] == "write_failed":  # stop before the report/manifest: the old ones stay valid
                    raise OSError(res["errno"], res["reason"], res["out"])
                results[res["source_id"]] = res
                if res["status"] == "written":
                    try:
                        state_file.write(json.dumps({k: res[k] for k in ("source_id", "bytes", "sha1", "src",
                                                                         "params")}) + "\n")
                        state_file.flush()  # the image is in place: a kill after this line must not redo it
                    except OSError as e:  # disk full: name the file (write() does not)
                        raise OSError(e.errno, e.strerror, str(out / STATE_FILE)) from e
    except BrokenProcessPool:
        raise PrepareAborted(f"a prepare worker process died (out of memory on a huge image?) after "
                             f"{len(results)} of {len(tasks)} images; the finished images are kept -- re-run the "
                             f"same command (with fewer --workers) to resume") from None
    finally:
        runner.close()

    return _finish(dataset, src, out, records, bad_rows, results, tasks, num_classes, params, workers,
                   time.perf_counter() - t0)


def _finish(dataset, src, out: Path, records: list[Record], bad_rows, results: dict[str, dict], tasks: list[dict],
            num_classes: int, params: dict, workers: int, seconds: float) -> dict:
    names = class_names(num_classes)
    manifest, quarantined, per_class = [], [], {name: 0 for name in names}
    state_lines = []
    for rec, task in zip(records, tasks):
        res = results[rec.source_id]
        if res["status"] == "quarantined":
            quarantined.append({"source_id": rec.source_id, "file": rec.path, "reason": res["reason"]})
            continue
        manifest.append((f"{IMAGE_DIR}/{task['name']}", rec.label, rec.source_id))
        per_class[names[rec.label]] += 1
        entry = task["expect"] if res["status"] == "skipped" else res
        state_lines.append(json.dumps({k: entry[k] for k in ("source_id", "bytes", "sha1", "src", "params")}))
    reader_rejects = [{"source_id": b.source_id, "file": f"{b.file}:{b.line}" if b.file else f"line {b.line}",
                       "reason": b.reason} for b in bad_rows]
    counts = {"total": len(records) + len(bad_rows),
              "written": sum(r["status"] == "written" for r in results.values()),
              "skipped_existing": sum(r["status"] == "skipped" for r in results.values()),
              "quarantined": len(quarantined) + len(reader_rejects)}
    report = {"dataset": dataset, "src": str(src), "out": str(out), "counts": counts, "per_class": per_class,
              "quarantined": reader_rejects + quarantined, "seconds": round(seconds, 3),
              "img_per_s": round(counts["written"] / seconds, 2) if seconds > 0 else 0.0,
              "workers": workers, "size": params["size"], "ben_graham": params["ben_graham"]}
    atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    # compact the resume record to exactly the images in the manifest (the append log only grows otherwise)
    atomic_write_text(out / STATE_FILE, "".join(line + "\n" for line in state_lines))
    if not manifest:  # the report (with every reason) is on disk; an empty manifest would only fail later
        raise DataError(f"prepare {dataset} {src}: no image could be prepared; see {out / REPORT_FILE} "
                        f"(first reasons: {[q['reason'] for q in report['quarantined'][:3]]})")
    _write_manifest(out, manifest)
    return report
