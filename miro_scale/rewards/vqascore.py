"""VQAScore with CLIP-FlanT5 (zhiqiulin/clip-flant5-xxl), written on current transformers.

Architecture (LLaVA-1.5 style, encoder-decoder): a CLIP ViT-L/14-336 vision tower; the patch tokens
(576, the CLS token dropped) of its second-to-last layer go through a 2-layer GELU MLP projector
(mm_projector.0 / .2, 1024 -> d_model -> d_model) and are spliced into the FlanT5 encoder input at
the <image> position of the prompt
    SYSTEM + " USER: " + <image> + "\\n" + 'Does this figure show "{caption}"? Please answer yes or no.' + " ASSISTANT: "
where each text chunk is tokenised on its own (so each ends with </s>). The decoder is teacher-forced
on the answer "Yes" (tokens "Yes", "</s>"); score = exp(-mean cross-entropy over those tokens), in
(0, 1]. Images are padded to a square with the CLIP mean colour, then resized to 336 (the
"clip336_padmean" view).

State-dict names follow the released checkpoint (a T5ForConditionalGeneration subclass):
shared / encoder.* / decoder.* / lm_head (FlanT5), mm_projector.{0,2}.*, and
vision_tower.vision_tower.vision_model.* (CLIPVisionModel), plus t2v-metrics' top-level alias
`embed_tokens.weight` of `shared.weight` (accepted only when equal to it). LLaVA-style checkpoints
may omit the vision tower: it is then loaded from `vision_weights` (openai/clip-vit-large-patch14-336).
The model is built on the meta device, materialised on the target device in the target dtype and
filled tensor by tensor (loading.load_checkpoint_files): host memory stays near one tensor (one shard
for .bin files) instead of the 44 GB of an fp32 copy. `manifest()` lists every name and shape of
the full-size model, built on the meta device from the published configs, so a downloaded
checkpoint can be checked without loading it (check_checkpoint).
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import VIEWS, Reward, View
from .loading import (CheckpointError, check_state_dict, dir_digest, init_on_meta, load_checkpoint_files,
                      materialize, model_dir, weight_files)

SYSTEM_MSG = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
QUESTION = 'Does this figure show "{}"? Please answer yes or no.'
ANSWER = "Yes"
IMAGE_TOKEN = "<image>"


def release_caption(caption: str) -> str:
    """The caption as the release gave it to VQAScore: code fences (with their language tag) and
    <...> tags removed, whitespace collapsed."""
    caption = re.sub(r"```[\w+-]*", " ", caption)
    caption = re.sub(r"<[^<>]*>", " ", caption)
    return " ".join(caption.split())


def prompt_chunks(caption: str) -> Tuple[str, str]:
    """The text before and after the image in CLIP-FlanT5's 't5_chat' prompt."""
    return SYSTEM_MSG + " USER: ", "\n" + QUESTION.format(caption) + " ASSISTANT: "


def flan_t5_xxl_config():
    from transformers import T5Config
    return T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24,
                    num_heads=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    dropout_rate=0.1, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def clip_l14_336_vision_config():
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, hidden_act="quick_gelu", projection_dim=768)


def _model_class():
    from transformers import CLIPVisionModel, T5ForConditionalGeneration

    class _VisionTower(nn.Module):
        def __init__(self, vcfg):
            super().__init__()
            self.vision_tower = CLIPVisionModel(vcfg)

    class ClipT5ForConditionalGeneration(T5ForConditionalGeneration):
        """FlanT5 + CLIP vision tower + MLP projector, with the released checkpoint's module names."""

        def __init__(self, config, vision_config=None):
            super().__init__(config)
            if vision_config is None:
                from transformers import CLIPVisionConfig
                vc = getattr(config, "vision_config_dict", None)
                vision_config = CLIPVisionConfig(**vc) if vc else clip_l14_336_vision_config()
            config.vision_config_dict = vision_config.to_dict()
            config.mm_hidden_size = vision_config.hidden_size
            self.vision_tower = _VisionTower(vision_config)
            self.mm_projector = nn.Sequential(nn.Linear(vision_config.hidden_size, config.d_model), nn.GELU(),
                                              nn.Linear(config.d_model, config.d_model))
            self.select_layer = int(getattr(config, "mm_vision_select_layer", -2))

        def encode_images(self, pixel_values):
            out = self.vision_tower.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
            feats = out.hidden_states[self.select_layer][:, 1:]  # patch tokens only
            return self.mm_projector(feats)

    return ClipT5ForConditionalGeneration


