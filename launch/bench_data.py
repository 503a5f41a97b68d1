"""`metaloss bench data`: throughput of `prepare` and of the two training data backends (DALI vs torch).

    python -m launch.bench_data                       # CPU: synthetic raw set, prepare with 1 and 2 workers,
                                                      #      DALI CPU mode vs torch DataLoader at 2 threads
    python -m launch.bench_data --device cuda --threads 8 --image-size 224 --batch 256 --n 2000   # GPU machine

Numbers are img/s measured after warm-up batches (pipeline build, worker start and first decode excluded) and are
written as JSON (``--json``) for docs/perf_data.md. No test asserts on them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch


def bench_prepare(raw: Path, out_base: Path, workers: list[int], size: int = 512, dataset: str = "aptos") -> list[dict]:
    """prepare img/s for each worker count, each into a fresh output folder (nothing skipped)."""
    from data_pipeline.prepare import prepare_dataset

    rows = []
    for w in workers:
        out = out_base / f"prepared_w{w}"
        shutil.rmtree(out, ignore_errors=True)
        c0, t0 = os.times(), time.perf_counter()
        report = prepare_dataset(dataset, raw, out, size=size, workers=w, progress=False)
        wall, c1 = time.perf_counter() - t0, os.times()
        # pool workers are joined when prepare returns, so their CPU time is in the children_* fields
        cpu = sum(getattr(c1, f) - getattr(c0, f) for f in ("user", "system", "children_user", "children_system"))
        n = report["counts"]["written"]
        rows.append({"workers": w, "images": n, "seconds": round(wall, 2), "img_per_s": round(n / wall, 1),
                     "cpu_ms_per_img": round(1000 * cpu / max(n, 1), 1), "size": size})
    return rows


def _cfg(image_size: int, threads: int, batch: int, device: str):
    from data_pipeline.settings import DataSettings
    from trainer.config import config_from_dict
    cfg = config_from_dict({"data": {"image_size": image_size, "num_workers": threads},
                            "train": {"batch_size": batch, "eval_batch_size": batch, "cpu": device == "cpu"}})
    return DataSettings.from_config(cfg)


def _child_pids() -> list[int]:
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").glob("*"):
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def cpu_seconds() -> dict[int, float]:
    """CPU time (user+sys) of this process (all threads) and of each live child (DataLoader workers), by pid.

    CPU-seconds per image do not depend on what else runs on a shared machine; wall-clock img/s does."""
    tick = os.sysconf("SC_CLK_TCK")
    t = os.times()
    out = {os.getpid(): t.user + t.system}
    for pid in _child_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / tick   # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return out


def _time_stream(stream, batches: int, warmup: int, device: torch.device) -> dict:
    """img/s and CPU ms/img over `batches` batches after `warmup`; batches are moved to `device` as the trainer
    would."""
    it = iter(stream)
    for _ in range(warmup):
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, cpu0, t0 = 0, cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        b = next(it)
        n += int(b.images.shape[0])
        b.images.to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    cpu1 = cpu_seconds()
    cpu = sum(v - cpu0.get(pid, 0.0) for pid, v in cpu1.items())
    return {"images": n, "seconds": round(wall, 3), "img_per_s": round(n / wall, 1),
            "cpu_ms_per_img": round(1000 * cpu / n, 2)}


def load_average() -> float:
    """1-minute load average: recorded with the numbers, since other processes on a shared box skew them."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return -1.0


