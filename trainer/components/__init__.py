"""Swappable training components: model factory, imbalance losses, optimisers and schedules."""
