"""clip_score: jina-clip-v2 (EVA02-L/14 @ 512 with 2D RoPE + Jina XLM-RoBERTa with LoRA), native code.

Written from the published modeling code, without its remote code (which needs trust_remote_code and
breaks on transformers 5.x). The weights are CC-BY-NC-4.0 and are never bundled; `JinaClipReward` loads
them strictly from the released `model.safetensors` (a local file or directory, or a hub id).

Score (as MIRO used it): logits_per_image = logit_scale.exp() * cosine(image, text), about 100 x cosine,
on the long caption, truncated at 1024 tokens.

Released names (`manifest()` lists every one with its shape):
  vision_model.                 cls_token (1,1,W), pos_embed (1,1+N,W), patch_embed.proj (conv, bias),
                                blocks.{i}.{norm1, norm2, attn.{q_proj,k_proj,v_proj}.weight (no bias),
                                attn.q_bias, attn.v_bias, attn.inner_attn_ln, attn.proj, mlp.{w1,w2,w3},
                                mlp.ffn_ln}, norm; head is Identity; RoPE tables are not stored
  text_model.transformer.roberta.
                                embeddings.{word_embeddings, token_type_embeddings}, emb_ln,
                                encoder.layers.{i}.{mixer.Wqkv, mixer.out_proj, norm1, mlp.fc1, mlp.fc2,
                                norm2}; every Linear/Embedding weight is a LoRA torch-parametrization:
                                `<name>.parametrizations.weight.original` plus `...weight.0.lora_A/lora_B`
                                (linear: A (T, r, in), B (T, out, r); embedding: A (T, num, r), B (T, r, dim))
  logit_scale                   scalar (text_model.proj is Identity, pooling has no parameters)

Facts this module relies on, and where they were read (stored copies found through the code index;
jina's HF repos themselves are not mirrored there):
  * jinaai/xlm-roberta-flash-implementation modeling_xlm_roberta.py ("adopted from flash_attn/models/
    bert.py"): create_block(prenorm=False), i.e. POST-norm blocks x = norm1(x + mixer(x)),
    x = norm2(x + mlp(x)); emb_ln right after word + token-type embeddings (no position table when
    position_embedding_type is "rotary"); MLP fc1 -> GELU (exact for hidden_act "gelu") -> fc2;
    create_mixer_cls: rotary_emb_dim = hidden / heads (the whole head), rotary_emb_interleaved False;
    padded keys masked; mean pooling over the attention mask (clamp 1e-9).
  * its configuration_xlm_roberta.py: layer_norm_eps 1e-5, type_vocab_size 1, pad id 1, lora_rank 4,
    rotary_emb_base default 10000; jina-embeddings-v3 uses 20000.0 (a third-party port's
    JinaEmbeddingsV3Config, which mirrors that model's config.json: rotary_emb_base 20000.0, lora_rank 4,
    lora_alpha 1); config.json in the weights directory overrides `rotary_base` when it carries it.
  * flash-attention's rotary (flash_attn/layers/rotary.py, the non-interleaved torch path):
    inv_freq = base ** (-arange(0, d, 2) / d), angle = position * inv_freq (positions from 0 per
    sequence), (a, b) halves -> (a cos - b sin, b cos + a sin); softmax scale 1/sqrt(head_dim).
  * modeling_lora.py (LoRAParametrization, read in an annotated third-party copy): scaling = alpha / rank;
    task t gives a Linear weight W + scaling * (B[t] @ A[t]) with A (T, r, in), B (T, out, r), and an
    Embedding weight W + scaling * (A[t] @ B[t]) with A (T, num, r), B (T, r, dim); dropout off at
    inference; the task is chosen per sample by adapter_mask. The sources disagree on alpha: that copy's
    annotations, taken from a jina-clip-v2 run, give alpha 4 (scaling 1; used here), the port above
    gives jina-embeddings-v3's alpha 1 (scaling 0.25). config.json overrides `lora_alpha`; check it
    against the released config before trusting scores (docs/fidelity.md).
  * jina-clip-v2 config.json (excerpt in the index): add_projections false, projection_dim 1024,
    text_config.default_lora_task "retrieval.query", default_instruction_task null (no prompt prefix),
    logit_scale_init_value 2.6592. Task index = position of "retrieval.query" in lora_adaptations:
    0 in jina-embeddings-v3's list (retrieval.query, retrieval.passage, separation, classification,
    text-matching) and in a one-entry list; T is read from the checkpoint (lora_A's first dimension).
  * Vision: EVA-CLIP's eva_vit_model.py / rope.py (baaivision), from which jina's eva_model.py and
    rope_embeddings.py derive (jina's own files were not in the index; the released names above match
    EVA-CLIP's modules): pre-norm blocks without layer scale; subln attention q = x Wq + q_bias,
    k = x Wk, v = x Wv + v_bias; RoPE on the patch tokens of q and k only ("slightly fast impl": the
    class token is left alone); scale head_dim**-0.5; inner_attn_ln over all heads, then proj; SwiGLU
    w3(ffn_ln(silu(w1 x) * w2 x)); LayerNorm eps 1e-6; final norm, class token, head Identity.
    VisionRotaryEmbeddingFast (freqs_for "lang", theta 10000): dim = head_dim / 2,
    f_k = theta ** (-2k / dim) for k < dim / 2, positions t = arange(ft) / ft * pt (pt_hw_seq_len 16,
    ft = image_size // patch_size, intp_freq), each frequency repeated for an interleaved pair, the first
    head_dim / 2 channels follow the row and the rest the column; rotate_half (x0, x1) -> (-x1, x0).
  * MIRO: the miro-t2i 0.1.4 wheel ships no scoring code (its README names jinaai/jina-clip-v2 and
    transformers<4.43); the score and the 1024-token long caption are as ../shared/reference/rewards.md
    records them. Preprocessing: 512 px bicubic resize + center crop, OpenAI mean/std (VIEWS["clip512"]).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import VIEWS, Reward, View
from .loading import CheckpointFile, check_state_dict, file_digest, materialize

LORA_TASKS_V3 = ("retrieval.query", "retrieval.passage", "separation", "classification", "text-matching")
WEIGHTS_FILE = "model.safetensors"
KEEP_FP32 = ("logit_scale",)  # exp() of a bf16 scale would move scores by ~0.1


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
    vision_eps: float = 1e-6
    rope_pt_seq_len: int = 16   # pt_hw_seq_len
    rope_intp_freq: bool = True
    rope_theta: float = 10000.0
    # text (Jina XLM-RoBERTa)
    vocab_size: int = 250002
    type_vocab_size: int = 1
    hidden_size: int = 1024
    text_layers: int = 24
    text_heads: int = 16
    intermediate_size: int = 4096
    text_eps: float = 1e-5
    rotary_base: float = 20000.0
    pad_token_id: int = 1
    # LoRA
    lora_rank: int = 4
    lora_tasks: int = 5
    lora_alpha: float = 4.0
    lora_adaptations: Tuple[str, ...] = LORA_TASKS_V3
    lora_task: str = "retrieval.query"
    logit_scale_init: float = 2.6592

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def task_index(self) -> int:
        names = self.lora_adaptations[: self.lora_tasks]
        if self.lora_task not in names:
            raise ValueError(f"LoRA task {self.lora_task!r} not among the checkpoint's tasks {list(names)}")
        return names.index(self.lora_task)


def tiny_config(**kw) -> JinaClipV2Config:
    """Same architecture at test scale (ids of the tiny tokenizer fit vocab_size)."""
    base = dict(image_size=224, patch_size=32, width=64, layers=2, head_width=16, embed_dim=64,
                vocab_size=128, hidden_size=64, text_layers=2, text_heads=4, intermediate_size=128)
    base.update(kw)
    return JinaClipV2Config(**base)


# ---------------------------------------------------------------------------------------------- manifest

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
    """Every parameter name and shape of the released checkpoint (unmerged LoRA, all tasks)."""
    m: Dict[str, Tuple[int, ...]] = {"logit_scale": ()}
    W = cfg.width
    hid = int(W * cfg.mlp_ratio)
    v = "vision_model."
    m.update({v + "cls_token": (1, 1, W), v + "pos_embed": (1, cfg.grid ** 2 + 1, W),
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
    t = TEXT_PREFIX
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
    return sum(math.prod(s) for s in manifest(cfg).values())


# ---------------------------------------------------------------------------------------------- vision

def eva_rope_tables(cfg: JinaClipV2Config, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of shape (grid*grid, head_width), fp32, for the patch tokens in row-major order."""
    dim = cfg.head_width // 2
    freqs = cfg.rope_theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32)[: dim // 2] / dim)
    ft = cfg.grid
    pt = cfg.rope_pt_seq_len
    t = torch.arange(ft, device=device, dtype=torch.float32) / ft * pt if cfg.rope_intp_freq else \
        torch.arange(ft, device=device, dtype=torch.float32)
    ang = (t[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)          # (ft, dim), pairs share f
    rows = ang[:, None, :].expand(ft, ft, dim)
    cols = ang[None, :, :].expand(ft, ft, dim)
    ang2d = torch.cat([rows, cols], dim=-1).reshape(ft * ft, 2 * dim)
    return ang2d.cos(), ang2d.sin()


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Interleaved rotate_half: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    x = x.unflatten(-1, (-1, 2))
    return torch.stack((-x[..., 1], x[..., 0]), dim=-1).flatten(-2)


class EvaAttention(nn.Module):
    def __init__(self, cfg: JinaClipV2Config):
        super().__init__()
        W = cfg.width
        self.heads = W // cfg.head_width
        self.q_proj = nn.Linear(W, W, bias=False)
        self.k_proj = nn.Linear(W, W, bias=False)
        self.v_proj = nn.Linear(W, W, bias=False)
        self.q_bias = nn.Parameter(torch.empty(W))
        self.v_bias = nn.Parameter(torch.empty(W))
        self.inner_attn_ln = nn.LayerNorm(W, eps=cfg.vision_eps)
        self.proj = nn.Linear(W, W)

    def forward(self, x, cos, sin):
        B, N, _ = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_bias).view(B, N, self.heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.heads, -1).transpose(1, 2)
        v = F.linear(x, self.v_proj.weight, self.v_bias).view(B, N, self.heads, -1).transpose(1, 2)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)

        def rope(t):  # the class token (index 0) is not rotated
            p = t[:, :, 1:]
            return torch.cat([t[:, :, :1], p * cos + _rotate_pairs(p) * sin], dim=2)

        o = F.scaled_dot_product_attention(rope(q), rope(k), v)
        return self.proj(self.inner_attn_ln(o.transpose(1, 2).reshape(B, N, -1)))


