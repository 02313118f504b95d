"""The reward protocol and the preprocessing views rewards share.

A reward is a small object with
  key          canonical name (see keys.py), also the output column
  view         the preprocessing View it consumes (several rewards share one)
  needs_text   whether the caption matters (image-only rewards are scored once per image)
  batch_size   default batch size (the scorer may override it)
  device/dtype where its weights live
  score(images, captions) -> float32 tensor (N,)
and, for rewards whose image tower can be reused across captions,
  encode_images(images) -> features ; score_features(features, captions) -> tensor (N,)

`images` is what `view.prepare` returns for a list of PIL images: a float tensor (N, 3, S, S) for
tensor views, or a list of uint8 HxWx3 numpy arrays for the "pixels" view.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class View:
    """A deterministic image preprocessing.

    mode:
      center_crop  resize the short side to `size` (bicubic), center crop size x size
                   (CLIP / BLIP / CLIPImageProcessor style)
      letterbox    resize the long side to `size` (bicubic), pad to a square with zeros
                   (HPSv2's official ResizeMaxSize)
      pad_mean     pad to a square with the mean colour (LLaVA "expand2square"), then resize
      pixels       RGB uint8 numpy array, long side capped at `size` (pixel statistics rewards)
    jpeg_quality: re-encode the image as a JPEG of this quality first (how MIRO's release fed VQAScore)
    """

    name: str
    mode: str
    size: int
    mean: tuple = OPENAI_MEAN
    std: tuple = OPENAI_STD
    jpeg_quality: Optional[int] = None

    def one(self, img: Image.Image):
        img = img.convert("RGB")
        if self.jpeg_quality is not None:
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=self.jpeg_quality)
            img = Image.open(buf).convert("RGB")
        if self.mode == "pixels":
            w, h = img.size
            s = self.size / max(w, h)
            if s < 1:
                img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
        if self.mode == "center_crop":
            # torchvision Resize(size) + CenterCrop(size) on a PIL image, as CLIP, BLIP/ImageReward and the
            # aesthetic predictor preprocess: the short side becomes `size`, the long side
            # int(size * long / short) (floored), bicubic with PIL's antialiasing; the crop offset is
            # round((n - size) / 2). (CLIPImageProcessor floors the offset: at most 1 px apart.)
            w, h = img.size
            if w <= h:
                nw, nh = self.size, max(self.size, int(self.size * h / w))
            else:
                nw, nh = max(self.size, int(self.size * w / h)), self.size
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.BICUBIC)
            left, top = int(round((nw - self.size) / 2.0)), int(round((nh - self.size) / 2.0))
            img = img.crop((left, top, left + self.size, top + self.size))
        elif self.mode == "letterbox":
            w, h = img.size
            s = self.size / max(w, h)
            nw, nh = max(1, round(w * s)), max(1, round(h * s))
            img = img.resize((nw, nh), Image.BICUBIC)
            canvas = Image.new("RGB", (self.size, self.size), (0, 0, 0))
            canvas.paste(img, ((self.size - nw) // 2, (self.size - nh) // 2))
            img = canvas
        elif self.mode == "pad_mean":
            w, h = img.size
            fill = tuple(int(round(m * 255)) for m in self.mean)
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(img, ((side - w) // 2, (side - h) // 2))
            img = canvas.resize((self.size, self.size), Image.BICUBIC)
        else:
            raise ValueError(f"View {self.name!r}: unknown mode {self.mode!r}")
        # numpy, not torch: this runs in decode threads, where torch's intra-op thread pool only contends
        a = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
        a = (a - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))

    def prepare(self, images: Sequence[Image.Image]):
        items = [self.one(im) for im in images]
        return self.collate(items)

    def collate(self, items: list):
        if self.mode == "pixels":
            return list(items)
        return torch.stack(items) if items else torch.empty(0, 3, self.size, self.size)


VIEWS = {
    "pixels": View("pixels", "pixels", 512),
    "clip224": View("clip224", "center_crop", 224),
    "letterbox224": View("letterbox224", "letterbox", 224),
    "clip336_padmean": View("clip336_padmean", "pad_mean", 336),
    "clip512": View("clip512", "center_crop", 512),
}


class Reward:
    """Base class; subclasses set key/view and implement score or encode_images+score_features."""

    key: str = ""
    view: View = VIEWS["clip224"]
    needs_text: bool = True
    batch_size: int = 32
    model_id: str = ""          # human-readable identity of the weights (hub id, path, "random")
    checkpoint_digest: str = ""  # sha256 of the checkpoint file(s) when loaded from disk
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @property
    def shares_image_features(self) -> bool:
        return type(self).encode_images is not Reward.encode_images

    def to(self, device=None, dtype=None):
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        for m in self.modules():
            m.to(device=self.device)
        return self

    def modules(self) -> List[torch.nn.Module]:
        return [v for v in vars(self).values() if isinstance(v, torch.nn.Module)]

    def encode_images(self, images):  # pragma: no cover - overridden
        raise NotImplementedError

    def score_features(self, features, captions: Sequence[str]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def score(self, images, captions: Optional[Sequence[str]] = None) -> torch.Tensor:
        feats = self.encode_images(images)
        return self.score_features(feats, captions).float()

    def info(self) -> dict:
        return {"key": self.key, "view": self.view.name, "model_id": self.model_id,
                "checkpoint_digest": self.checkpoint_digest, "needs_text": self.needs_text}

    def _to_device(self, x):
        if isinstance(x, torch.Tensor):
            return x.to(self.device, non_blocking=True)
        return x


def repeat_features(features: Any, counts: torch.Tensor):
    """Repeat per-image features (tensor or tuple/dict of tensors) per caption."""
    if isinstance(features, torch.Tensor):
        return features.repeat_interleave(counts.to(features.device), dim=0)
    if isinstance(features, tuple):
        return tuple(repeat_features(f, counts) for f in features)
    if isinstance(features, list):
        return [f for f, n in zip(features, counts.tolist()) for _ in range(int(n))]
    if isinstance(features, dict):
        return {k: repeat_features(v, counts) for k, v in features.items()}
    raise TypeError(f"cannot repeat features of type {type(features).__name__}")
