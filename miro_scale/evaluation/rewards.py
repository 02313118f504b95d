"""Reward evaluation of generated images through the reward registry.

- RewardEvaluator scores images (and their captions) with any registered reward models.
- During training, each preview grid's two rows (every reward at s+ = 1 guided, and at 0) are
  scored and logged per step: TensorBoard curves, JSONL, and a PNG (plot_reward_curves) — how
  each reward responds to its control as training goes (the paper's Fig. 5).
- evaluate_rewards generates for a prompt set and summarises the scores (the paper's reward
  tables): mean and std per reward, overall and per prompt category (PartiPrompts' Category,
  GenEval's tag).
- parse_reward_targets / reward_keys / load_reward_config: what the commands' --reward KEY=VALUE,
  --rewards a,b and --reward-config flags mean (keys or the registry's aliases); a ValueError names
  the flag or file.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torchvision.transforms.functional import to_pil_image
from tqdm import tqdm

from miro_scale.evaluation.prompts import Prompt
from miro_scale.rewards.base import prepare_views


def reward_keys(names: str, flag: str = "--rewards") -> List[str]:
    """Comma-separated reward keys or aliases (aesthetic, vqa, ...) -> canonical keys."""
    from miro_scale.rewards.registry import canonical_key

    try:
        keys = [canonical_key(k) for k in names.split(",") if k.strip()]
    except KeyError as e:
        raise ValueError(f"{flag}: {e.args[0]}") from None
    if not keys:
        raise ValueError(f"{flag}: no reward keys in {names!r}")
    return keys


def parse_reward_targets(items: Sequence[str], flag: str = "--reward") -> Dict[str, float]:
    """KEY=VALUE items (keys or aliases) -> {canonical key: value}."""
    targets = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{flag}: expected key=value, got {item!r}")
        try:
            targets[reward_keys(key, flag)[0]] = float(value)
        except ValueError as e:
            raise ValueError(f"{flag} {item!r}: {e}") from None
    return targets


def load_reward_config(path: Optional[str]) -> Dict[str, Dict]:
    """The --reward-config JSON file {reward key or alias: {builder kwargs}}; {} without one."""
    if not path:
        return {}
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--reward-config {path}: {e}") from None
    if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
        raise ValueError(f"--reward-config {path}: expected a JSON object {{reward_key: {{builder kwargs}}}}")
    return {reward_keys(k, f"--reward-config {path}")[0]: v for k, v in doc.items()}


class RewardEvaluator:
    def __init__(self, keys: Sequence[str], variant: str = "pretrained", device="cpu",
                 reward_kwargs: Optional[Mapping[str, Dict]] = None):
        """reward_kwargs: builder arguments per reward key (weights paths...), as the scorer's --reward-config."""
        from miro_scale.rewards.registry import build_reward

        reward_kwargs = reward_kwargs or {}
        self.rewards = [build_reward(key, variant, device=device, **reward_kwargs.get(key, {})) for key in keys]

    @torch.no_grad()
    def score_images(self, images: torch.Tensor, captions: Optional[List[str]]) -> Dict[str, torch.Tensor]:
        """images: [N, 3, H, W] in [-1, 1]; captions: one per image (None: no text). -> {key: [N]}"""
        pil = [to_pil_image(((img.float().cpu() + 1) / 2).clamp(0, 1)) for img in images]
        captions = captions or [""] * len(pil)
        views = prepare_views(pil, [reward.view for reward in self.rewards])  # each view once per image
        return {reward.key: torch.as_tensor(reward.score(views[reward.view.spec], captions), dtype=torch.float32).cpu()
                for reward in self.rewards}

    def __call__(self, images: torch.Tensor, captions: Optional[List[str]]) -> Dict[str, float]:
        """Mean score per reward; NaN (a reward that does not apply to a caption) is left out."""
        return {key: float(values.nanmean()) for key, values in self.score_images(images, captions).items()}


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


def _mean_std(values: List[float]) -> Dict[str, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": float("nan"), "std": float("nan"), "count": 0}
    mean = sum(finite) / len(finite)
    std = (sum((v - mean) ** 2 for v in finite) / len(finite)) ** 0.5
    return {"mean": mean, "std": std, "count": len(finite)}


def category_of(prompt: Prompt) -> Optional[str]:
    return prompt.metadata.get("Category") or prompt.metadata.get("tag")


@torch.no_grad()
def evaluate_rewards(pipeline, prompts: Sequence[Prompt], evaluator: RewardEvaluator, *,
                     reward_targets: Optional[Mapping[str, float]] = None, batch_size: int = 8,
                     seed: int = 0, out_dir: Optional[Path] = None, **sample_kwargs) -> Dict:
    """Scores per image and the summary; images are written to out_dir when given."""
    rows = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="evaluate", unit="batch"):
        batch = list(prompts[start:start + batch_size])
        generator = torch.Generator(pipeline.device).manual_seed(seed + start)
        images = pipeline([p.text for p in batch], reward_targets=reward_targets, generator=generator,
                          output_type="pt", **sample_kwargs) * 2 - 1  # the evaluator takes [-1, 1]
        scores = evaluator.score_images(images, [p.text for p in batch])
        for offset, (prompt, image) in enumerate(zip(batch, images)):
            rows.append({"index": start + offset, "prompt": prompt.text, "category": category_of(prompt),
                         "scores": {key: float(values[offset]) for key, values in scores.items()}})
            if out_dir is not None:
                from torchvision.utils import save_image

                out_dir.mkdir(parents=True, exist_ok=True)
                save_image((image + 1) / 2, out_dir / f"{start + offset:05d}.png")
    return {"summary": summarise(rows), "rows": rows}


def summarise(rows: Sequence[Mapping]) -> Dict:
    """Rows {"category", "scores": {key: value}} -> mean, std and count per reward, overall and per category."""
    keys = list(rows[0]["scores"]) if rows else []
    summary = {"overall": {k: _mean_std([r["scores"][k] for r in rows]) for k in keys}}
    by_category = defaultdict(list)
    for row in rows:
        if row["category"]:
            by_category[row["category"]].append(row)
    if by_category:
        summary["by_category"] = {c: {k: _mean_std([r["scores"][k] for r in rs]) for k in keys}
                                  for c, rs in sorted(by_category.items())}
    return summary


def write_report(result: Dict, path: Path, **info) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**info, **result}, indent=2))
    return path