def build_model(t5_config=None, vision_config=None):
    cls = _model_class()
    m = cls(t5_config or flan_t5_xxl_config(), vision_config or clip_l14_336_vision_config())
    if not getattr(m.config, "scale_decoder_outputs", not m.config.tie_word_embeddings):
        # FlanT5 (T5 v1.1) has its own lm_head; transformers 5 ties it to the input embedding
        # unconditionally, so untie it here (the checkpoint's lm_head.weight is then loaded into it)
        m.lm_head.weight = nn.Parameter(m.shared.weight.detach().clone())
        ties = dict(getattr(m, "_tied_weights_keys", None) or {})
        ties.pop("lm_head.weight", None)
        m._tied_weights_keys = ties
    return m


VT = "vision_tower.vision_tower."


def _flat_clip_vision() -> bool:
    """transformers >= 5 flattened CLIPVisionModel (no `vision_model.` level in its names)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    with torch.device("meta"):
        m = CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                             num_attention_heads=1, image_size=8, patch_size=4))
    return not hasattr(m, "vision_model")


def to_checkpoint_name(k: str, flat: bool) -> str:
    if flat and k.startswith(VT):
        return VT + "vision_model." + k[len(VT):]
    return k


def to_module_name(k: str, flat: bool) -> str:
    if flat and k.startswith(VT + "vision_model."):
        return VT + k[len(VT + "vision_model."):]
    return k


def manifest(t5_config=None, vision_config=None) -> Dict[str, Tuple[int, ...]]:
    """Every parameter/buffer name (as the released checkpoint spells it) and shape of the model
    (full size by default); built on the meta device, no memory used."""
    with torch.device("meta"):
        m = build_model(t5_config, vision_config)
    flat = _flat_clip_vision()
    return {to_checkpoint_name(k, flat): tuple(v.shape) for k, v in m.state_dict().items()}


# Copies of the shared embedding a checkpoint may hold besides `shared.weight`: t2v-metrics'
# CLIPT5ForConditionalGeneration sets `self.embed_tokens = self.encoder.embed_tokens`, so its state dict
# also has a top-level `embed_tokens.weight` (encoder./decoder.embed_tokens are tied in our model too).
ALIASES = {"embed_tokens.weight": "shared.weight"}
# Tied copies and buffers (computed at construction) a checkpoint may leave out.
OPTIONAL = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "*position_ids")


def keep_fp32(dtype) -> Tuple[str, ...]:
    """FlanT5's feed-forward output projections overflow in fp16: transformers keeps them in fp32 there."""
    return ("*.DenseReluDense.wo.weight",) if dtype == torch.float16 else ()


def check_checkpoint(state_dict, source: str = "<checkpoint>", with_vision: bool = True, **cfg) -> None:
    """Check a checkpoint's names and shapes against the manifest (CheckpointError names the keys)."""
    exp = manifest(**cfg)
    exp.update({alias: exp[k] for alias, k in ALIASES.items()})
    optional = list(OPTIONAL) + list(ALIASES) + ([] if with_vision else [VT + "*"])
    check_state_dict(exp, state_dict, source=source, optional=optional)


def load_clip_t5(source: str, vision_weights: Optional[str] = None, vision_config=None, device="cpu",
                 dtype=torch.float32):
    """Build CLIP-FlanT5 from a local directory or hub id on the meta device, materialise it on
    `device` in `dtype` and stream the checkpoint into it tensor by tensor, strictly (names in the
    checkpoint's namespace; the vision tower from `vision_weights` when the checkpoint has none)."""
    import json

    from transformers import T5Config
    d = model_dir(source)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("model_type", None)
    t5 = T5Config(**{k: v for k, v in cfg.items() if not k.startswith(("mm_", "architectures", "auto_map"))})
    t5.mm_vision_select_layer = cfg.get("mm_vision_select_layer", -2)
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise CheckpointError(f"{d}: mm_projector_type {cfg.get('mm_projector_type')!r} is not mlp2x_gelu")
    with init_on_meta():
        model = build_model(t5, vision_config or clip_l14_336_vision_config())
    materialize(model, device, dtype, keep_fp32=keep_fp32(dtype))
    flat = _flat_clip_vision()
    # tied copies of `shared` need no `optional`: loading any one name of a tensor loads all of them
    loaded = load_checkpoint_files(model, weight_files(d), source=str(d), aliases=ALIASES,
                                   rename=lambda k: to_module_name(k, flat), optional=("*position_ids", VT + "*"),
                                   ignore=("*position_ids",))
    tower = {k for k in model.state_dict() if k.startswith(VT) and not k.endswith("position_ids")}
    if not loaded & tower:  # a LLaVA-style checkpoint without the vision tower
        if vision_weights is None:
            raise CheckpointError(f"{d}: has no vision tower weights and no vision_weights were given")
        vd = model_dir(vision_weights)
        # a CLIPModel checkpoint: its vision half, named vision_model.* (flat in transformers >= 5)
        load_checkpoint_files(model.vision_tower.vision_tower, weight_files(vd), source=str(vd),
                              rename=lambda k: k.removeprefix("vision_model.") if flat else k,
                              ignore=("text_model.*", "text_projection.*", "visual_projection.*", "logit_scale",
                                      "*position_ids"), optional=("*position_ids",))
    elif tower - loaded:
        missing = sorted(to_checkpoint_name(k, flat) for k in tower - loaded)
        raise CheckpointError(f"{d}: {len(missing)} missing key(s) of the vision tower: {', '.join(missing[:12])}")
    return model, dir_digest(d)


