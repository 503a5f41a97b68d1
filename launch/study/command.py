"""`metaloss study STUDY.yaml [--out DIR] [--emit-slurm DIR] [--collect] [--retry-failed] [--jobs N]`.

Exit status: 0 when every run finished; 1 when some run failed (each is listed in study/report.md with its error);
128 + N when stopped by signal N (re-run the same command to continue); 2 for a bad study file.
"""
from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

from launch.study.spec import RunSpec, Study, load_study

log = logging.getLogger(__name__)

HPARAMS_MARKER = ".hparams_logged"  # one hparams session per run, however often the study is collected


def log_hparams(study: Study, run: RunSpec, run_dir: Path) -> None:
    """The run's grid values (and its headline test metrics) in TensorBoard's hparams plugin, in the run's tb dir:
    `tensorboard --logdir OUT/runs` then compares the whole study in the HPARAMS tab."""
    import json

    from torch.utils.tensorboard import SummaryWriter

    from launch.study.results import metric_values

    tb = run_dir / "tb"
    marker = tb / HPARAMS_MARKER
    if not tb.is_dir() or marker.exists():  # logging.tensorboard=false, or logged before
        return
    hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in run.cell}
    hparams.update({"world_size": run.world_size, "train.seed": run.seed})
    test = json.loads((run_dir / "metrics.json").read_text())["test"]
    metrics = {f"hparam/{k}": v for k, v in metric_values(test).items() if v is not None}
    with SummaryWriter(log_dir=str(tb)) as w:
        w.add_hparams(hparams, metrics, run_name=".")
    marker.write_text("")


def _summarise(study: Study, argv_text: str) -> list[dict]:
    from launch.study.report import write_study_report
    from launch.study.results import collect, write_results
    from launch.study.runner import is_finished

    for run in study.runs:  # runs finished elsewhere (a SLURM array) get their hparams here
        if is_finished(study.runs_dir / run.name):
            log_hparams(study, run, study.runs_dir / run.name)
    rows = collect(study)
    results = write_results(study, rows)
    if study.selection is not None:
        from common.atomic import atomic_write_text
        from launch.study.selection import choices_json

        atomic_write_text(study.state_dir / "choices.json", choices_json(study, rows))
    report = write_study_report(study, rows, argv_text)
    print(f"results: {results}\nreport: {report}")
    return rows


def run_study(args, *, debug: bool = False) -> int:
    study = load_study(args.study, out=args.out)
    argv_text = "metaloss study " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["study"] \
        else f"metaloss study {args.study}" + (f" --out {args.out}" if args.out else "")
    if args.emit_slurm:
        from launch.study.slurm import emit_slurm

        scripts = emit_slurm(study, Path(args.emit_slurm))
        for s in scripts:
            print(f"sbatch {s}")
        print(f"# when the arrays are done: metaloss study {study.path} --out {study.out} --collect")
        return 0
    if not args.collect:
        from launch.study.runner import StudyRunner

        log.info("study %s: %d run(s) (%d cell(s) x %d seed(s)) -> %s", study.name, len(study.runs),
                 len(study.runs) // len(study.seeds), len(study.seeds), study.out)
        runner = StudyRunner(study, retry_failed=args.retry_failed, jobs=args.jobs,
                             after_run=lambda run, run_dir: log_hparams(study, run, run_dir))
        runner.run()
        if study.selection is not None and runner.stop_signal is None:
            from launch.study.results import collect
            from launch.study.selection import control_runs

            controls = control_runs(study, collect(study))  # chosen on the select split, so only now
            if controls:
                log.info("study %s: %d CE control run(s) of the chosen meta runs", study.name, len(controls))
                runner.run(controls)
        if runner.stop_signal is not None:
            _summarise(study, argv_text)
            log.warning("study stopped by signal %d; run the same command to continue", runner.stop_signal)
            return 128 + runner.stop_signal
    rows = _summarise(study, argv_text)
    failed = [r["run"] for r in rows if r["status"] == "failed"]
    pending = [r["run"] for r in rows if r["status"] != "done" and r["status"] != "failed"]
    if failed:
        log.error("%d run(s) failed: %s (errors in %s)", len(failed), ", ".join(failed),
                  study.state_dir / "report.md")
        return 1
    if pending and not args.collect:
        return 1
    return 0


def add_study_args(p) -> None:
    p.add_argument("study", help="study file (configs/studies/*.yaml)")
    p.add_argument("--out", default=None, help="study folder (default: the file's 'out', else runs/<name>)")
    p.add_argument("--emit-slurm", default=None, metavar="DIR",
                   help="write sbatch array scripts (one run per task) to DIR instead of running locally")
    p.add_argument("--collect", action="store_true",
                   help="only (re)write study/results.csv and report.md from the run dirs (e.g. after SLURM)")
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again (default: keep them failed)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs at a time on this node (default 1); each gets its own GPUs, or cpus/N threads on CPU")
