"""The tiny CNN: tests, CPU smoke runs and the meta-gradient oracles (float64)."""
from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """conv-BN-ReLU x2 + global pool + fc: BatchNorm included on purpose (the meta step must respect its buffers)."""

    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