class EvaSwiGLU(nn.Module):
    def __init__(self, cfg: JinaClipV2Config):
        super().__init__()
        W, hid = cfg.width, int(cfg.width * cfg.mlp_ratio)
        self.w1 = nn.Linear(W, hid)
        self.w2 = nn.Linear(W, hid)
        self.ffn_ln = nn.LayerNorm(hid, eps=cfg.vision_eps)
        self.w3 = nn.Linear(hid, W)

    def forward(self, x):
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EvaBlock(nn.Module):
    def __init__(self, cfg: JinaClipV2Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.vision_eps)
        self.attn = EvaAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.vision_eps)
        self.mlp = EvaSwiGLU(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: JinaClipV2Config):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)


class EvaVisionTower(nn.Module):
    """EVA02 ViT with 2D RoPE; returns the final-normed class token (embed_dim == width, no head)."""

    def __init__(self, cfg: JinaClipV2Config):
        super().__init__()
        self.cfg = cfg
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.grid ** 2 + 1, cfg.width))
        self.patch_embed = _PatchEmbed(cfg)
        self.blocks = nn.ModuleList([EvaBlock(cfg) for _ in range(cfg.layers)])
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.vision_eps)
        self.register_buffer("rope_cos", torch.empty(cfg.grid ** 2, cfg.head_width), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.grid ** 2, cfg.head_width), persistent=False)
        self.reset_buffers()

    def reset_buffers(self):
        if self.rope_cos.is_meta:
            return
        cos, sin = eva_rope_tables(self.cfg, self.rope_cos.device)
        self.rope_cos, self.rope_sin = cos, sin

    def forward(self, pixels):
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x, self.rope_cos, self.rope_sin)
        return self.norm(x)[:, 0]


