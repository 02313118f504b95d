"""PickScore and SciScore: transformers CLIPModel (ViT-H/14, GELU), score = logit_scale.exp() * cosine.

Weights: a local directory or hub id (yuvalkirstain/PickScore_v1, Jialuo21/SciScore) loaded with
CLIPModel.from_pretrained and failing on any missing / unexpected / mismatched key. The processor
(CLIPImageProcessor 224 + CLIPTokenizer, 77 tokens) of laion/CLIP-ViT-H-14-laion2B-s32B-b79K is
reproduced by the shared "clip224" view; text is tokenised by the model's own tokenizer when its
files are present, else by open_clip's copy of the same CLIP BPE (identical ids; padding after the
end-of-text token is invisible to the causal text tower, whose pooled output is read at the first
end-of-text token).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .base import VIEWS, Reward
from .loading import CheckpointError, dir_digest

PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def load_clip_model_strict(source: str):
    from transformers import CLIPModel
    model, info = CLIPModel.from_pretrained(source, output_loading_info=True)
    errs = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        v = info.get(kind) or []
        if v:
            errs.append(f"{kind}: {sorted(map(str, v))[:12]}")
    if errs:
        raise CheckpointError(f"{source}: " + "; ".join(errs))
    return model


class _HFClipTokenizer:
    def __init__(self, source: Optional[str], context_length: int = 77):
        self.context_length = context_length
        self.hf = None
        if source is not None:
            try:
                from transformers import AutoTokenizer
                self.hf = AutoTokenizer.from_pretrained(source)
            except Exception as e:
                import warnings
                warnings.warn(f"CLIP tokenizer {source!r} unavailable ({type(e).__name__}); using open_clip's copy "
                              "of the same BPE vocabulary (identical ids)")
                self.hf = None
        if self.hf is None:
            from .openclip_models import open_clip_tokenizer
            self.oc = open_clip_tokenizer(context_length)

    def __call__(self, captions):
        if self.hf is not None:
            t = self.hf(list(captions), padding="max_length", truncation=True, max_length=self.context_length,
                        return_tensors="pt")
            return t["input_ids"], t["attention_mask"]
        ids = self.oc(list(captions))
        return ids, None


class HFClipReward(Reward):
    needs_text = True
    batch_size = 64
    view = VIEWS["clip224"]
    default_weights = ""

    def __init__(self, weights: Optional[str] = None, config=None, tokenizer: Optional[str] = PROCESSOR_ID,
                 device="cpu", dtype=torch.float32):
        from transformers import CLIPModel
        if config is not None:  # random weights from a config (tests, benchmarks)
            self.model = CLIPModel(config)
            self.model_id = "random"
        else:
            weights = weights or self.default_weights
            self.model = load_clip_model_strict(weights)
            self.model_id = weights
            if Path(weights).is_dir():
                self.checkpoint_digest = dir_digest(weights)
            else:
                self.checkpoint_digest = f"hub:{weights}@{getattr(self.model.config, '_commit_hash', None) or 'unknown'}"
        self.model.eval()
        self.tokenizer = _HFClipTokenizer(tokenizer, 77)
        self.device, self.dtype = torch.device(device), dtype
        self.to(device)

    @torch.no_grad()
    def encode_images(self, images):
        m = self.model
        out = m.vision_model(pixel_values=self._to_device(images).to(self.dtype))
        f = m.visual_projection(out.pooler_output)
        return f / f.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def encode_text(self, captions):
        m = self.model
        ids, mask = self.tokenizer(captions)
        out = m.text_model(input_ids=ids.to(self.device), attention_mask=None if mask is None else mask.to(self.device))
        f = m.text_projection(out.pooler_output)
        return f / f.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def score_features(self, features, captions):
        t = self.encode_text(captions)
        return self.model.logit_scale.exp().float() * (features.float() * t.float()).sum(-1)


class PickScoreReward(HFClipReward):
    key = "pick_a_score_score"
    default_weights = "yuvalkirstain/PickScore_v1"


class SciScoreReward(HFClipReward):
    key = "sciscore_score"
    default_weights = "Jialuo21/SciScore"


def tiny_clip_config(**over):
    """A tiny CLIPConfig of the PickScore architecture family (GELU, 224 px, CLIP BPE vocab)."""
    from transformers import CLIPConfig
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=224,
                  patch_size=32, hidden_act="gelu")
    text.update(over.pop("text", {}))
    vision.update(over.pop("vision", {}))
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=over.pop("projection_dim", 24), **over)


def pickscore_full_config():
    """The PickScore_v1 / SciScore architecture (laion CLIP-ViT-H-14) as a CLIPConfig."""
    return tiny_clip_config(
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                    patch_size=14),
        projection_dim=1024)