class WordTokenizer:
    """A whitespace word tokenizer with T5's conventions (pad 0, </s> 1, appended to every call);
    for tests and random-weight benchmarks, where the FlanT5 SentencePiece model is not at hand."""

    def __init__(self, vocab_size: int = 32128):
        self.vocab_size = vocab_size
        self.pad_token_id, self.eos_token_id = 0, 1

    def __call__(self, text: str):
        import zlib
        ids = [2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in text.split()]
        return type("Enc", (), {"input_ids": ids + [self.eos_token_id]})()


class VQAScoreReward(Reward):
    key = "vqa_score"
    view = VIEWS["clip336_padmean"]
    needs_text = True
    batch_size = 16

    def __init__(self, weights: Optional[str] = "zhiqiulin/clip-flant5-xxl",
                 vision_weights: Optional[str] = "openai/clip-vit-large-patch14-336",
                 tokenizer="google/flan-t5-xxl", t5_config=None, vision_config=None, random_init: bool = False,
                 as_released: bool = False, device="cpu", dtype=torch.float32):
        """as_released: images re-encoded as JPEG (quality 75) and captions stripped of code fences and
        <...> tags before scoring, as MIRO's release prepared VQAScore's inputs."""
        self.as_released = as_released
        if as_released:
            self.view = View("clip336_padmean_jpeg75", "pad_mean", 336, jpeg_quality=75)
        if random_init:
            self.model = materialize(build_model(t5_config, vision_config), device, dtype, keep_fp32=keep_fp32(dtype))
            self.model_id = "random"
        else:
            self.model, self.checkpoint_digest = load_clip_t5(weights, vision_weights, vision_config, device, dtype)
            self.model_id = weights
        self.model.eval()
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def encode_images(self, images):
        return self.model.encode_images(self._to_device(images).to(self.dtype))

    def _ids(self, text: str) -> List[int]:
        return list(self.tokenizer(text).input_ids)

    @torch.no_grad()
    def score_features(self, features, captions):
        m = self.model
        emb = m.get_input_embeddings()
        seqs = []
        for i, cap in enumerate(captions):
            pre, post = prompt_chunks(release_caption(cap) if self.as_released else cap)
            a = torch.tensor(self._ids(pre), device=self.device)
            b = torch.tensor(self._ids(post), device=self.device)
            img = features[i].to(emb.weight.dtype)
            seqs.append(torch.cat([emb(a), img, emb(b)], 0))
        L = max(s.shape[0] for s in seqs)
        d = seqs[0].shape[1]
        x = seqs[0].new_zeros(len(seqs), L, d)
        mask = torch.zeros(len(seqs), L, dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            x[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = 1
        ans = torch.tensor(self._ids(ANSWER), device=self.device)
        labels = ans.unsqueeze(0).expand(len(seqs), -1).contiguous()
        out = m(inputs_embeds=x, attention_mask=mask, labels=labels, return_dict=True)
        logp = F.log_softmax(out.logits.float(), -1)
        nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).mean(-1)
        return torch.exp(-nll)


def tiny_configs():
    from transformers import CLIPVisionConfig, T5Config
    t5 = T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                  pad_token_id=0, eos_token_id=1)
    vis = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=336, patch_size=48, hidden_act="quick_gelu")
    return t5, vis


def build(variant: str, **kw):
    if variant == "tiny":
        t5, vis = tiny_configs()
        kw.setdefault("tokenizer", WordTokenizer())
        return VQAScoreReward(t5_config=t5, vision_config=vis, random_init=True, **kw)
    if variant == "random":
        kw.setdefault("tokenizer", WordTokenizer())
        return VQAScoreReward(random_init=True, **kw)
    return VQAScoreReward(**kw)
