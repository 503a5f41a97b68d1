"""`metaloss eval` of a DeepSpeed ZeRO-2 run: the per-rank partitions are consolidated to fp32 weights (DeepSpeed's
own zero_to_fp32) and reproduce the run's own test predictions on its test split."""
import csv

import numpy as np
import pytest

from tests.support.cli import tiny_overrides
from tests.support.dist import python, torchrun


def _preds(path):
    with open(path) as f:
        rows = {r["source_id"]: r for r in csv.DictReader(f)}
    return sorted(rows), np.array([[float(rows[k][f"prob_{c}"]) for c in range(5)] for k in sorted(rows)])


@pytest.mark.distributed
@pytest.mark.deepspeed
@pytest.mark.slow
def test_eval_consolidates_a_zero2_run(synth_dir, tmp_path):
    torchrun("-m", "launch.train", "configs/demo.yaml",
             *tiny_overrides(synth_dir, tmp_path, "zero2", "train.distributed=deepspeed", "train.epochs=1",
                             "train.deepspeed_config=configs/deepspeed/zero2.json", "logging.log_images=false"),
             "--quiet", timeout=600)
    run = tmp_path / "zero2"
    (ckpt,) = (run / "checkpoints").iterdir()
    assert (ckpt / "pytorch_model").is_dir() and not (ckpt / "pytorch_model.bin").exists()
    python("-m", "launch.cli", "eval", str(run), "--data", str(synth_dir), "--split", "test", "--out",
           str(tmp_path / "ev"), "--num-workers", "0", "--n-boot", "20")
    ids_run, p_run = _preds(run / "predictions_test.csv")
    ids_ev, p_ev = _preds(tmp_path / "ev" / "predictions_test.csv")
    assert ids_ev == ids_run  # --split test rebuilt the run's test split from its fractions and split seed
    np.testing.assert_allclose(p_ev, p_run, atol=2e-6)
