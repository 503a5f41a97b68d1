"""Train like ``python -m launch.train`` does, then let every rank dump what must agree across ranks.

    torchrun --nproc_per_node 2 tests/distributed/dist_scripts/train_and_dump.py DUMP_DIR CONFIG [key=value ...] [--resume auto]

DUMP_DIR/rank{R}.pt holds, per rank: the meta-net φ and the classifier's state dict before (as built, or as
resumed) and after training, φ's Adam state and the returned metrics. The invariant tests compare the ranks' files
bit for bit -- something the checkpoint cannot show: only the main process writes the replicated objects there.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dump_dir")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--resume", default=None)
    args = p.parse_args()

    from launch.errors import setup_logging
    from trainer.config import load_config
    from trainer.engine.accel import bare_model
    from trainer.engine.trainer import Trainer

    setup_logging()
    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg, resume=args.resume, quiet=True)
    rw = trainer.reweighter
    phi_start = copy.deepcopy(rw.meta_net.state_dict()) if rw is not None else None
    unwrapped = bare_model(trainer.accelerator, trainer.model)
    model_start = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}  # after a resume: the loaded θ
    metrics = trainer.fit()
    dump = {
        "rank": trainer.accelerator.process_index,
        "world": trainer.accelerator.num_processes,
        "phi_start": phi_start,
        "phi": rw.meta_net.state_dict() if rw is not None else None,
        "phi_adam": rw.optimizer.state_dict() if rw is not None else None,
        "model_start": model_start,
        "model": {k: v.detach().clone() for k, v in unwrapped.state_dict().items()},
        "metrics": metrics,
    }
    out = Path(args.dump_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(dump, out / f"rank{dump['rank']}.pt")
    trainer.accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
