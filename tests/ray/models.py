"""The model the Ray tests serve and map: a conv net whose output is a tuple holding a dict, per row."""
from __future__ import annotations

import torch
from torch import nn

from pyrys.testing import randomize_batchnorm


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        features = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.head(features), {"features": features}


def two_heads() -> nn.Module:
    """:class:`TwoHeads` with randomized BatchNorm, in eval mode."""
    return randomize_batchnorm(TwoHeads(), seed=1).eval()


def images(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
