"""open_clip-based rewards: LAION aesthetic predictor (ViT-L/14 QuickGELU + MLP) and HPSv2 / HPSv2.1 (ViT-H-14).

Architectures are built from open_clip model configs (a built-in name such as "ViT-H-14" or a
config dict, e.g. a tiny one for tests). Released weights (a local file or a hub repo + filename)
are streamed strictly into a model built on the meta device and materialised on the target device
in the target dtype (loading.load_checkpoint_files): host memory never holds a second copy.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Optional, Sequence, Union

import torch

from .base import VIEWS, Reward
from .heads import RewardMLP
from .loading import file_digest, init_on_meta, load_checkpoint_files, materialize, resolve_file

# Keys of OpenAI's original checkpoints that are metadata, not parameters.
OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")
# The text tower's modules (the aesthetic predictor reads images only) and their checkpoint keys.
TEXT_TOWER = ("transformer", "token_embedding", "ln_final")
TEXT_TOWER_KEYS = tuple(f"{m}.*" for m in TEXT_TOWER) + ("attn_mask",)


def build_open_clip(cfg: Union[str, dict], quick_gelu: Optional[bool] = None) -> torch.nn.Module:
    import open_clip
    from open_clip.model import CLIP
    if isinstance(cfg, str):
        c = open_clip.get_model_config(cfg)
        if c is None:
            raise KeyError(f"open_clip has no model config named {cfg!r}")
    else:
        c = copy.deepcopy(cfg)
    c = dict(c)
    qg = c.pop("quick_gelu", False) if quick_gelu is None else quick_gelu
    c.pop("quick_gelu", None)
    model = CLIP(embed_dim=c["embed_dim"], vision_cfg=c["vision_cfg"], text_cfg=c["text_cfg"], quick_gelu=qg)
    model.eval()
    return model


def open_clip_tokenizer(context_length: int = 77):
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer(context_length=context_length)


def build_clip_reward_model(clip_config: Union[str, dict], weights: Optional[str], filename: Optional[str],
                            device, dtype, image_only: bool = False):
    """(open_clip CLIP on `device` in `dtype`, checkpoint digest or ""). Without `weights`, random
    (seeded by the caller). `image_only` drops the text tower before any storage is allocated."""
    with contextlib.nullcontext() if weights is None else init_on_meta():
        model = build_open_clip(clip_config)
    if image_only:
        for name in TEXT_TOWER:
            setattr(model, name, torch.nn.Identity())
    materialize(model, device, dtype, keep_fp32=("logit_scale",))
    if weights is None:
        return model, ""
    path = resolve_file(weights, filename)
    ignore: Sequence[str] = OPENAI_META_KEYS + (TEXT_TOWER_KEYS if image_only else ())
    load_checkpoint_files(model, [path], source=str(path), optional=("attn_mask",), ignore=ignore)
    return model, file_digest(path)


class AestheticReward(Reward):
    """LAION improved aesthetic predictor: MLP(L2-normalised CLIP ViT-L/14 image embedding), AVA 1-10."""

    key = "aesthetic_score"
    view = VIEWS["clip224"]
    needs_text = False
    batch_size = 128

    def __init__(self, clip_config: Union[str, dict] = "ViT-L-14-quickgelu",
                 clip_weights: Optional[str] = "timm/vit_large_patch14_clip_224.openai",
                 clip_filename: Optional[str] = "open_clip_pytorch_model.bin",
                 head_weights: Optional[str] = None, head_filename: Optional[str] = "sac+logos+ava1-l14-linearMSE.pth",
                 random_init: bool = False, device="cpu", dtype=torch.float32):
        if not random_init and (clip_weights is None or head_weights is None):
            raise ValueError("aesthetic_score: clip_weights and head_weights are required "
                             "(or random_init=True for tests/benchmarks)")
        self.clip, clip_digest = build_clip_reward_model(clip_config, None if random_init else clip_weights,
                                                         clip_filename, device, dtype, image_only=True)
        # the head is 1.2M parameters and its output is the score: it stays fp32
        self.head = RewardMLP(self.clip.visual.output_dim).eval().to(device)
        if random_init:
            self.model_id = "random"
        else:
            hp = resolve_file(head_weights, head_filename)
            load_checkpoint_files(self.head, [hp], source=str(hp))
            self.checkpoint_digest = f"{clip_digest},{file_digest(hp)}"
            self.model_id = f"{clip_weights}+{head_weights}"
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def encode_images(self, images):
        x = self._to_device(images).to(self.dtype)
        f = self.clip.encode_image(x, normalize=True)
        return f

    @torch.no_grad()
    def score_features(self, features, captions=None):
        with torch.autocast(self.device.type, enabled=False):
            return self.head(features.float()).squeeze(-1)


HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


class HPSv2Reward(Reward):
    """HPSv2 / HPSv2.1: cosine of the normalised open_clip ViT-H-14 image and text embeddings.

    view: "clip224" (center crop; what MIRO's preprocessing used) or "letterbox224" (HPSv2's
    official ResizeMaxSize + zero pad).
    """

    key = "hpsv2_score"
    needs_text = True
    batch_size = 64

    def __init__(self, version: str = "v2.1", weights: Optional[str] = "xswu/HPSv2", filename: Optional[str] = None,
                 clip_config: Union[str, dict] = "ViT-H-14", view: str = "clip224", random_init: bool = False,
                 device="cpu", dtype=torch.float32):
        if version not in HPS_FILES:
            raise ValueError(f"hpsv2_score: version must be one of {sorted(HPS_FILES)}, got {version!r}")
        if view not in ("clip224", "letterbox224"):
            raise ValueError(f"hpsv2_score: view must be clip224 or letterbox224, got {view!r}")
        self.view = VIEWS[view]
        fn = filename or HPS_FILES[version]
        self.clip, self.checkpoint_digest = build_clip_reward_model(clip_config, None if random_init else weights,
                                                                    fn, device, dtype)
        self.tokenizer = open_clip_tokenizer(self.clip.context_length)
        self.model_id = "random" if random_init else f"{weights}/{fn}"
        self.version = version
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def encode_images(self, images):
        return self.clip.encode_image(self._to_device(images).to(self.dtype), normalize=True)

    @torch.no_grad()
    def encode_text(self, captions):
        tok = self.tokenizer(list(captions)).to(self.device)
        return self.clip.encode_text(tok, normalize=True)

    @torch.no_grad()
    def score_features(self, features, captions):
        t = self.encode_text(captions)
        return (features.float() * t.float()).sum(-1)
