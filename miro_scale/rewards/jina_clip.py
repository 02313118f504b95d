"""clip_score: jina-clip-v2 (EVA02-L/14 @ 512 with RoPE + Jina XLM-RoBERTa with LoRA), as a manifest.

The model needs its own remote code (trust_remote_code), which breaks on transformers 5.x, and its
weights are CC-BY-NC-4.0, so this file provides:
  * `manifest()`: every parameter name and shape of the released checkpoint, derived from the
    published configuration and the published modeling code's module names (see below), so that a
    downloaded checkpoint can be checked without loading it (`check_checkpoint`);
  * `JinaClipReward`: the real loading path (local directory or hub id through AutoModel with
    trust_remote_code) for an environment where that code runs, with strict key checks, scoring
    logits_per_image = logit_scale.exp() * cosine (about 100 x cosine), as MIRO did.

Names (read from the published modeling code):
  vision_model.                 EVAVisionTransformer: cls_token (1,1,W), pos_embed (1,1+N,W),
                                patch_embed.proj (conv), blocks.{i}.{norm1, norm2,
                                attn.{q_proj,k_proj,v_proj}.weight (no bias; subln), attn.q_bias,
                                attn.v_bias, attn.inner_attn_ln, attn.proj, mlp.{w1,w2,w3} (SwiGLU),
                                mlp.ffn_ln}, norm; head is Identity (embed_dim == width, no proj);
                                the RoPE tables are non-persistent buffers
  text_model.transformer.       XLMRobertaLoRA -> roberta.{embeddings.word_embeddings,
                                embeddings.token_type_embeddings, emb_ln,
                                encoder.layers.{i}.{mixer.Wqkv, mixer.out_proj, norm1, mlp.fc1,
                                mlp.fc2, norm2}} with rotary positions (no position table); every
                                Linear and Embedding carries a LoRA torch-parametrization, so its
                                weight is stored as `<name>.parametrizations.weight.original` plus
                                `<name>.parametrizations.weight.0.lora_A/lora_B`
                                (linear: A (T, r, in), B (T, out, r); embedding: A (T, num, r),
                                B (T, r, dim); T = number of LoRA tasks)
  text_model.proj / pooler      Identity / mean pooling (no parameters)
  logit_scale                   scalar
Hyper-parameters (published config; the text-tower ones are the jina-embeddings-v3 backbone's):
  vision width 1024, 24 layers, head width 64, mlp_ratio 2.6667 (hidden 2730), patch 14, image 512,
  qkv_bias, subln, naive SwiGLU, RoPE; text hidden 1024, 24 layers, intermediate 4096, vocab 250002,
  type vocab 1, LoRA rank 4. The number of LoRA tasks in the released text tower is a parameter
  (`lora_tasks`): check_checkpoint reports a mismatch by name and shape, so a wrong guess is caught
  before any weight is used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from .base import VIEWS, Reward
from .loading import CheckpointError, check_state_dict


@dataclass
class JinaClipV2Config:
    # vision (EVA02-L/14)
    image_size: int = 512
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    head_width: int = 64
    mlp_ratio: float = 2.6667
    embed_dim: int = 1024
    # text (Jina XLM-RoBERTa)
    vocab_size: int = 250002
    type_vocab_size: int = 1
    hidden_size: int = 1024
    text_layers: int = 24
    intermediate_size: int = 4096
    lora_rank: int = 4
    lora_tasks: int = 5


def _lora_linear(prefix: str, out: int, inp: int, T: int, r: int, bias: bool = True) -> Dict[str, Tuple[int, ...]]:
    d = {f"{prefix}.parametrizations.weight.original": (out, inp),
         f"{prefix}.parametrizations.weight.0.lora_A": (T, r, inp),
         f"{prefix}.parametrizations.weight.0.lora_B": (T, out, r)}
    if bias:
        d[f"{prefix}.bias"] = (out,)
    return d


def _lora_embedding(prefix: str, num: int, dim: int, T: int, r: int) -> Dict[str, Tuple[int, ...]]:
    return {f"{prefix}.parametrizations.weight.original": (num, dim),
            f"{prefix}.parametrizations.weight.0.lora_A": (T, num, r),
            f"{prefix}.parametrizations.weight.0.lora_B": (T, r, dim)}


def manifest(cfg: JinaClipV2Config = JinaClipV2Config()) -> Dict[str, Tuple[int, ...]]:
    m: Dict[str, Tuple[int, ...]] = {"logit_scale": ()}
    W = cfg.width
    n = (cfg.image_size // cfg.patch_size) ** 2
    hid = int(W * cfg.mlp_ratio)
    v = "vision_model."
    m.update({v + "cls_token": (1, 1, W), v + "pos_embed": (1, n + 1, W),
              v + "patch_embed.proj.weight": (W, 3, cfg.patch_size, cfg.patch_size),
              v + "patch_embed.proj.bias": (W,), v + "norm.weight": (W,), v + "norm.bias": (W,)})
    for i in range(cfg.layers):
        b = f"{v}blocks.{i}."
        for ln in ("norm1", "norm2", "attn.inner_attn_ln"):
            m[b + ln + ".weight"] = (W,)
            m[b + ln + ".bias"] = (W,)
        for p in ("q_proj", "k_proj", "v_proj"):
            m[b + f"attn.{p}.weight"] = (W, W)
        m[b + "attn.q_bias"] = (W,)
        m[b + "attn.v_bias"] = (W,)
        m[b + "attn.proj.weight"] = (W, W)
        m[b + "attn.proj.bias"] = (W,)
        for p in ("w1", "w2"):
            m[b + f"mlp.{p}.weight"] = (hid, W)
            m[b + f"mlp.{p}.bias"] = (hid,)
        m[b + "mlp.ffn_ln.weight"] = (hid,)
        m[b + "mlp.ffn_ln.bias"] = (hid,)
        m[b + "mlp.w3.weight"] = (W, hid)
        m[b + "mlp.w3.bias"] = (W,)
    t = "text_model.transformer.roberta."
    H, T, r = cfg.hidden_size, cfg.lora_tasks, cfg.lora_rank
    m.update(_lora_embedding(t + "embeddings.word_embeddings", cfg.vocab_size, H, T, r))
    m.update(_lora_embedding(t + "embeddings.token_type_embeddings", cfg.type_vocab_size, H, T, r))
    m[t + "emb_ln.weight"] = (H,)
    m[t + "emb_ln.bias"] = (H,)
    for i in range(cfg.text_layers):
        b = f"{t}encoder.layers.{i}."
        m.update(_lora_linear(b + "mixer.Wqkv", 3 * H, H, T, r))
        m.update(_lora_linear(b + "mixer.out_proj", H, H, T, r))
        m.update(_lora_linear(b + "mlp.fc1", cfg.intermediate_size, H, T, r))
        m.update(_lora_linear(b + "mlp.fc2", H, cfg.intermediate_size, T, r))
        for ln in ("norm1", "norm2"):
            m[b + ln + ".weight"] = (H,)
            m[b + ln + ".bias"] = (H,)
    return m


def check_checkpoint(state_dict, source: str = "<checkpoint>", cfg: JinaClipV2Config = JinaClipV2Config()) -> None:
    check_state_dict(manifest(cfg), state_dict, source=source)


def num_parameters(cfg: JinaClipV2Config = JinaClipV2Config()) -> int:
    import math
    return sum(math.prod(s) for s in manifest(cfg).values())


class JinaClipReward(Reward):
    """logit_scale.exp() * cosine(image, text) of jina-clip-v2 (needs its remote code to run)."""

    key = "clip_score"
    view = VIEWS["clip512"]
    needs_text = True
    batch_size = 32
    max_length = 1024  # MIRO scored long captions with up to 1024 tokens

    def __init__(self, weights: str = "jinaai/jina-clip-v2", device="cpu", dtype=torch.float32):
        try:
            from transformers import AutoModel, AutoTokenizer
            self.model, info = AutoModel.from_pretrained(weights, trust_remote_code=True, output_loading_info=True)
            self.tokenizer = AutoTokenizer.from_pretrained(weights, trust_remote_code=True)
        except Exception as e:
            raise RuntimeError(
                f"clip_score: cannot load jina-clip-v2 from {weights!r} ({type(e).__name__}: {e}). It needs its "
                "remote code (trust_remote_code), which does not run on transformers 5.x; use an environment "
                "where it does, or leave clip_score out (its manifest is miro_scale.rewards.jina_clip.manifest)."
            ) from e
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            raise CheckpointError(f"{weights}: {bad}")
        self.model.eval()
        self.model_id = weights
        self.device, self.dtype = torch.device(device), dtype
        self.to(device)

    @torch.no_grad()
    def encode_images(self, images):
        f = self.model.get_image_features(self._to_device(images).to(self.dtype))
        return f / f.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def score_features(self, features, captions):
        tok = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        t = self.model.get_text_features(tok["input_ids"].to(self.device))
        t = t / t.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp().float() * (features.float() * t.float()).sum(-1)


def build(variant: str, **kw):
    if variant != "pretrained":
        raise NotImplementedError(
            "clip_score (jina-clip-v2) has no random/tiny variant: its architecture lives in remote code that "
            "does not run here; see miro_scale.rewards.jina_clip.manifest() for its parameter names and shapes")
    return JinaClipReward(**kw)
