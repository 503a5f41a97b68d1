"""launch/bench_meta.py on the tiny CNN: the result table's structure and arithmetic (no timing assertions)."""
import pytest
import torch

from launch.bench_meta import bench_meta_step, format_table, main


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_bench_reports_every_mode_relative_to_plain():
    modes = ("plain", "head", "exact", "exact_fd", "second_order")
    res = bench_meta_step(arch="tiny", image_size=16, batch=8, modes=modes, steps=2, warmup=1)
    assert list(res) == list(modes)
    assert res["plain"]["ratio_vs_plain"] == 1.0
    for m in modes:
        assert res[m]["ms_per_step"] > 0
        assert res[m]["ratio_vs_plain"] == pytest.approx(res[m]["ms_per_step"] / res["plain"]["ms_per_step"])
    table = format_table(res)
    assert all(m in table for m in modes)


def test_bench_cli_rejects_unknown_mode(capsys):
    with pytest.raises(SystemExit):
        main(["--arch", "tiny", "--modes", "plain,fourth_order"])
    assert "fourth_order" in capsys.readouterr().err


def test_bench_cli_rejects_unknown_arch_with_close_matches(capsys):
    with pytest.raises(SystemExit):
        main(["--arch", "resnet-18", "--modes", "plain"])
    assert "close matches: resnet18" in capsys.readouterr().err
