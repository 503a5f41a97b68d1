"""RunLogger at a logging interval: one collective for every statistic (and the trainer's stop flag), meta-weight
histograms copied to the host only where they are written, data_wait_frac = blocked time / interval wall time."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from trainer.config import config_from_dict
from trainer.engine.checkpoint import TrainState
from trainer.engine.steps import StepOutput
from trainer.observability import run_logging
from trainer.observability.run_logging import RunLogger


class _Acc:
    """Stands in for a rank of a 2-rank Accelerator: counts the collectives the logger asks for."""

    def __init__(self, main: bool):
        self.is_main_process, self.num_processes, self.device = main, 2, torch.device("cpu")
        self.reduce_calls = []

    def reduce(self, tensor, reduction):
        self.reduce_calls.append((tuple(tensor.shape), reduction))
        return tensor * 0 + 7.0 if tensor.numel() else tensor  # "the other rank" makes every mean 7


def _logger(tmp_path, main: bool, tensorboard: bool = True) -> RunLogger:
    cfg = config_from_dict({"train": {"loss": "meta", "batch_size": 4},
                            "logging": {"tensorboard": tensorboard, "progress": False}})
    return RunLogger(cfg, tmp_path, _Acc(main), ["a", "b", "c", "d", "e"], quiet=True)


def _out(i: int) -> StepOutput:
    stats = {k: torch.tensor(float(i)) for k in ("train_loss", "weighted_loss", "meta_loss", "w_mean", "w_std",
                                                   "w_min", "w_max")}
    stats["bad_step"] = torch.tensor(0)
    return StepOutput(stats=stats, weights=torch.rand(4), labels=torch.arange(4))


def test_one_collective_per_interval_and_flags_ride_along(tmp_path):
    log = _logger(tmp_path, main=True)
    for i in range(5):
        log.step(i + 1, _out(i), wait_s=0.0, step_s=0.0)
    flags = log.flush_steps(TrainState(world_size=2), {"lr/classifier": 1e-3},
                            flags={"too_many_bad": torch.tensor(1.0)})
    assert log.acc.reduce_calls == [((5 * 8 + 1,), "mean")]  # 8 statistics x 5 steps + the flag, one all-reduce
    assert flags == {"too_many_bad": 7.0}
    log.close()


def test_histograms_are_copied_only_where_they_are_written(tmp_path, monkeypatch):
    copies = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *a, **k):
        copies.append(tuple(self.shape))
        return real_cpu(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    for main in (False, True):
        copies.clear()
        log = _logger(tmp_path / str(main), main=main)
        for i in range(3):
            log.step(i + 1, _out(i), wait_s=0.0, step_s=0.0)
        log.flush_steps(TrainState(world_size=2), {"lr/classifier": 1e-3})
        # every rank: the one flat statistics vector (3 steps x 8); only the main rank the 3 x 4 weights
        assert copies[0] == (24,) and ((12,) in copies) == main
        assert main or copies == [(24,)]
        log.close()


def test_data_wait_frac_is_blocked_time_over_interval_wall_time(tmp_path, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(run_logging.time, "perf_counter", lambda: now[0])
    log = _logger(tmp_path, main=True, tensorboard=False)
    log.restart_clock()
    written = {}
    log.tb = SimpleNamespace(active=False, scalars=lambda step, values: written.update(values), flush=lambda: None, close=lambda: None)
    for i in range(4):  # each step: 0.25 s blocked on the stream, 0.05 s step, 0.2 s elsewhere (e.g. a sync)
        now[0] += 0.5
        log.step(i + 1, _out(i), wait_s=0.25, step_s=0.05)
    log.flush_steps(TrainState(world_size=2), {})
    assert abs(written["perf/data_wait_frac"] - 0.5) < 1e-9  # not 0.25 / (0.25 + 0.05)
    assert abs(written["perf/img_per_s"] - 4 * 4 * 2 / 2.0) < 1e-9


def test_gpu_idle_fraction_adds_the_gaps_between_steps_in_device_time(monkeypatch):
    """CUDA path with a fake event clock: idle = (first begin - interval start) + the gaps between steps."""
    from trainer.observability.step_clock import IdleClock

    now = [0.0]

    class FakeEvent:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.t = now[0]

        def elapsed_time(self, later):  # milliseconds, like torch.cuda.Event
            return (later.t - self.t) * 1000.0

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    clock = IdleClock(torch.device("cuda"))
    clock.restart()
    for begin, end in ((0.1, 0.5), (0.5, 0.9), (1.2, 1.5)):  # gaps: 0.1, 0.0, 0.3 s of a 1.5 s interval
        now[0] = begin
        clock.begin()
        now[0] = end
        clock.end()
    assert clock.idle_fraction(host_wait_s=99.0, wall_s=1.0) == pytest.approx(0.4 / 1.5)  # host numbers unused
    clock.restart()
    assert clock.idle_fraction(host_wait_s=0.0, wall_s=1.0) == 0.0  # no step in the interval
