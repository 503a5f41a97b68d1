"""Evaluate a checkpoint on the test split with however many ranks this is launched with.

    [torchrun --nproc_per_node N] tests/distributed/dist_scripts/evaluate_checkpoint.py OUT_JSON CHECKPOINT CONFIG [key=value ...]

Builds the Trainer exactly as training does (a new run dir named by run.name, the same split), loads CHECKPOINT, runs
the run's final test evaluation (``Trainer.evaluate_final_test``) and has the main process write {"metrics", "ids", "labels", "probs"} to OUT_JSON.
"""
from __future__ import annotations

import json
import sys


def main() -> int:
    out_json, checkpoint, config, *overrides = sys.argv[1:]
    from launch.errors import setup_logging
    from trainer.config import load_config
    from trainer.engine.trainer import Trainer

    setup_logging()
    trainer = Trainer(load_config(config, overrides), resume=checkpoint, quiet=True)
    metrics, pred = trainer.evaluate_final_test()
    if trainer.accelerator.is_main_process:
        with open(out_json, "w") as f:
            json.dump({"world": trainer.accelerator.num_processes, "metrics": metrics, "ids": pred.ids.tolist(),
                       "labels": pred.labels.tolist(), "probs": pred.probs.tolist()}, f)
    trainer.accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