# ---------------------------------------------------------------------------------------------- text

TEXT_PREFIX = "text_model.transformer.roberta."


def _rotate_halves(x: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotate_half: (a, b) -> (-b, a) over the two halves of the last dimension."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class _Mixer(nn.Module):
    def __init__(self, cfg: JinaClipV2Config):
        super().__init__()
        H = cfg.hidden_size
        self.heads = cfg.text_heads
        self.Wqkv = nn.Linear(H, 3 * H)
        self.out_proj = nn.Linear(H, H)

    def forward(self, x, cos, sin, mask):
        B, L, _ = x.shape
        q, k, v = self.Wqkv(x).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        cos, sin = cos[:L].to(x.dtype), sin[:L].to(x.dtype)
        q = q * cos + _rotate_halves(q) * sin
        k = k * cos + _rotate_halves(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(o.transpose(1, 2).reshape(B, L, -1))


class _Mlp(nn.Module):
    def __init__(self, cfg: JinaClipV2Config):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _TextBlock(nn.Module):
    def __init__(self, cfg: JinaClipV2Config):
        super().__init__()
        self.mixer = _Mixer(cfg)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.text_eps)
        self.mlp = _Mlp(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.text_eps)

    def forward(self, x, cos, sin, mask):  # post-norm, as flash-attention's BERT with prenorm=False
        x = self.norm1(x + self.mixer(x, cos, sin, mask))
        return self.norm2(x + self.mlp(x))


class _Embeddings(nn.Module):
    def __init__(self, cfg: JinaClipV2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)


class _Encoder(nn.Module):
    def __init__(self, cfg: JinaClipV2Config):
        super().__init__()
        self.layers = nn.ModuleList([_TextBlock(cfg) for _ in range(cfg.text_layers)])


class JinaXLMRoberta(nn.Module):
    """Jina XLM-RoBERTa with one LoRA task merged in; returns the masked mean of the last hidden states."""

    def __init__(self, cfg: JinaClipV2Config, max_positions: int = 1024):
        super().__init__()
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg)
        self.emb_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.text_eps)
        self.encoder = _Encoder(cfg)
        hd = cfg.hidden_size // cfg.text_heads
        self.register_buffer("rotary_cos", torch.empty(max_positions, hd), persistent=False)
        self.register_buffer("rotary_sin", torch.empty(max_positions, hd), persistent=False)
        self.reset_buffers()

    def reset_buffers(self, max_positions: Optional[int] = None):
        if self.rotary_cos.is_meta:
            return
        n = max_positions or self.rotary_cos.shape[0]
        hd = self.rotary_cos.shape[1]
        dev = self.rotary_cos.device
        inv = 1.0 / self.cfg.rotary_base ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd)
        ang = torch.outer(torch.arange(n, device=dev, dtype=torch.float32), inv).repeat(1, 2)
        self.rotary_cos, self.rotary_sin = ang.cos(), ang.sin()

    def forward(self, input_ids, attention_mask):
        if input_ids.shape[1] > self.rotary_cos.shape[0]:
            self.reset_buffers(input_ids.shape[1])
        x = self.embeddings.word_embeddings(input_ids) + self.embeddings.token_type_embeddings.weight[0]
        x = self.emb_ln(x)
        keep = attention_mask.bool()
        mask = keep[:, None, None, :]
        for layer in self.encoder.layers:
            x = layer(x, self.rotary_cos, self.rotary_sin, mask)
        m = keep.unsqueeze(-1).float()
        return (x.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)