def bench_backends(prepared: Path, *, image_size: int = 224, threads: int = 2, batch: int = 32, batches: int = 20,
                   warmup: int = 2, device: str = "cpu", backends=("dali", "torch"), repeat: int = 3) -> list[dict]:
    """Train-stream (augmented) and eval-stream img/s of each backend on the same prepared set, same threads.

    The backends are interleaved ``repeat`` times and each row reports the median and the best run, so a burst
    of load from another process on a shared machine hits both backends alike."""
    from data_pipeline.readers import read_dataset

    records = read_dataset("prepared", prepared)
    need = (batches + warmup) * batch
    if len(records) < need:  # cycle the list: throughput does not depend on images being distinct
        records = (records * (need // len(records) + 1))[:need]
    splits = {"train": records, "meta": records, "test": records}
    cfg = _cfg(image_size, threads, batch, device)
    dev = torch.device(device)
    runs: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeat):
        for backend in backends:
            if backend == "dali":
                from data_pipeline.backends.dali.streams import build_dali_streams
                streams = build_dali_streams(cfg, splits, 0, 1, device=dev)
            else:
                from data_pipeline.backends.torch_backend import build_torch_streams
                streams = build_torch_streams(cfg, splits, 0, 1)
            for name, stream in (("train", streams.train), ("eval", streams.eval["test"])):
                runs.setdefault((backend, name), []).append(_time_stream(stream, batches, warmup, dev))
            del streams

    def median(vals):
        return sorted(vals)[len(vals) // 2]

    return [{"backend": backend, "stream": name, "threads": threads, "batch": batch, "image_size": image_size,
             "device": device, "images_per_run": batches * batch, "runs": [r["img_per_s"] for r in rs],
             "img_per_s": median([r["img_per_s"] for r in rs]), "best_img_per_s": max(r["img_per_s"] for r in rs),
             "cpu_ms_per_img": median([r["cpu_ms_per_img"] for r in rs])}
            for (backend, name), rs in runs.items()]


def _pipeline_build_seconds(prepared: Path, image_size: int, threads: int, batch: int, device: str) -> float:
    """Median time to build a train pipeline and get its first batch: the per-epoch cost of exact resume."""
    from data_pipeline.backends.dali.pipelines import AugmentSpec, ListRun, PipelineSpec
    from data_pipeline.readers import read_dataset

    files = [r.path for r in read_dataset("prepared", prepared)][: batch * 4]
    dev_id = torch.cuda.current_device() if device == "cuda" else None
    spec = PipelineSpec(image_size, batch, threads, dev_id, AugmentSpec())
    times = []
    for k in range(5):
        t0 = time.perf_counter()
        run = ListRun(spec, files, seed=k, what="bench")
        next(iter(run))
        times.append(time.perf_counter() - t0)
        del run
    return round(sorted(times)[len(times) // 2], 3)


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, python {sys.version.split()[0]}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="metaloss bench data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", type=Path, help="raw APTOS-layout set; default: generate a synthetic one")
    p.add_argument("--n", type=int, default=200, help="synthetic images to generate (default 200)")
    p.add_argument("--raw-size", type=int, default=1024, help="synthetic image side (default 1024)")
    p.add_argument("--work", type=Path, default=Path("bench_out/data"), help="scratch folder (default bench_out/data)")
    p.add_argument("--size", type=int, default=512, help="prepare: short side of the output JPEGs")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="prepare worker counts to time")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2, help="DALI num_threads = DataLoader num_workers")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3, help="interleaved repeats per backend (median reported)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--skip-prepare", action="store_true", help="reuse WORK/prepared_w<last worker count>")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    raw = args.raw
    if raw is None:
        from data_pipeline.synth import generate_synthetic
        raw = args.work / f"raw_n{args.n}_s{args.raw_size}"
        if not (raw / "train.csv").is_file():
            generate_synthetic(raw, n=args.n, size=args.raw_size, seed=0, progress=False)
    result = {"machine": machine(), "raw": str(raw), "load_average_before": load_average()}
    if not args.skip_prepare:
        result["prepare"] = bench_prepare(raw, args.work, args.workers, size=args.size)
        for row in result["prepare"]:
            print(f"prepare  workers={row['workers']}  {row['images']} img in {row['seconds']} s  "
                  f"= {row['img_per_s']} img/s, {row['cpu_ms_per_img']} CPU ms/img")
    prepared = args.work / f"prepared_w{args.workers[-1]}"
    result["backends"] = bench_backends(prepared, image_size=args.image_size, threads=args.threads,
                                        batch=args.batch, batches=args.batches, device=args.device,
                                        repeat=args.repeat)
    for row in result["backends"]:
        print(f"{row['backend']:5s} {row['stream']:5s} threads={row['threads']} batch={row['batch']} "
              f"{row['image_size']}px {row['device']}: median {row['img_per_s']} img/s (runs {row['runs']}), "
              f"{row['cpu_ms_per_img']} CPU ms/img")
    result["dali_pipeline_build_s"] = _pipeline_build_seconds(prepared, args.image_size, args.threads, args.batch,
                                                              args.device)
    print(f"DALI pipeline build + first batch: {result['dali_pipeline_build_s']} s (median of 5)")
    result["load_average_after"] = load_average()
    print(f"load average before/after: {result['load_average_before']:.2f} / {result['load_average_after']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
