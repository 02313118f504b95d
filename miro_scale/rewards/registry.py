"""Reward registry: canonical key (keys.py) -> builder, plus short aliases for command lines.

build_reward(key, variant, **kwargs):
  variant "pretrained"  the released weights (local path or hub id in kwargs, defaults are the hub ids)
  variant "random"      the full-size architecture with random weights (benchmarks)
  variant "tiny"        a tiny config of the same architecture with random weights (tests, CPU smoke runs)
Pixel rewards ignore the variant.
"""
from __future__ import annotations

from typing import Callable, Dict, List

from .keys import REWARD_KEYS

ALIASES = {
    "aesthetic": "aesthetic_score", "hpsv2": "hpsv2_score", "hps": "hpsv2_score",
    "pickscore": "pick_a_score_score", "pick": "pick_a_score_score", "sciscore": "sciscore_score",
    "image_reward": "image_reward_score", "imagereward": "image_reward_score",
    "clip": "clip_score", "jina_clip": "clip_score", "vqa": "vqa_score", "vqascore": "vqa_score",
    "caption_alignment": "caption_alignment_score", "alignment": "caption_alignment_score",
    "sharpness": "sharpness_score", "contrast": "contrast_score",
    "colourfulness": "colourfulness_score", "colorfulness": "colourfulness_score",
}

TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "patch_size": 32, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def canonical_key(name: str) -> str:
    k = name.strip()
    k = ALIASES.get(k, k)
    if k not in REWARD_KEYS:
        raise KeyError(f"unknown reward {name!r}; known keys: {', '.join(REWARD_KEYS)}; aliases: {', '.join(sorted(ALIASES))}")
    return k


def _aesthetic(variant, **kw):
    from .openclip_models import AestheticReward
    if variant == "tiny":
        return AestheticReward(clip_config=dict(TINY_OPEN_CLIP, quick_gelu=True), random_init=True, **kw)
    return AestheticReward(random_init=variant == "random", **kw)


def _hpsv2(variant, **kw):
    from .openclip_models import HPSv2Reward
    if variant == "tiny":
        return HPSv2Reward(clip_config=TINY_OPEN_CLIP, random_init=True, **kw)
    return HPSv2Reward(random_init=variant == "random", **kw)


def _hf_clip(cls_name):
    def build(variant, **kw):
        from . import hf_clip
        cls = getattr(hf_clip, cls_name)
        if variant == "tiny":
            kw.setdefault("tokenizer", None)
            return cls(config=hf_clip.tiny_clip_config(), **kw)
        if variant == "random":
            kw.setdefault("tokenizer", None)
            return cls(config=hf_clip.pickscore_full_config(), **kw)
        return cls(**kw)
    return build


def _image_reward(variant, **kw):
    from . import image_reward as ir
    if variant == "tiny":
        kw.setdefault("tokenizer", ir.tiny_bert_tokenizer())
        return ir.ImageRewardReward(vision_config=ir.BlipVisionConfig(patch_size=32, width=32, layers=2, heads=2),
                                    text_config=ir.BlipTextConfig(hidden_size=32, num_hidden_layers=2,
                                                                  num_attention_heads=2, intermediate_size=64,
                                                                  encoder_width=32, max_position_embeddings=64),
                                    random_init=True, **kw)
    if variant == "random":
        kw.setdefault("tokenizer", ir.tiny_bert_tokenizer())
        return ir.ImageRewardReward(random_init=True, **kw)
    return ir.ImageRewardReward(**kw)


def _module_builder(key, module):
    def build(variant, **kw):
        import importlib
        mod = importlib.import_module(f".{module}", __package__)
        return mod.build(variant, **kw)
    return build


def _pixel(cls_name):
    def build(variant, **kw):
        from miro_scale.synthetic import rewards as synthetic
        return getattr(synthetic, cls_name)(**kw)
    return build


BUILDERS: Dict[str, Callable] = {
    "aesthetic_score": _aesthetic,
    "hpsv2_score": _hpsv2,
    "pick_a_score_score": _hf_clip("PickScoreReward"),
    "sciscore_score": _hf_clip("SciScoreReward"),
    "image_reward_score": _image_reward,
    "clip_score": _module_builder("clip_score", "jina_clip"),
    "vqa_score": _module_builder("vqa_score", "vqascore"),
    "caption_alignment_score": _pixel("CaptionAlignmentReward"),
    "sharpness_score": _pixel("SharpnessReward"),
    "contrast_score": _pixel("ContrastReward"),
    "colourfulness_score": _pixel("ColourfulnessReward"),
}


def available_rewards() -> List[str]:
    return [k for k in REWARD_KEYS if k in BUILDERS]


def build_reward(name: str, variant: str = "pretrained", device="cpu", dtype=None, seed: int = 0,
                 **kwargs):
    import torch
    dtype = torch.float32 if dtype is None else dtype
    if variant not in ("pretrained", "random", "tiny"):
        raise ValueError(f"variant must be pretrained, random or tiny, got {variant!r}")
    key = canonical_key(name)
    if variant == "pretrained":
        r = BUILDERS[key](variant, device=device, dtype=dtype, **kwargs)
    else:  # random weights are seeded: every process and every pass builds the same model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            r = BUILDERS[key](variant, device=device, dtype=dtype, **kwargs)
    if r.key != key:  # pragma: no cover - wiring check
        raise RuntimeError(f"builder for {key} returned a reward keyed {r.key}")
    return r
