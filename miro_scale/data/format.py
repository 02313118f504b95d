"""The miro-scale shard format (WebDataset tars), and helpers to read a sample's metadata.

Layout
------
A dataset is a directory of POSIX tar files ("shards"). Each sample is a group of consecutive tar
members sharing a key; as in DALI and webdataset, a member name ``dir/KEY.EXT`` splits at the *first*
'.' of its basename, so ``000123.latent_mean.npy`` has key ``000123`` and extension
``latent_mean.npy``. Extensions are case-sensitive (``JPG`` is not ``jpg``).

Per sample:

``jpg`` (or ``jpeg``, ``png``, ``webp``)
    The encoded image (RGB, grayscale, CMYK, palette, RGBA or 16-bit PNG are all accepted; alpha is
    dropped, 16-bit is scaled to 8-bit, EXIF orientation is applied).
``txt``
    The caption, UTF-8.
``json``
    Metadata, a UTF-8 JSON object. All fields are optional except those the loader is configured to
    need (the reward keys):

    - img2dataset's fields are kept as they are: ``key``, ``status``, ``caption``, ``url``,
      ``width``, ``height``, ``original_width``, ``original_height``, ``exif``, ``sha256``,
      ``error_message``.
    - ``rewards``: ``{reward_key: {"raw": float, "bin": int, "value": float}}`` where ``bin`` is the
      quantile bin index in ``[0, num_bins)`` and ``value = bin / (num_bins - 1)`` is the normalised
      value the model is conditioned on. Loaders read ``value``; a sample whose json lacks a
      configured key (or its ``value``) is skipped and counted under ``missing_reward``.
    - ``reward_bins`` (optional): ``{"num_bins": 64, "scheme": "quantile", "edges_sha256": ...}``.
    - ``captions`` (optional): ``{"short": str, "long": str}``; a loader can be told to use one of
      them instead of ``txt``, or to mix sources per sample (e.g. 50/50 txt and long).
    - ``rewards_by_caption`` (optional): ``{caption_name: {reward_key: {"raw", "bin", "value"}}}``,
      the rewards of the image with that caption (text-dependent rewards differ per caption); used
      in place of ``rewards`` when the loader picked that caption.
    - synthetic-world samples also carry ``tag``, ``scene``, ``corruption`` and ``mismatch`` (see
      :mod:`miro_scale.synthetic.world`).
``latent_mean.npy``, ``latent_std.npy`` (optional)
    Precomputed VAE posterior mean and std, ``[C, h, w]`` (fp16 or fp32), in raw VAE units (no
    scaling). The latent loader samples ``mean + std * eps`` (or returns the mean).
``text_emb.npy`` (optional), ``text_mask.npy`` (optional)
    Text-encoder token embeddings ``[n_tokens, D]`` (fp16/fp32), usually trimmed to the mask; the
    mask (bool/uint8 ``[n_tokens]``) is optional and defaults to all true. The loader truncates to
    ``max_text_len`` and pads to the batch's longest caption with a bool mask; the trainer's
    :func:`~miro_scale.data.loader.device_batch` pads to ``max_text_len`` on the device. Embeddings of ``json["captions"][name]``
    go in ``text_emb_<name>.npy`` / ``text_mask_<name>.npy``.

Alongside the shards the writer puts, for ``NAME.tar``:

``NAME.idx``
    DALI's webdataset index (the format ``wds2idx`` writes, version ``v1.2``): a first line
    ``v1.2 <num_samples>``, then one line per sample listing, for each member,
    ``<ext> <data offset> <size> <member name>`` separated by spaces. Offsets point at member data
    (after the 512-byte tar header). Loaders use it for random access, so it is also the torch
    loader's index; when it is absent the tar is scanned (truncated tars are indexed up to the last
    complete member).
``manifest.json``
    ``{"format": "miro-scale-wds/1", "shards": [{"name", "num_samples", "num_bytes",
    "keys_sha256"}], "num_samples", "created"}``. ``keys_sha256`` is the SHA-256 of the shard's keys
    joined by newlines, in tar order.

Input shards in img2dataset's layout (``00000.tar`` with jpg/txt/json, plus ``00000_stats.json`` and
``00000.parquet`` that are ignored) are read as they are.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

FORMAT_VERSION = "miro-scale-wds/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXT = "txt"
JSON_EXT = "json"
LATENT_MEAN_EXT = "latent_mean.npy"
LATENT_STD_EXT = "latent_std.npy"
TEXT_EMB_EXT = "text_emb.npy"
TEXT_MASK_EXT = "text_mask.npy"
INDEX_VERSION = "v1.2"


class SampleError(ValueError):
    """A sample cannot be used. ``reason`` is the stats counter it is counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/KEY.EXT.EXT2`` -> (``dir/KEY``, ``EXT.EXT2``), splitting at the basename's first '.'.

    The directory part stays in the key (as DALI and webdataset do). A name without '.' has
    extension ``""``.
    """
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def image_ext(members: Mapping[str, Any]) -> str | None:
    """The first image extension present among ``members`` (a mapping keyed by extension)."""
    for ext in IMAGE_EXTS:
        if ext in members:
            return ext
    return None


def parse_json(data: bytes, where: str) -> dict:
    """Parse a json member; ``where`` ("shard:key") names it in errors."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleError("bad_json", f"{where}: json member is not valid UTF-8 JSON ({e})") from None
    if not isinstance(meta, dict):
        raise SampleError("bad_json", f"{where}: json member is a {type(meta).__name__}, not an object")
    return meta


