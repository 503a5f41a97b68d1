"""Training steps of the GPU check harness (see ``launch/gpu_steps.py``): `metaloss bench train` runs in this process
(DALI-fed vs synthetic, interleaved A-B-A), the sync audit, fp16, model.compile, and DeepSpeed ZeRO-2 in a torchrun
child (it needs its own process group)."""
from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import warnings

from launch.gpu_steps import Ctx, result

DALI_GOAL = 0.97        # DALI-fed img/s over synthetic in-GPU data img/s (docs/PERFORMANCE.md)
COMPILED_GOAL = 6000.0  # ResNet-50 bf16 B=256 compiled, img/s on one H200


def _argv(ctx: Ctx, backend: str, *extra: str, warmup: int | None = None) -> list[str]:
    p = ctx.profile
    ov = [f"model.arch={p.arch}", f"data.image_size={p.size}", f"train.batch_size={p.batch}",
          f"train.eval_batch_size={p.batch}", f"train.precision={p.precision}", f"train.max_steps={p.steps}",
          f"logging.every_steps={p.log_every}", f"data.num_workers={p.threads}", "logging.progress=false",
          "train.loss=ce", "model.pretrained=none"]
    if ctx.dry_run:
        ov += ["train.cpu=true", "model.channels_last=false"]
    if backend == "synthetic":
        ov += ["data.backend=synthetic", f"data.synthetic_samples={256 if ctx.dry_run else 4096}"]
    else:
        ov += ["data.backend=dali", f"data.root={ctx.prepared}", "data.format=prepared"]
    return ["configs/aptos_baseline.yaml", *ov, *extra, "--warmup-steps", str(p.warmup if warmup is None else warmup)]


def _bench(ctx: Ctx, argv: list[str], hook=None) -> dict:
    import torch

    from launch.bench import bench_train

    if torch.cuda.is_available() and not ctx.dry_run:
        torch.cuda.reset_peak_memory_stats()
    try:
        return bench_train(argv, on_trainer=hook)
    finally:
        gc.collect()  # the DALI pipelines and the model of this run go before the next one is built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _rate_result(ctx: Ctx, out: dict, **extra) -> dict:
    ok = out["steady_img_per_s"] is not None and out["steps"] == ctx.profile.steps
    keep = ("steps", "steady_img_per_s", "train_img_per_s", "steady_data_wait_frac", "peak_mem_gib", "wall_s",
            "bad_steps", "intervals")
    return result(ok, out["steady_img_per_s"], "img/s (steady state)", **{k: out[k] for k in keep}, **extra)


def train_synthetic_a(ctx: Ctx) -> dict:
    return _rate_result(ctx, _bench(ctx, _argv(ctx, "synthetic")))


train_synthetic_b = train_synthetic_a  # the same run after the DALI one: drift shows as a-vs-b spread


def train_dali(ctx: Ctx) -> dict:
    return _rate_result(ctx, _bench(ctx, _argv(ctx, "dali")))


def dali_ratio(ctx: Ctx) -> dict:
    runs = {k: ctx.result(k) for k in ("train_synthetic_a", "train_dali", "train_synthetic_b")}
    rates = {k: (r or {}).get("value") for k, r in runs.items()}
    if any(v is None for v in rates.values()):
        return result(False, None, "", error=f"a timing run did not finish: {rates}")
    synthetic = (rates["train_synthetic_a"] + rates["train_synthetic_b"]) / 2
    ratio = rates["train_dali"] / synthetic
    spread = abs(rates["train_synthetic_a"] - rates["train_synthetic_b"]) / synthetic
    return result(ctx.dry_run or ratio >= DALI_GOAL, round(ratio, 4), "DALI-fed / synthetic img/s",
                  goal=None if ctx.dry_run else f">= {DALI_GOAL}", synthetic_spread=round(spread, 4), **rates)


