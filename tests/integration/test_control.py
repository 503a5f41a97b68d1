"""The CE control of a meta run (`metaloss train CONFIG --control-of META_RUN`): CE at the meta run's learning rate
times its mean meta weight, everything else identical, refused when what is trained differs."""
from __future__ import annotations

import json

import pytest
import yaml
from accelerate.state import AcceleratorState

from tests.support.cli import tiny_overrides
from launch.train import main as train_main
from trainer.comparison.control import read_control_record


@pytest.fixture
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _meta_run(synth_dir, tmp_path, loss="meta"):
    args = ["configs/demo.yaml", *tiny_overrides(synth_dir, tmp_path, f"m_{loss}", f"train.loss={loss}",
                                                   "train.max_steps=3", "checkpoint.enabled=false",
                                                   "optim.lr=0.002"), "--quiet"]
    assert train_main(args) == 0
    AcceleratorState._reset_state(True)
    return tmp_path / f"m_{loss}"


def test_control_is_ce_at_the_meta_lr_times_the_mean_meta_weight(synth_dir, tmp_path, fresh_accelerate_state):
    meta = _meta_run(synth_dir, tmp_path)
    w_bar = json.loads((meta / "metrics.json").read_text())["meta_weight_mean"]
    assert 0 < w_bar < 1  # a sigmoid weight, so the control's lr differs from the meta run's
    assert train_main([str(meta / "config.yaml"), "--control-of", str(meta), "--quiet"]) == 0
    control = tmp_path / "m_meta_ce_control"
    cfg = yaml.safe_load((control / "config.yaml").read_text())
    saved = yaml.safe_load((meta / "config.yaml").read_text())
    assert cfg["train"]["loss"] == "ce"
    assert cfg["optim"]["lr"] == pytest.approx(0.002 * w_bar, rel=1e-9)
    assert {k: v for k, v in cfg["train"].items() if k != "loss"} == \
        {k: v for k, v in saved["train"].items() if k != "loss"}
    assert cfg["data"] == saved["data"] and cfg["model"] == saved["model"]
    assert read_control_record(control) == {"control_of": str(meta), "meta_weight_mean": w_bar,
                                            "lr": cfg["optim"]["lr"]}
    assert json.loads((control / "metrics.json").read_text())["loss"] == "ce"


def test_control_that_trains_something_else_is_refused(synth_dir, tmp_path, fresh_accelerate_state, capsys):
    meta = _meta_run(synth_dir, tmp_path)
    with pytest.raises(SystemExit) as exc:
        train_main([str(meta / "config.yaml"), "--control-of", str(meta), "train.seed=5", "model.arch=resnet18",
                    "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "train.seed: 0 (meta run) vs 5" in err and "model.arch" in err
    assert not (tmp_path / "m_meta_ce_control").exists()


def test_control_of_a_run_that_is_not_meta_is_refused(synth_dir, tmp_path, fresh_accelerate_state, capsys):
    ce = _meta_run(synth_dir, tmp_path, loss="ce")
    with pytest.raises(SystemExit):
        train_main([str(ce / "config.yaml"), "--control-of", str(ce), "--quiet"])
    assert "train.loss is 'ce', not meta" in capsys.readouterr().err
