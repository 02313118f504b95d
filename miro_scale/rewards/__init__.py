"""Reward models, distributed scoring and binning for MIRO.

Rewards (one file per model family; keys from keys.py):
  miro_scale/synthetic/rewards.py  caption_alignment_score, sharpness_score, contrast_score,
                     colourfulness_score (pixel rewards for the shapes world; no weights)
  openclip_models.py aesthetic_score (LAION predictor on CLIP ViT-L/14 QuickGELU), hpsv2_score (v2.0/v2.1)
  hf_clip.py         pick_a_score_score (PickScore_v1), sciscore_score (SciScore)
  image_reward.py    image_reward_score (BLIP ViT-L/16 + cross-attention BERT + MLP)
  vqascore.py        vqa_score (CLIP-FlanT5-XXL)
  jina_clip.py       clip_score (jina-clip-v2: EVA02-L/14 RoPE + Jina XLM-RoBERTa, LoRA merged at load)
Infrastructure:
  base.py      the Reward protocol and the shared preprocessing Views
  loading.py   checkpoint resolution, digests, strict state-dict checks (errors name file and keys)
  registry.py  build_reward(key_or_alias, variant="pretrained"|"random"|"tiny", **kwargs)
  scoring.py   run_scoring(ScoreConfig): torchrun-distributed, resumable shard scoring
  binning.py   fit_bins / apply_bins / save_bins / load_bins: calibration and binning
  precision.py the per-reward scoring precision (policy file, bin-change measure)
  units.py     raw / release / paper units of the scores, and the release's caption per reward
Command lines: preprocessing/score.py, preprocessing/bin.py, preprocessing/bench_score.py,
preprocessing/bench_precision.py.
"""
from .keys import MIRO_REWARD_KEYS, REWARD_KEYS, SYNTHETIC_REWARD_KEYS  # noqa: F401

_LAZY = {"VIEWS": "base", "Reward": "base", "View": "base", "ALIASES": "registry",
         "available_rewards": "registry", "build_reward": "registry", "canonical_key": "registry"}


def __getattr__(name):  # torch is imported only when a model-side name is used
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
