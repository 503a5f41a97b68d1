"""The steps of the GPU check harness (driver: ``launch/gpu_checks.py``). Run by the driver in one child process:

    python -m launch.gpu_steps --out DIR --steps env,imports,... [--dry-run] [--budget S]

Each step returns {"status": PASS|FAIL|SKIP, "value": a number, "unit", ...details}; this module prints
``@@start NAME`` / ``@@result {json}`` lines for the driver, writes ``DIR/steps/NAME.json`` and time-boxes the step
with SIGALRM. ``--dry-run``: CPU, the tiny CNN at 32 px, DALI in CPU mode -- the same code paths, minutes smaller,
so the harness cannot rot (tests/test_gpu_checks_dry_run.py runs it inside `make test`).
Thresholds are a-priori goals (docs/PERFORMANCE.md); none was calibrated on a GPU (no GPU has run this code yet).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import platform
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Profile:
    arch: str
    size: int            # training image side
    batch: int
    precision: str
    steps: int           # bench train max_steps
    warmup: int          # steps left out of the steady-state rate
    log_every: int
    synth_n: int         # distinct synthetic fundus images generated, then prepared
    raw_size: int
    prep_size: int       # prepared JPEG short side
    copies: int          # the prepared set is listed this many times (symlinks): epochs long enough to time
    threads: int         # DALI threads per pipeline / DataLoader workers
    cosine_batch: int
    meta_batch: int      # sync audit: meta run batch


GPU = Profile("resnet50", 224, 256, "bf16", 100, 40, 20, 512, 640, 512, 8, 8, 8, 64)
DRY = Profile("tiny", 32, 8, "fp32", 12, 4, 4, 24, 96, 64, 4, 1, 4, 8)

# name -> (module:function, limit on a GPU in s, limit in a dry run in s or 0 = skipped there). The dry-run limits
# bound hangs, not speed: they are 2-3x what a step takes on an idle 2-core CPU, since CI and this VM are shared
# (sync_audit took 15+ s of its 15 s under load). `env` stays short: the hung-step test waits for its limit.
STEPS = {
    "env": ("launch.gpu_steps:env", 20, 10),
    "imports": ("launch.gpu_steps:imports", 30, 40),
    "data": ("launch.gpu_steps:data", 60, 40),
    "dali_decode": ("launch.gpu_steps:dali_decode", 40, 30),
    "grad_cosine": ("launch.gpu_steps:grad_cosine", 60, 30),
    "meta_step": ("launch.gpu_steps:meta_step", 45, 40),
    "sdpa_forward_ad": ("launch.gpu_steps:sdpa_forward_ad", 20, 20),
    "train_synthetic_a": ("launch.gpu_steps_train:train_synthetic_a", 45, 30),
    "train_dali": ("launch.gpu_steps_train:train_dali", 60, 40),
    "train_synthetic_b": ("launch.gpu_steps_train:train_synthetic_b", 45, 30),
    "dali_ratio": ("launch.gpu_steps_train:dali_ratio", 5, 5),
    "sync_audit": ("launch.gpu_steps_train:sync_audit", 60, 40),
    "peak_memory": ("launch.gpu_steps_train:peak_memory", 5, 5),
    "fp16": ("launch.gpu_steps_train:fp16", 45, 0),
    "compile": ("launch.gpu_steps_train:compiled", 150, 60),
    "deepspeed_zero2": ("launch.gpu_steps_train:deepspeed_zero2", 90, 0),
    "meta_step_families": ("launch.gpu_steps:meta_step_families", 60, 0),
}
SKIPPED_IN_DRY_RUN = {"fp16": "fp16 needs a GPU (GradScaler on CUDA)",
                      "deepspeed_zero2": "covered on CPU by tests/distributed/test_distributed_deepspeed.py (gloo)",
                      "meta_step_families": "ViT-B/16 and EfficientNet-B3 are GPU-sized; meta_step runs the same code"}


def step_limits(dry_run: bool) -> dict[str, int]:
    return {name: (dry if dry_run else gpu) or 5 for name, (_, gpu, dry) in STEPS.items()}


class StepTimeout(Exception):
    pass


@dataclass
class Ctx:
    out: Path
    dry_run: bool
    profile: Profile

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    @property
    def prepared(self) -> Path:
        return self.out / "data" / "prepared_x"

    def result(self, name: str) -> dict | None:
        path = self.out / "steps" / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None


def result(ok: bool, value, unit: str = "", **detail) -> dict:
    return {"status": "PASS" if ok else "FAIL", "value": value, "unit": unit, **detail}


# --- steps ----------------------------------------------------------------------------------------------------------
def env(ctx: Ctx) -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "cudnn": torch.backends.cudnn.version()}
    if ctx.dry_run:
        return result(True, os.cpu_count(), "CPU cores", **info)
    if not torch.cuda.is_available():
        return result(False, 0, "GPUs", error="torch.cuda.is_available() is False", **info)
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, gpus=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}")
    return result(True, round(props.total_memory / 2**30, 1), "GiB GPU memory", **info)


def imports(ctx: Ctx) -> dict:
    needed = ["accelerate", "yaml", "tensorboard", "sklearn", "matplotlib", "PIL", "tqdm", "nvidia.dali",
              "deepspeed", "transformers"]
    missing, versions = {}, {}
    for mod in needed:
        try:
            if ctx.dry_run:  # the wiring only: importing deepspeed + transformers costs ~10 s of a 60 s dry run
                if importlib.util.find_spec(mod) is None:
                    raise ImportError(f"no module named {mod!r}")
                versions[mod] = "found"
                continue
            versions[mod] = getattr(importlib.import_module(mod), "__version__", "?")
        except Exception as e:  # noqa: BLE001 -- report every missing import, not just the first
            missing[mod] = f"{type(e).__name__}: {e}"[:200]
    hint = ("carry them: `python -m launch.trainer_wheels DIR --with deepspeed,transformers` on a machine with a "
            "registry, then WHEELS_DIR=\"dali_whl DIR\"") if missing else ""
    return result(not missing, len(missing), "missing imports", missing=missing, versions=versions, hint=hint)


def data(ctx: Ctx) -> dict:
    """Synthetic fundus PNGs -> `prepare` (crop, short side 512, JPEG q95) -> the set listed ``copies`` times."""
    from data_pipeline.prepare import prepare_dataset
    from data_pipeline.synth import generate_synthetic

    p, work = ctx.profile, ctx.out / "data"
    raw = generate_synthetic(work / "raw", n=p.synth_n, size=p.raw_size, seed=0, workers=os.cpu_count(),
                             progress=False)
    t0 = time.perf_counter()
    report = prepare_dataset("aptos", raw, work / "prepared", size=p.prep_size, workers=os.cpu_count(),
                             progress=False)
    prep_s = time.perf_counter() - t0
    rows = (work / "prepared" / "manifest.csv").read_text().splitlines()
    header, body = rows[0], rows[1:]
    cols = header.split(",")
    dest = ctx.prepared
    dest.mkdir(parents=True, exist_ok=True)
    lines = [header]
    for k in range(p.copies):  # distinct paths (symlinks): DALI and the page cache see a bigger set
        for row in body:
            vals = row.split(",")
            src = work / "prepared" / vals[cols.index("path")]
            link = dest / f"c{k}" / vals[cols.index("path")]
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(src.resolve())
            vals[cols.index("path")] = str(link.relative_to(dest))
            vals[cols.index("source_id")] = f"c{k}_{vals[cols.index('source_id')]}"
            lines.append(",".join(vals))
    (dest / "manifest.csv").write_text("\n".join(lines) + "\n")
    n = report["counts"]["written"]
    return result(n == p.synth_n, n * p.copies, "images listed", prepared=n,
                  prepare_img_per_s=round(n / prep_s, 1))


def dali_decode(ctx: Ctx) -> dict:
    """The same 512 px prepared JPEGs through DALI's GPU ("mixed", nvJPEG) and CPU decoders, no resize, compared in
    grey levels. Dry run: CPU against CPU (checks the wiring only)."""
    import numpy as np
    import torch

    from common.normalization import IMAGENET_STD
    from data_pipeline.backends.dali.pipelines import ListRun, PipelineSpec
    from data_pipeline.readers import read_dataset

    p = ctx.profile
    files = [r.path for r in read_dataset("prepared", ctx.out / "data" / "prepared")][:64]
    gpu_id = None if ctx.dry_run else torch.cuda.current_device()

    def decode(device_id):
        spec = PipelineSpec(p.prep_size, 16, p.threads, device_id, None)
        return torch.cat([imgs.float().cpu().contiguous() for imgs, _ in ListRun(spec, files, seed=0,
                                                                                   what="decode check")])

    a, b = decode(gpu_id), decode(None)
    levels = (a - b).abs() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255  # back to 0..255 grey levels
    flat = levels.flatten().numpy()
    mean, p999, worst = float(flat.mean()), float(np.quantile(flat, 0.999)), float(flat.max())
    ok = mean <= 1.0 and p999 <= 8.0
    return result(ok, round(mean, 3), "mean |GPU - CPU| grey levels", p99_9=round(p999, 2), max=round(worst, 2),
                  images=len(files), side=p.prep_size, goal="mean <= 1, 99.9th percentile <= 8 grey levels")


def grad_cosine(ctx: Ctx) -> dict:
    """∇φ of `exact` vs `second_order` and of `fd` vs forward-mode, on one model state (ResNet-50, bf16 autocast)."""
    import torch

    from trainer.components.models import build_model
    from trainer.config import ModelConfig
    from trainer.meta import MetaReweighter

    p, dev = ctx.profile, ctx.device
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=p.arch, num_classes=5)).to(dev).train()
    if dev == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    batch = lambda: (torch.randn(p.cosine_batch, 3, p.size, p.size, generator=g).to(dev),  # noqa: E731
                     torch.randint(0, 5, (p.cosine_batch,), generator=g).to(dev))
    train, meta = batch(), batch()
    autocast = (lambda: torch.autocast(dev, dtype=torch.bfloat16)) if p.precision == "bf16" else None

    def grads(lookahead, directional="forward_ad"):
        torch.manual_seed(2)  # the same φ for every mode
        rw = MetaReweighter.from_dict({"granularity": "class", "lookahead": lookahead, "directional": directional},
                                      5).to(dev)
        out = rw.meta_gradient(model, train, meta, 1e-3, optimizer=opt, autocast=autocast)
        return torch.cat([x.flatten().double() for x in out])

    def cos(u, v):
        return float(torch.nn.functional.cosine_similarity(u, v, dim=0))

    exact, second, fd = grads("exact"), grads("second_order"), grads("exact", "fd")
    c1, c2 = cos(exact, second), cos(fd, exact)
    return result(min(c1, c2) >= 0.99, round(min(c1, c2), 5), "min cosine", exact_vs_second_order=round(c1, 5),
                  fd_vs_forward_ad=round(c2, 5), arch=p.arch, batch=p.cosine_batch, precision=p.precision,
                  goal=">= 0.99")


def meta_step(ctx: Ctx) -> dict:
    """Meta step cost vs a plain step, interleaved in one process (launch/bench_meta.py): ResNet-50 224 px bf16
    B=128 on a GPU; goals `exact` <= 3x, `head` <= 1.15x."""
    from launch.bench_meta import bench_meta_step

    p = ctx.profile
    batch = 128 if not ctx.dry_run else p.batch
    res = bench_meta_step(p.arch, p.size, batch, ("plain", "head", "exact"), steps=5, warmup=2,
                          precision=p.precision, device=ctx.device, granularity="batch")
    exact, head = res["exact"]["ratio_vs_plain"], res["head"]["ratio_vs_plain"]
    ok = ctx.dry_run or (exact <= 3.0 and head <= 1.15)
    return result(ok, round(exact, 3), "x plain (exact)", head_x_plain=round(head, 3), batch=batch,
                  ms_per_step={m: round(r["ms_per_step"], 2) for m, r in res.items()},
                  goal=None if ctx.dry_run else "exact <= 3x, head <= 1.15x")


def sdpa_forward_ad(ctx: Ctx) -> dict:
    """Which SDPA kernels take dual numbers (the `exact` look-ahead runs its dual pass under MATH, which must)."""
    import torch
    from torch.nn.attention import SDPBackend

    from launch.check_sdpa_forward_ad import tangent

    dtype = torch.bfloat16 if not ctx.dry_run else torch.float32
    gen = torch.Generator().manual_seed(0)
    q, k, v, dq = (torch.randn(2, 4, 64, 32, generator=gen).to(ctx.device, dtype) for _ in range(4))
    reference = tangent(SDPBackend.MATH, q, k, v, dq).float()
    kernels = {}
    for name in ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        try:
            diff = (tangent(getattr(SDPBackend, name), q, k, v, dq).float() - reference).abs().max().item()
            kernels[name] = f"ok, max |tangent - MATH| = {diff:.2e}"
        except Exception as e:  # noqa: BLE001 -- not implemented / not available for this device, dtype or shape
            kernels[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    working = sum(v.startswith("ok") for v in kernels.values())
    return result(kernels["MATH"].startswith("ok"), working, "kernels with forward AD", kernels=kernels)


def meta_step_families(ctx: Ctx) -> dict:
    """Meta-step cost of the other model families: ViT-B/16 224 px B=64, EfficientNet-B3 512 px B=16 (bf16)."""
    from launch.bench_meta import bench_meta_step

    ratios = {}
    for arch, size, batch in (("vit_b_16", 224, 64), ("efficientnet_b3", 512, 16)):
        res = bench_meta_step(arch, size, batch, ("plain", "head", "exact"), steps=5, warmup=2, precision="bf16",
                              device=ctx.device)
        ratios[arch] = {m: round(r["ratio_vs_plain"], 3) for m, r in res.items()}
    return result(True, ratios["vit_b_16"]["exact"], "x plain (exact, ViT-B/16)", ratios=ratios)


# --- runner ---------------------------------------------------------------------------------------------------------
def _alarm(signum, frame):
    raise StepTimeout()


def _call(spec: str, ctx: Ctx) -> dict:
    if os.environ.get("METALOSS_TEST_FAULT") == f"gpu_step_hang:{spec.split(':')[1]}":
        # tests: a hang SIGALRM cannot break (like one inside a CUDA or DALI call); only the driver's kill ends it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(3600)
    module, fn = spec.split(":")
    return getattr(importlib.import_module(module), fn)(ctx)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.gpu_steps")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", required=True)
    ap.add_argument("--budget", type=float, default=290.0)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    ctx = Ctx(args.out, args.dry_run, DRY if args.dry_run else GPU)
    (args.out / "steps").mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    limits = step_limits(args.dry_run)
    # heavy imports first, outside every step's alarm: an import cut by SIGALRM leaves torch half-initialised
    import torch  # noqa: F401
    # a host without accelerate or DALI still runs the steps that do not need them (`imports` names what is missing)
    with contextlib.suppress(ImportError):
        import trainer.engine.trainer  # noqa: F401
    with contextlib.suppress(ImportError):
        import nvidia.dali.plugin.pytorch  # noqa: F401
    signal.signal(signal.SIGALRM, _alarm)
    for name in args.steps.split(","):
        print(f"@@start {name}", flush=True)
        t0 = time.monotonic()
        limit = max(1, int(min(limits[name], deadline - t0)))
        if args.dry_run and name in SKIPPED_IN_DRY_RUN:
            res = {"status": "SKIP", "value": None, "error": SKIPPED_IN_DRY_RUN[name]}
        else:
            signal.alarm(limit)
            try:
                res = _call(STEPS[name][0], ctx)
            except StepTimeout:
                res = {"status": "FAIL", "value": None, "error": f"over its {limit} s limit"}
            except Exception as e:  # noqa: BLE001 -- a failing step is a result; the next step still runs
                res = {"status": "FAIL", "value": None, "error": f"{type(e).__name__}: {e}"[:1000],
                       "traceback": traceback.format_exc()[-3000:]}
            finally:
                signal.alarm(0)
        res["seconds"] = round(time.monotonic() - t0, 1)
        (args.out / "steps" / f"{name}.json").write_text(json.dumps(res, indent=2))
        print("@@result " + json.dumps({"name": name, **res}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
