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

import functools
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

    @property
    def spec(self) -> tuple:
        """What the output depends on (not the name): views with equal specs are one computation."""
        return (self.mode, self.size, tuple(self.mean), tuple(self.std), self.jpeg_quality)

    @property
    def _pixels_key(self) -> tuple:
        """What the resized uint8 pixels depend on (views differing only in normalisation share them)."""
        fill = tuple(self.mean) if self.mode == "pad_mean" else None
        return (self.jpeg_quality, self.mode, self.size, fill)

    def one(self, img: Image.Image):
        return compute_views(img, [self])[self.spec]

    def _pixels(self, img: Image.Image) -> np.ndarray:
        """The view's geometry on an RGB image (already JPEG re-encoded when asked): uint8 HxWx3."""
        if self.mode == "pixels":
            w, h = img.size
            s = self.size / max(w, h)
            if s < 1:
                img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
        elif self.mode == "center_crop":
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
        return np.asarray(img, dtype=np.uint8)

    def _normalize(self, pixels: np.ndarray):
        """uint8 HxWx3 -> float (3, H, W), (x / 255 - mean) / std; the "pixels" view stays uint8.

        Through a 256-entry table per channel, filled with the same float32 operations, so the
        values are bit-identical to computing them per pixel at a third of the cost. numpy, not
        torch: this runs in decode threads, where torch's intra-op thread pool only contends."""
        if self.mode == "pixels":
            return pixels
        lut = _normalize_table(tuple(self.mean), tuple(self.std))
        chw = np.ascontiguousarray(pixels.transpose(2, 0, 1))
        return torch.from_numpy(np.stack([lut[c][chw[c]] for c in range(3)]))

    def prepare(self, images: Sequence[Image.Image]):
        return prepare_views(images, [self])[self.spec]

    def collate(self, items: list):
        if self.mode == "pixels":
            return list(items)
        return torch.stack(items) if items else torch.empty(0, 3, self.size, self.size)


@functools.lru_cache(maxsize=None)
def _normalize_table(mean: tuple, std: tuple) -> np.ndarray:
    """[3, 256] float32: channel c of uint8 value u -> (u / 255 - mean[c]) / std[c], as View computed it."""
    a = np.arange(256, dtype=np.uint8).astype(np.float32)[:, None] / np.float32(255.0)
    return np.ascontiguousarray(((a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).T)


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(buf).convert("RGB")


def compute_views(img: Image.Image, views: Sequence[View]) -> dict:
    """Every distinct view of one image, keyed by ``View.spec``, each computed once whatever number
    of rewards share it, and sharing the work views have in common: the RGB conversion, one JPEG
    re-encode per quality, the resized pixels of views that differ only in normalisation."""
    img = img.convert("RGB")
    jpegs: dict = {}
    pixels: dict = {}
    out: dict = {}
    for v in views:
        if v.spec in out:
            continue
        q = v.jpeg_quality
        if q is not None and q not in jpegs:
            jpegs[q] = _jpeg(img, q)
        key = v._pixels_key
        if key not in pixels:
            pixels[key] = v._pixels(img if q is None else jpegs[q])
        out[v.spec] = v._normalize(pixels[key])
    return out


def prepare_views(images: Sequence[Image.Image], views: Sequence[View]) -> dict:
    """Batches of every distinct view of ``images``, keyed by ``View.spec`` (each view once per
    image, however many rewards use it): ``{spec: view.collate(items)}``."""
    per_image = [compute_views(im, views) for im in images]
    distinct = {v.spec: v for v in views}
    return {spec: v.collate([p[spec] for p in per_image]) for spec, v in distinct.items()}


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
