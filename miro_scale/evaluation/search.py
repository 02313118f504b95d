"""Best-of-N (random search): N candidates per prompt, scored by reward models, the best one kept.

best_of_n_search(pipe, prompts, evaluator, n, select) generates the candidates in batched pipeline
calls of ``batch_size`` images, scores each batch with every reward of ``evaluator`` (any key of the
reward registry, the synthetic world's pixel rewards included) and keeps, per prompt, the image the
``select`` reward scores highest (the first on ties; a NaN score never wins). Only the kept images
are held, so N can be large (128) at any resolution.

Candidate k of prompt i starts from row i of the noise ``pipe(prompts, generator=manual_seed(seed + k))``
draws, so N = 1 is plain sampling with ``seed``, and a larger N only adds candidates. The [P, N]
scores it returns are what metrics.best_of_n bootstraps into test-time-scaling curves (Fig. 8);
search_evaluation does both for a prompt set, in the layout of evaluate_rewards plus a "best_of_n"
section (launchers/evaluate.py --best-of).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from tqdm import tqdm

from miro_scale.evaluation.grids import prompt_noise
from miro_scale.evaluation.metrics import best_of_n
from miro_scale.evaluation.prompts import Prompt
from miro_scale.evaluation.rewards import RewardEvaluator, category_of, summarise


@dataclass
class SearchResult:
    prompts: List[str]
    select: str
    scores: Dict[str, torch.Tensor]  # key -> [P, N], every candidate
    chosen: torch.Tensor  # [P], the kept candidate's index
    images: torch.Tensor  # [P, 3, H, W] in [0, 1], the kept candidates

    def chosen_scores(self) -> Dict[str, List[float]]:
        """Every reward of the kept image, per prompt."""
        return {key: v.gather(1, self.chosen[:, None]).squeeze(1).tolist() for key, v in self.scores.items()}


@torch.no_grad()
def best_of_n_search(pipe, prompts: Sequence[str], evaluator: RewardEvaluator, n: int, select: str, *,
                     seed: int = 0, batch_size: int = 16, reward_targets: Optional[Mapping[str, float]] = None,
                     negative_reward_targets: Optional[Mapping[str, float]] = None, progress: bool = False,
                     **sample_kwargs) -> SearchResult:
    """``sample_kwargs`` go to the pipeline (guidance_scale, num_inference_steps, solver)."""
    keys = [r.key for r in evaluator.rewards]
    if select not in keys:
        raise KeyError(f"best-of-n: the selecting reward {select!r} is not among the scored rewards {keys}")
    if n < 1 or batch_size < 1:
        raise ValueError(f"best-of-n needs n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    p = len(prompts)
    scores = {key: torch.full((p, n), math.nan) for key in keys}
    best = torch.full((p,), -math.inf)
    chosen = torch.full((p,), -1, dtype=torch.long)
    images: Optional[torch.Tensor] = None
    pairs = [(k, i) for k in range(n) for i in range(p)]  # candidate-major: one seed's noise at a time
    noise: Dict[int, torch.Tensor] = {}
    for start in tqdm(range(0, len(pairs), batch_size), desc="best-of-n", unit="batch", disable=not progress):
        chunk = pairs[start:start + batch_size]
        for k in {k for k, _ in chunk} - set(noise):
            noise[k] = prompt_noise(pipe, p, seed + k)
        out = pipe([prompts[i] for _, i in chunk], reward_targets=reward_targets,
                   negative_reward_targets=negative_reward_targets,
                   latents=torch.stack([noise[k][i] for k, i in chunk]), output_type="pt",
                   **sample_kwargs).float().cpu()
        batch_scores = evaluator.score_images(out * 2 - 1, [prompts[i] for _, i in chunk])  # evaluator takes [-1, 1]
        if images is None:
            images = torch.empty(p, *out.shape[1:])
        for row, (k, i) in enumerate(chunk):
            for key, values in batch_scores.items():
                scores[key][i, k] = values[row]
            value = float(torch.nan_to_num(batch_scores[select][row], nan=-math.inf))
            if chosen[i] < 0 or value > best[i]:
                best[i], chosen[i], images[i] = value, k, out[row]
        for k in [k for k in noise if k < chunk[-1][0]]:
            del noise[k]
    return SearchResult(list(prompts), select, scores, chosen, images)


def search_evaluation(pipe, prompts: Sequence[Prompt], evaluator: RewardEvaluator, ns: Sequence[int], select: str,
                      *, repeats: int = 16, seed: int = 0, scale: str = "raw", out_dir: Optional[Path] = None,
                      **search_kwargs) -> Dict:
    """Best-of-max(ns) search over a prompt set, reported as evaluate_rewards reports (rows and summary:
    candidate 0, i.e. plain sampling with ``seed``) plus "best_of_n": every candidate's scores, the
    kept index per prompt, and metrics.best_of_n's curves {key: [mean of the kept image at each n]}
    (``repeats`` random subsets per n < max). Scores in ``scale`` (miro_scale/rewards/units.py: affine
    and increasing, so the choice is the same in any scale). The kept images go to ``out_dir``."""
    from torchvision.utils import save_image

    from miro_scale.rewards.units import from_raw

    if not ns or min(ns) < 1:
        raise ValueError(f"best-of-n: expected sizes >= 1, got {list(ns)}")
    n = max(ns)
    result = best_of_n_search(pipe, [p.text for p in prompts], evaluator, n, select, seed=seed, **search_kwargs)
    scores = {k: torch.as_tensor(from_raw(k, v.numpy(), scale), dtype=torch.float32) for k, v in result.scores.items()}
    rows = [{"index": i, "prompt": p.text, "category": category_of(p),
             "scores": {k: float(v[i, 0]) for k, v in scores.items()}} for i, p in enumerate(prompts)]
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(result.images):
            save_image(image, out_dir / f"{i:05d}_best_of_{n}.png")
    return {"summary": summarise(rows), "rows": rows, "scale": scale, "best_of_n": {
        "select": select, "ns": sorted(ns), "n": n, "repeats": repeats, "seed": seed,
        "curves": best_of_n(scores, select, sorted(ns), repeats, seed),
        "chosen": result.chosen.tolist(),
        "chosen_scores": {k: from_raw(k, v, scale).tolist() for k, v in result.chosen_scores().items()},
        "scores": {k: v.tolist() for k, v in scores.items()}}}
