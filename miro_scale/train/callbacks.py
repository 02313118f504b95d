"""Work the training loop hands its preview samples to without knowing what it is: the loop depends
on `on_samples(step, images, prompts, metrics)` only; the launcher chooses the callbacks."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import torch

from miro_scale.config import MiroConfig


class RewardCurves:
    """Scores each preview grid's rows (s+ = 1 guided, s+ = 0) with the evaluation reward models:
    reward_eval.jsonl and reward_curves.png in the output directory, eval/* scalars in the metrics."""

    def __init__(self, cfg: MiroConfig, device: torch.device):
        from miro_scale.evaluation.rewards import RewardEvaluator

        self.evaluate = RewardEvaluator(cfg.train.eval_rewards, cfg.train.eval_reward_variant, device)
        self.out_dir = Path(cfg.train.output_dir)

    def on_samples(self, step: int, images: torch.Tensor, prompts: Dict, metrics) -> None:
        from miro_scale.evaluation.rewards import plot_reward_curves

        count = prompts["text_mask"].shape[0]
        if len(images) != 2 * count:  # no unguided row to compare with
            return
        captions = prompts.get("captions")
        record = {"step": step, "high": self.evaluate(images[:count], captions),
                  "low": self.evaluate(images[count:], captions)}
        metrics.log(step, {f"{key}/{row}": record[row][key] for row in ("high", "low") for key in record[row]},
                    section="eval")
        log_path = self.out_dir / "reward_eval.jsonl"
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        plot_reward_curves(log_path, self.out_dir / "reward_curves.png")


def callbacks_from_config(cfg: MiroConfig, rank: int, device: torch.device) -> List:
    """Rank 0 scores the grids it writes."""
    return [RewardCurves(cfg, device)] if cfg.train.eval_rewards and rank == 0 else []
