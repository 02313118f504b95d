"""Reward evaluation of generated samples through the reward registry (the paper's Fig. 5 curves).

During training, the preview grid's two rows (every reward at s+ = 1 guided, and at 0) are scored
by the configured reward models; the means are logged per step, so TensorBoard draws how each
reward responds to its control as training goes, and a PNG of the curves is written alongside.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torchvision.transforms.functional import to_pil_image


class RewardEvaluator:
    def __init__(self, keys: Sequence[str], variant: str = "pretrained", device="cpu"):
        from miro_scale.rewards.registry import build_reward

        self.rewards = [build_reward(key, variant, device=device) for key in keys]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, captions: Optional[List[str]]) -> Dict[str, float]:
        """images: [N, 3, H, W] in [-1, 1]; captions: one per image (None: no text)."""
        pil = [to_pil_image(((img.float().cpu() + 1) / 2).clamp(0, 1)) for img in images]
        captions = captions or [""] * len(pil)
        scores = {}
        for reward in self.rewards:
            values = reward.score(reward.view.prepare(pil), captions)
            scores[reward.key] = float(torch.as_tensor(values, dtype=torch.float32).nanmean())  # NaN: not applicable
        return scores


def plot_reward_curves(log_path: Path, out_path: Path) -> Optional[Path]:
    """One panel per reward: mean score of the s+ = 1 and s+ = 0 rows against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not records:
        return None
    keys = sorted(records[0]["high"])
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    steps = [r["step"] for r in records]
    for ax, key in zip(axes[0], keys):
        ax.plot(steps, [r["high"][key] for r in records], marker="o", label="rewards = 1")
        ax.plot(steps, [r["low"][key] for r in records], marker="o", label="rewards = 0")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
