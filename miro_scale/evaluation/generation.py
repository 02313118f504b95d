"""Generate images for a prompt set and score them: the one loop every evaluation shares.

generate_and_score(pipeline, prompts, evaluator, images_per_prompt=N, reward_targets=...) returns
a ScoredSamples: images [P, N, 3, H, W] in [0, 1] and each reward's scores [P, N]. The noise of
batch b is drawn from a generator seeded with seed + b, so two models with the same latent shape
(or one model at two reward settings) see the same starting noise for the same prompt and image:
differences between them are the models' or the dials', not the draws'.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from tqdm import tqdm

from miro_scale.evaluation.prompts import Prompt
from miro_scale.evaluation.rewards import RewardEvaluator, category_of


@dataclass
class ScoredSamples:
    prompts: List[str]
    categories: List[Optional[str]]
    images: torch.Tensor  # [P, N, 3, H, W] in [0, 1]
    scores: Dict[str, torch.Tensor] = field(default_factory=dict)  # key -> [P, N]

    @property
    def images_per_prompt(self) -> int:
        return self.images.shape[1]

    def mean(self, key: str, n: Optional[int] = None) -> float:
        """Mean score over prompts and the first n images of each (all by default); NaN left out."""
        return float(self.scores[key][:, :n].nanmean())

    def means(self) -> Dict[str, float]:
        return {key: self.mean(key) for key in self.scores}


@torch.no_grad()
def generate_and_score(pipeline, prompts: Sequence[Prompt], evaluator: Optional[RewardEvaluator] = None, *,
                       images_per_prompt: int = 1, reward_targets: Optional[Mapping[str, float]] = None,
                       negative_reward_targets: Optional[Mapping[str, float]] = None, batch_size: int = 32,
                       seed: int = 0, progress: bool = True, desc: str = "generate", **sample_kwargs) -> ScoredSamples:
    """Images for every prompt (``images_per_prompt`` each) from a MiroPipeline, scored by ``evaluator``
    against their prompts. ``batch_size`` counts images; ``sample_kwargs`` go to the pipeline
    (guidance_scale, num_inference_steps, solver)."""
    texts = [p.text for p in prompts]
    per_batch = max(1, batch_size // images_per_prompt)
    images, scores = [], {}
    starts = range(0, len(texts), per_batch)
    for b, start in enumerate(tqdm(starts, desc=desc, unit="batch", disable=not progress)):
        batch = texts[start:start + per_batch]
        generator = torch.Generator(pipeline.device).manual_seed(seed + b)
        out = pipeline(batch, num_images_per_prompt=images_per_prompt, reward_targets=reward_targets,
                       negative_reward_targets=negative_reward_targets, generator=generator, output_type="pt",
                       **sample_kwargs).float().cpu()
        if evaluator is not None:
            captions = [t for t in batch for _ in range(images_per_prompt)]
            for key, values in evaluator.score_images(out * 2 - 1, captions).items():
                scores.setdefault(key, []).append(values.view(len(batch), images_per_prompt))
        images.append(out.view(len(batch), images_per_prompt, *out.shape[1:]))
    return ScoredSamples(texts, [category_of(p) for p in prompts], torch.cat(images),
                         {key: torch.cat(values) for key, values in scores.items()})