class _Holder(nn.Module):
    """A named level of the released layout (text_model.transformer.roberta)."""

    def __init__(self, **children):
        super().__init__()
        for k, v in children.items():
            setattr(self, k, v)


class JinaClipV2(nn.Module):
    """Both towers and the logit scale, with state-dict names of the released checkpoint after merging
    the LoRA adapter (`<name>.weight` in place of `<name>.parametrizations.weight.*`)."""

    def __init__(self, cfg: JinaClipV2Config, max_positions: int = 1024):
        super().__init__()
        self.cfg = cfg
        self.vision_model = EvaVisionTower(cfg)
        self.text_model = _Holder(transformer=_Holder(roberta=JinaXLMRoberta(cfg, max_positions)))
        self.logit_scale = nn.Parameter(torch.empty(()))

    @property
    def text(self) -> JinaXLMRoberta:
        return self.text_model.transformer.roberta

    def reset_buffers(self):
        self.vision_model.reset_buffers()
        self.text.reset_buffers()

    def encode_image(self, pixels):
        return F.normalize(self.vision_model(pixels).float(), dim=-1)

    def encode_text(self, input_ids, attention_mask):
        return F.normalize(self.text(input_ids, attention_mask), dim=-1)


# ---------------------------------------------------------------------------------------------- loading

def _released_key(name: str) -> str:
    """Checkpoint key of a merged model parameter: LoRA-carrying weights live under parametrizations."""
    if name.startswith(TEXT_PREFIX) and name.endswith(".weight") and \
            ("embeddings." in name or ".mixer." in name or ".mlp." in name):
        return name[: -len(".weight")] + ".parametrizations.weight.original"
    return name