def reward_vector(meta: Mapping[str, Any], reward_keys: Sequence[str], where: str) -> np.ndarray:
    """The normalised reward values ``rewards[k]["value"]`` in ``reward_keys`` order, float32 [N].

    Raises SampleError("missing_reward") naming the key when one is absent or not a finite number in
    [0, 1].
    """
    out = np.empty(len(reward_keys), dtype=np.float32)
    rewards = meta.get("rewards")
    for i, k in enumerate(reward_keys):
        entry = rewards.get(k) if isinstance(rewards, Mapping) else None
        value = entry.get("value") if isinstance(entry, Mapping) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise SampleError("missing_reward", f"{where}: json has no rewards.{k}.value")
        if not 0.0 <= value <= 1.0:
            raise SampleError("missing_reward", f"{where}: rewards.{k}.value={value} is outside [0, 1]")
        out[i] = value
    return out


def reward_entry(raw: float | None, bin_index: int, num_bins: int) -> dict:
    """The json entry for one reward: raw score, bin index and normalised value bin/(num_bins-1)."""
    if not 0 <= int(bin_index) < num_bins:
        raise ValueError(f"bin {bin_index} outside [0, {num_bins})")
    return {
        "raw": None if raw is None else float(raw),
        "bin": int(bin_index),
        "value": float(int(bin_index) / (num_bins - 1)) if num_bins > 1 else 0.0,
    }


def clean_caption(text: str) -> str:
    """The caption the models see: CC12M's ``<PERSON>`` placeholders removed, as the release did
    before scoring and encoding."""
    return text.replace("<PERSON>", "")


def choose_caption(txt: str | None, meta: Mapping[str, Any], source: str, where: str) -> str:
    """The caption to use. ``source``: "txt" (the txt member, else json "caption"), or the name of a
    ``json["captions"]`` entry ("short", "long", ...)."""
    if source == "txt":
        if txt is not None:
            return txt
        cap = meta.get("caption")
        if isinstance(cap, str):
            return cap
        raise SampleError("missing_txt", f"{where}: no txt member and no json caption")
    caps = meta.get("captions")
    cap = caps.get(source) if isinstance(caps, Mapping) else None
    if not isinstance(cap, str):
        raise SampleError("missing_caption", f"{where}: json has no captions.{source}")
    return cap
