"""What a run shows while it trains: console / tqdm logging and TensorBoard."""
