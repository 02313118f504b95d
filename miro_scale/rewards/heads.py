"""The 768-1024-128-64-16-1 regression head used by the LAION aesthetic predictor and ImageReward.

No activations (the reference code has them commented out): Linear, Dropout(0.2), Linear,
Dropout(0.2), Linear, Dropout(0.1), Linear, Linear -- so the Sequential indices of the linears are
0, 2, 4, 6, 7 and the state-dict keys are layers.{0,2,4,6,7}.{weight,bias}.
"""
import torch
from torch import nn


class RewardMLP(nn.Module):
    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )
        for name, p in self.layers.named_parameters():
            if name.endswith("weight"):
                nn.init.normal_(p, 0.0, 1.0 / (input_size + 1))
            else:
                nn.init.zeros_(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
