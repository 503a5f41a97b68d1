"""launch/bench_meta.py on the tiny CNN: the result table's structure and arithmetic (no timing assertions)."""
import pytest
import torch

from launch.bench_meta import MODES, bench_meta_step, build_runner, format_table, main, _config


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_bench_reports_every_mode_relative_to_plain():
    modes = ("plain", "head", "exact_every4")
    res = bench_meta_step(arch="tiny", image_size=16, batch=8, modes=modes, steps=2, warmup=1)
    assert list(res) == list(modes)
    assert res["plain"]["ratio_vs_plain"] == 1.0
    assert (res["plain"]["cycle"], res["head"]["cycle"], res["exact_every4"]["cycle"]) == (1, 1, 4)
    for m in modes:
        assert res[m]["ms_per_step"] > 0
        assert res[m]["ratio_vs_plain"] == pytest.approx(res[m]["ms_per_step"] / res["plain"]["ms_per_step"])
    table = format_table(res, {**{m: 100.0 for m in modes}, "idle": 90.0})
    assert res["plain"]["cpu_ratio_vs_plain"] == 1.0 and all(res[m]["cpu_ms_per_step"] > 0 for m in modes)
    assert all(m in table for m in modes) and "idle" in table


def test_bench_times_the_trainers_step_runner():
    from trainer.engine.steps import StepRunner

    cfg = _config("head_half", "tiny", 16, 8, "cpu", ["meta.granularity=class"])
    assert (cfg.meta.lookahead, cfg.meta.meta_batch_size, cfg.meta.granularity) == ("head", 4, "class")
    runner, feed = build_runner(cfg)
    assert isinstance(runner, StepRunner) and runner.share_forward
    assert next(runner.meta_stream).labels.shape == (4,)
    assert _config("plain", "tiny", 16, 8, "cpu", []).train.loss == "ce"
    assert set(MODES) >= {"plain", "head", "head_half", "exact", "exact_every4", "second_order"}


def test_bench_cli_rejects_unknown_mode(capsys):
    with pytest.raises(SystemExit):
        main(["--arch", "tiny", "--modes", "plain,fourth_order"])
    assert "fourth_order" in capsys.readouterr().err


def test_bench_cli_rejects_unknown_arch_with_close_matches(capsys):
    with pytest.raises(SystemExit):
        main(["--arch", "resnet-18", "--modes", "plain"])
    assert "close matches: resnet18" in capsys.readouterr().err
