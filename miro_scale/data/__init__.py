"""Data: WebDataset shards with binned rewards, loaders (PIL/torch, DALI GPU/CPU, precomputed
latents) and a writer/resharder. The synthetic shapes world (the embedded default dataset) lives in
:mod:`miro_scale.synthetic`.

Entry points (all plain functions/classes with explicit arguments):

- :class:`~miro_scale.data.loader.WebDatasetLoader` — PIL decode + torch DataLoader workers;
  ``mode="image"`` or ``mode="latent"`` (npy latents), optional text embeddings.
- :class:`~miro_scale.data.dali_loader.DaliLoader` — bytes read and probed in Python, decoded by DALI
  (GPU "mixed" decoder with ``device_id=<int>``, the CPU one with ``device_id=None``); images DALI
  must not see (a GIF named .jpg, a truncated JPEG, too many pixels) go to PIL or are skipped.
- :class:`~miro_scale.data.wds_stream.WdsStreamLoader` — the webdataset package's streaming reader
  (for URLs/object stores without random access), exactly once at shard granularity.
- :func:`make_loader` — picks one of the above by name.
- :class:`~miro_scale.data.writer.ShardWriter` — atomic shards + DALI index + manifest.
- :mod:`~miro_scale.data.sidecars`, :mod:`~miro_scale.data.encode`, :mod:`~miro_scale.data.join` —
  the per-shard sidecars, the encode stage and the shard stage (commands in ``preprocessing/``).
- ``python -m miro_scale.data.bench`` — loader throughput.

The shard format is documented in :mod:`miro_scale.data.format` (and docs/data.md).
"""
from .format import FORMAT_VERSION, SampleError, reward_entry, reward_vector, split_member_name
from .plan import resolve_shards
from .writer import ShardWriter, read_manifest

LOADERS = ("pil", "dali", "wds")
# the loaders need torch; the preprocessing stages that only move bytes (shard, bin) do not
_LAZY = {"PlannedLoader": "loader", "WebDatasetLoader": "loader"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_loader(kind: str, shards, batch_size: int, **kw):
    """``kind``: "pil" (WebDatasetLoader; also for ``mode="latent"``), "dali" (DaliLoader; pass
    ``device_id=None`` for the CPU pipeline) or "wds" (WdsStreamLoader; ``shards`` are URLs).
    Other keyword arguments go to the loader."""
    if kind == "pil":
        from .loader import WebDatasetLoader

        return WebDatasetLoader(shards, batch_size, **kw)
    if kind == "dali":
        from .dali_loader import DaliLoader

        return DaliLoader(shards, batch_size, **kw)
    if kind == "wds":
        from .wds_stream import WdsStreamLoader

        return WdsStreamLoader(shards, batch_size, **kw)
    raise ValueError(f"unknown loader kind {kind!r}; choose from {LOADERS}")


__all__ = ["FORMAT_VERSION", "SampleError", "reward_entry", "reward_vector", "split_member_name",
           "PlannedLoader", "WebDatasetLoader", "resolve_shards", "ShardWriter", "read_manifest",
           "make_loader", "LOADERS"]