def merge_lora(original: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, task: int, scaling: float,
               embedding: bool) -> torch.Tensor:
    """W + scaling * (B[t] @ A[t]) for a Linear, W + scaling * (A[t] @ B[t]) for an Embedding, in fp32,
    in one addmm: the only new tensor is the result (the 250k x 1024 word embedding is 1 GB)."""
    a, b = lora_A[task].float(), lora_B[task].float()
    return torch.addmm(original.float(), a, b, alpha=scaling) if embedding else \
        torch.addmm(original.float(), b, a, alpha=scaling)


def released_config(path: Path, cfg: JinaClipV2Config) -> JinaClipV2Config:
    """Overrides from the released config.json (jina's JinaCLIPConfig layout), where it has them."""
    if not path.is_file():
        return cfg
    c = json.loads(path.read_text())
    t = c.get("text_config", {}) or {}
    kw = t.get("hf_model_config_kwargs", {}) or {}
    v = c.get("vision_config", {}) or {}
    upd = {}
    for ours, theirs, src in (("lora_alpha", "lora_alpha", kw), ("lora_rank", "lora_rank", kw),
                              ("rotary_base", "rotary_emb_base", kw), ("text_eps", "layer_norm_eps", kw),
                              ("image_size", "image_size", v), ("patch_size", "patch_size", v),
                              ("width", "width", v), ("layers", "layers", v), ("head_width", "head_width", v),
                              ("mlp_ratio", "mlp_ratio", v), ("rope_pt_seq_len", "pt_hw_seq_len", v),
                              ("rope_intp_freq", "intp_freq", v)):
        if src.get(theirs) is not None:
            upd[ours] = src[theirs]
    if kw.get("lora_adaptations"):
        upd["lora_adaptations"] = tuple(kw["lora_adaptations"])
    if t.get("default_lora_task"):
        upd["lora_task"] = t["default_lora_task"]
    return replace(cfg, **upd)


def resolve_weights(weights: str) -> Path:
    """A directory holding model.safetensors (+ config.json, tokenizer.json), a .safetensors file, or a
    hub id (downloaded with huggingface_hub.snapshot_download, weights and configs only)."""
    p = Path(weights).expanduser()
    if p.exists():
        return p
    if weights.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"clip_score: {weights} does not exist")
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(weights, allow_patterns=[WEIGHTS_FILE, "*.json"]))


def load_released(weights: str, cfg: JinaClipV2Config = JinaClipV2Config(), device="cpu",
                  dtype=torch.float32) -> Tuple[JinaClipV2, Path, JinaClipV2Config]:
    """Build on the meta device and fill straight from the safetensors file, tensor by tensor, merging
    the configured LoRA task; host memory holds at most one (fp32) tensor and its merge at a time."""
    root = resolve_weights(weights)
    file = root / WEIGHTS_FILE if root.is_dir() else root
    if not file.is_file():
        raise FileNotFoundError(f"clip_score: {file} does not exist (expected the released {WEIGHTS_FILE})")
    cfg = released_config(file.parent / "config.json", cfg)
    with CheckpointFile(file) as ck:
        lora_a = TEXT_PREFIX + "embeddings.word_embeddings.parametrizations.weight.0.lora_A"
        if len(ck.shapes.get(lora_a, ())) == 3:
            cfg = replace(cfg, lora_tasks=ck.shapes[lora_a][0])
        check_checkpoint({k: torch.empty(s, device="meta") for k, s in ck.shapes.items()}, source=str(file), cfg=cfg)
        task, scaling = cfg.task_index, cfg.lora_alpha / cfg.lora_rank
        with torch.device("meta"):
            model = JinaClipV2(cfg)
        materialize(model, device, dtype, keep_fp32=KEEP_FP32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                key = _released_key(name)
                if key.endswith(".original"):
                    base = key[: -len("original")]
                    w = merge_lora(ck.tensor(key), ck.tensor(base + "0.lora_A"), ck.tensor(base + "0.lora_B"),
                                   task, scaling, embedding="embeddings." in key)
                else:
                    w = ck.tensor(key)
                p.copy_(w.reshape(p.shape))
                del w
    model.reset_buffers()
    return model.eval(), file, cfg


def materialize_random(model: JinaClipV2, device, dtype, seed: int = 0) -> JinaClipV2:
    """Random weights (seeded, independent of the global RNG) for a meta-built model: tensor by tensor."""
    g = torch.Generator().manual_seed(seed)
    materialize(model, device, dtype, keep_fp32=KEEP_FP32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name or "_ln." in name
            if name == "logit_scale":
                w = torch.tensor(model.cfg.logit_scale_init)
            elif is_norm and name.endswith(".weight"):
                w = torch.ones(p.shape)
            elif name.endswith(".bias"):
                w = torch.zeros(p.shape)
            else:  # weights, class token, position table, q/v biases
                w = torch.randn(p.shape, generator=g) * 0.02
            p.copy_(w)
    model.reset_buffers()
    return model.eval()


# ---------------------------------------------------------------------------------------------- tokenizers

def released_tokenizer(root: Path):
    """The released fast tokenizer (XLM-R SentencePiece/Unigram in tokenizer.json), no remote code."""
    from transformers import PreTrainedTokenizerFast
    path = root / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"clip_score: {path} does not exist (the released tokenizer)")
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   sep_token="</s>", cls_token="<s>", pad_token="<pad>", mask_token="<mask>")


