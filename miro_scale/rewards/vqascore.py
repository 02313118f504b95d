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
vision_tower.vision_tower.vision_model.* (CLIPVisionModel). LLaVA-style checkpoints may omit the
vision tower: it is then loaded from `vision_weights` (openai/clip-vit-large-patch14-336).
`manifest()` lists every name and shape of the full-size model, built on the meta device from the
published configs, so a downloaded checkpoint can be checked without loading it (check_checkpoint).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import VIEWS, Reward
from .loading import CheckpointError, check_state_dict, dir_digest

SYSTEM_MSG = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
QUESTION = 'Does this figure show "{}"? Please answer yes or no.'
ANSWER = "Yes"
IMAGE_TOKEN = "<image>"


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


# Tied copies of the shared embedding and non-persistent buffers a checkpoint may leave out.
OPTIONAL = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", VT + "vision_model.embeddings.position_ids")


def check_checkpoint(state_dict, source: str = "<checkpoint>", with_vision: bool = True, **cfg) -> None:
    """Check a checkpoint's names and shapes against the manifest (CheckpointError names the keys)."""
    exp = manifest(**cfg)
    optional = list(OPTIONAL) + ([] if with_vision else [VT + "*"])
    check_state_dict(exp, state_dict, source=source, optional=optional)


def _weight_files(d):
    import json
    from pathlib import Path
    d = Path(d)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).exists():
            return sorted({d / f for f in json.loads((d / index).read_text())["weight_map"].values()})
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (d / single).exists():
            return [d / single]
    raise FileNotFoundError(f"{d}: no model.safetensors / pytorch_model.bin (or their .index.json)")


def load_clip_t5(source: str, vision_weights: Optional[str] = None, vision_config=None):
    """Build CLIP-FlanT5 from a local directory or hub id, loading shard by shard with strict checks
    (names in the checkpoint's namespace; the vision tower from `vision_weights` when absent)."""
    import json
    from pathlib import Path

    from transformers import T5Config

    from .loading import load_state_dict_file
    d = Path(source)
    if not d.is_dir():
        from huggingface_hub import snapshot_download
        d = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("model_type", None)
    t5 = T5Config(**{k: v for k, v in cfg.items() if not k.startswith(("mm_", "architectures", "auto_map"))})
    t5.mm_vision_select_layer = cfg.get("mm_vision_select_layer", -2)
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise CheckpointError(f"{d}: mm_projector_type {cfg.get('mm_projector_type')!r} is not mlp2x_gelu")
    with torch.device("meta"):
        model = build_model(t5, vision_config or clip_l14_336_vision_config())
    model = model.to_empty(device="cpu")
    for mod in model.modules():  # to_empty leaves buffers uninitialised: position ids are the only ones
        for name, buf in list(mod.named_buffers(recurse=False)):
            if name != "position_ids":
                raise CheckpointError(f"load_clip_t5: unexpected buffer {name} in {type(mod).__name__}")
            with torch.no_grad():
                buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    flat = _flat_clip_vision()
    expected = {to_checkpoint_name(k, flat): tuple(v.shape) for k, v in model.state_dict().items()}
    seen = {}
    params = model.state_dict()
    for f in _weight_files(d):
        sd = load_state_dict_file(f)
        for k, v in sd.items():
            seen[k] = tuple(v.shape)
            mk = to_module_name(k, flat)
            if mk in params and tuple(params[mk].shape) == tuple(v.shape):
                with torch.no_grad():
                    params[mk].copy_(v)
        del sd
    has_vision = any(k.startswith(VT) for k in seen)
    optional = list(OPTIONAL) + ([] if has_vision else [VT + "*"])
    check_state_dict(expected, {k: torch.empty(s, device="meta") for k, s in seen.items()}, source=str(d),
                     optional=optional)
    # tied copies of the shared embedding
    with torch.no_grad():
        for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if k not in seen:
                params[k].copy_(params["shared.weight"])
        if (VT + "vision_model.embeddings.position_ids") not in seen:
            pid = to_module_name(VT + "vision_model.embeddings.position_ids", flat)
            if pid in params:
                params[pid].copy_(torch.arange(params[pid].shape[-1]).expand_as(params[pid]))
    if not has_vision:
        if vision_weights is None:
            raise CheckpointError(f"{d}: has no vision tower weights and no vision_weights were given")
        from transformers import CLIPVisionModel
        vt, vinfo = CLIPVisionModel.from_pretrained(vision_weights, output_loading_info=True)
        bad = [k for k in vinfo.get("missing_keys", []) if "position_ids" not in k] + \
            list(vinfo.get("unexpected_keys", [])) + list(vinfo.get("mismatched_keys", []))
        if bad:
            raise CheckpointError(f"{vision_weights}: {sorted(map(str, bad))[:12]}")
        model.vision_tower.vision_tower.load_state_dict(vt.state_dict())
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
                 device="cpu", dtype=torch.float32):
        if random_init:
            self.model = build_model(t5_config, vision_config)
            self.model_id = "random"
        else:
            self.model, self.checkpoint_digest = load_clip_t5(weights, vision_weights, vision_config)
            self.model_id = weights
        self.model.eval()
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer
        self.device, self.dtype = torch.device(device), dtype
        self.to(device)

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
            pre, post = prompt_chunks(cap)
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