@contextlib.contextmanager
def _sync_recorder(records: list, allowed: list):
    """Record every CUDA sync warning (torch.cuda.set_sync_debug_mode('warn')) with whether a logging interval,
    evaluation or checkpoint was running at that moment."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                records.append({"where": f"{filename}:{lineno}", "allowed": bool(allowed), "msg": str(message)[:120]})
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = previous


def sync_audit(ctx: Ctx) -> dict:
    """20 steps of a meta (`exact`) run with CUDA sync warnings on: none may come from outside the logging
    intervals (flush, evaluation, checkpoint, the first batch's image log)."""
    import torch

    p = ctx.profile
    records, allowed = [], []

    def hook(trainer):
        def inside(fn):
            def wrapped(*a, **k):
                allowed.append(1)
                try:
                    return fn(*a, **k)
                finally:
                    allowed.pop()
            return wrapped

        for name in ("_flush_logs", "_sync_logs", "_checkpoint", "_evaluate", "_end_epoch", "_finish"):
            setattr(trainer, name, inside(getattr(trainer, name)))
        trainer.logger.first_batch = inside(trainer.logger.first_batch)
        if not ctx.dry_run:
            torch.cuda.set_sync_debug_mode("warn")

    argv = _argv(ctx, "synthetic", "train.loss=meta", "meta.lookahead=exact", "meta.granularity=class",
                 f"train.batch_size={p.meta_batch}", "train.max_steps=20", "logging.every_steps=10", warmup=0)
    with _sync_recorder(records, allowed):
        out = _bench(ctx, argv, hook)
    stray = [r for r in records if not r["allowed"]]
    where: dict[str, int] = {}
    for r in stray:
        where[r["where"]] = where.get(r["where"], 0) + 1
    return result(out["steps"] == 20 and not stray, len(stray), "syncs outside logging intervals",
                  syncs_inside=len(records) - len(stray), stray_by_location=where, peak_mem_gib=out["peak_mem_gib"],
                  note="CPU dry run: no CUDA syncs exist to audit" if ctx.dry_run else "")


def peak_memory(ctx: Ctx) -> dict:
    """Peak allocated GPU memory of the runs so far (synthetic/DALI ResNet-50 at B=256, the meta run)."""
    peaks = {name: (ctx.result(name) or {}).get("peak_mem_gib")
             for name in ("train_synthetic_a", "train_dali", "train_synthetic_b", "sync_audit")}
    measured = [v for v in peaks.values() if v is not None]
    return result(ctx.dry_run or bool(measured), max(measured) if measured else None, "GiB peak allocated",
                  **peaks, note="CPU dry run: no GPU memory" if ctx.dry_run else "")


def fp16(ctx: Ctx) -> dict:
    out = _bench(ctx, _argv(ctx, "synthetic", "train.precision=fp16"))
    return _rate_result(ctx, out) | {"status": "PASS" if out["bad_steps"] == 0 and out["steps"] == ctx.profile.steps
                                     else "FAIL"}


def compiled(ctx: Ctx) -> dict:
    """model.compile=true: img/s after warm-up, and no new graph for the test evaluation (padded eval batches)."""
    import torch

    graphs: list[tuple[str, int]] = []

    def hook(trainer):
        evaluate = trainer._evaluate

        def counted(split):
            out = evaluate(split)
            graphs.append((split, int(torch._dynamo.utils.counters["stats"]["unique_graphs"])))
            return out
        trainer._evaluate = counted

    torch._dynamo.reset()
    extra = ["model.compile=true"] + (["model.compile_backend=eager"] if ctx.dry_run else [])
    out = _bench(ctx, _argv(ctx, "synthetic", *extra), hook)
    counts = [n for _, n in graphs]
    no_recompile = len(counts) >= 2 and counts[-1] == counts[0]
    fast = ctx.dry_run or (out["steady_img_per_s"] or 0) >= COMPILED_GOAL
    res = _rate_result(ctx, out, graphs_after_each_eval=graphs, goal=None if ctx.dry_run else f">= {COMPILED_GOAL}")
    res["status"] = "PASS" if res["status"] == "PASS" and no_recompile and fast else "FAIL"
    return res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_zero2(ctx: Ctx) -> dict:
    """One GPU, one rank, ZeRO-2 through the real launcher path (torchrun + Accelerate's DeepSpeed plugin)."""
    target = ctx.out / "steps" / "deepspeed_bench.json"
    argv = _argv(ctx, "synthetic", "train.distributed=deepspeed", "train.deepspeed_config=configs/deepspeed/zero2.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(_free_port()),
           "-m", "launch.cli", "bench", "train", *argv, "--json", str(target)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = child.communicate()
    finally:  # a timeout (SIGALRM) or any error: take the whole launcher group down with us
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    (ctx.out / "steps" / "deepspeed.log").write_text(log or "")
    if child.returncode != 0 or not target.is_file():
        return result(False, None, "", error=f"exit {child.returncode}: {(log or '')[-800:]}")
    return _rate_result(ctx, json.loads(target.read_text()))
