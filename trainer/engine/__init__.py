"""The training engine: the Trainer loop, the step, Accelerate wiring, checkpoints, run dirs, evaluation."""