TINY_WORDS = ("a an the of and photo image picture one two three four left right above below on top under "
              "red green blue yellow orange purple pink cyan brown white black gray circle circles square "
              "squares triangle triangles star stars hexagon rectangle ellipse diamond cat dog with next to "
              "in front behind big small x . ,").split()


def tiny_tokenizer():
    """A word-level tokenizer with XLM-R's special ids (<s>=0, <pad>=1, </s>=2, <unk>=3), built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + list(TINY_WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   sep_token="</s>", cls_token="<s>", pad_token="<pad>", mask_token="<mask>")


# ---------------------------------------------------------------------------------------------- reward

class JinaClipReward(Reward):
    """logit_scale.exp() * cosine(image, text) of jina-clip-v2 (logits_per_image, about 100 x cosine)."""

    key = "clip_score"
    view = VIEWS["clip512"]
    needs_text = True
    batch_size = 32
    max_length = 1024  # MIRO scored long captions with up to 1024 tokens

    def __init__(self, weights: Optional[str] = "jinaai/jina-clip-v2", config: Optional[JinaClipV2Config] = None,
                 tokenizer=None, random_init: bool = False, materialize: bool = True, seed: Optional[int] = None,
                 device="cpu", dtype=torch.float32):
        cfg = config or JinaClipV2Config()
        self.device, self.dtype = torch.device(device), dtype
        # drawn now, so build_reward's seeded RNG fixes the weights even when materialised later
        self.seed = int(torch.randint(2 ** 31, ())) if seed is None else seed
        if random_init:
            with torch.device("meta"):
                self.model = JinaClipV2(cfg, self.max_length)
            self.model_id = "random"
            self.tokenizer = tokenizer or tiny_tokenizer()
            if materialize:
                self.materialize()
        else:
            self.model, file, cfg = load_released(weights, cfg, self.device, dtype)
            self.tokenizer = tokenizer or released_tokenizer(file.parent)
            self.model_id, self.checkpoint_digest = str(weights), file_digest(file)
        self.config = cfg
        if cfg.image_size != self.view.size:  # test-scale configs read their own resolution
            self.view = VIEWS.get(f"clip{cfg.image_size}") or View(f"clip{cfg.image_size}", "center_crop",
                                                                 cfg.image_size)

    @property
    def materialized(self) -> bool:
        return not self.model.logit_scale.is_meta

    def materialize(self):
        """Random weights for a meta-built model (the "random" variant defers this to first use)."""
        if not self.materialized:
            materialize_random(self.model, self.device, self.dtype, self.seed)
        return self

    def to(self, device=None, dtype=None):
        if self.materialized:
            return super().to(device, dtype)
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        return self

    @torch.no_grad()
    def encode_images(self, images):
        self.materialize()
        return self.model.encode_image(self._to_device(images).to(self.dtype))

    @torch.no_grad()
    def encode_text(self, captions: List[str]):
        self.materialize()
        tok = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return self.model.encode_text(tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device))

    @torch.no_grad()
    def score_features(self, features, captions):
        t = self.encode_text(captions)
        return self.model.logit_scale.exp().float() * (features.float() * t.float()).sum(-1)


def build(variant: str, **kw):
    if variant == "tiny":
        kw.setdefault("config", tiny_config())
        return JinaClipReward(random_init=True, **kw)
    if variant == "random":  # full size, materialised on first use (or by .materialize())
        return JinaClipReward(random_init=True, materialize=False, **kw)
    return JinaClipReward(**kw)
