"""Streaming loader on the ``webdataset`` package, for shards that cannot be read by offset
(``http(s)://``, ``pipe:`` URLs for object stores) or have no index.

Shards are the unit: each epoch the shard list is permuted (seeded by ``(seed, epoch)``), shard ``j``
of that order goes to rank ``j % world``, and within the rank to DataLoader worker
``(j // world) % num_workers``; so every sample is read exactly once per epoch over all ranks and
workers. Each worker shuffles its stream with a seeded buffer and cuts it into batches; failed
samples are dropped from their batch (compact batches), as in the other loaders. Ranks can get
different numbers of samples (shards differ in size): use :meth:`stream` (endless) in training.

State (``state_dict``): epoch and the batches handed out from each worker. A resumed loader skips
the raw samples of those batches without decoding them and starts the round robin where it stopped,
so the batches continue exactly (the order is exact while all workers still have data; after one
runs dry, the remaining batches are the same but their interleaving may differ). The number of
workers, ranks and the shard list must be unchanged.
"""
from __future__ import annotations

import itertools
import logging
import zlib
from collections import Counter
from typing import Iterator, Sequence

import numpy as np
import torch

from .decode import DEFAULT_MAX_PIXELS
from .format import IMAGE_EXTS, JSON_EXT, TEXT_EXT, SampleError
from .loader import RowBuilder, _identity, text_emb_ext
from .tario import normalize_member_name

log = logging.getLogger("miro_scale.data")


class _WorkerStream(torch.utils.data.IterableDataset):
    def __init__(self, loader: "WdsStreamLoader", epoch: int, consumed: list, rotate: int):
        self.loader, self.epoch, self.consumed, self.rotate = loader, epoch, list(consumed), rotate

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        p, W = (info.id, info.num_workers) if info is not None else (0, 1)
        w = (p + self.rotate) % W
        yield from self.loader._worker_batches(self.epoch, w, self.consumed[w])


class WdsStreamLoader(RowBuilder):
    """Args: ``urls`` (list of shard URLs/paths, or a brace pattern string understood by
    webdataset), ``batch_size``, and as :class:`miro_scale.data.loader.WebDatasetLoader`:
    ``mode``, ``resolution``, ``reward_keys``, ``caption_source``, ``text_embeddings``,
    ``max_text_len``, ``rank``, ``world_size``, ``num_workers``, ``seed``, ``shuffle``,
    ``latent_std``, ``max_pixels``; plus ``shuffle_buffer`` (samples per worker buffer)."""

    def __init__(self, urls, batch_size: int, *, mode: str = "image", resolution: int = 256,
                 reward_keys: Sequence[str] = (), caption_source="txt", text_embeddings: bool = False,
                 max_text_len: int = 256, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                 seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000,
                 latent_std: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_warnings: int = 100):
        try:
            import webdataset  # noqa: F401
        except ImportError as e:
            raise ImportError("WdsStreamLoader needs the webdataset package") from e
        if isinstance(urls, str):
            import braceexpand

            urls = list(braceexpand.braceexpand(urls))
        self.urls = [str(u) for u in urls]
        if not self.urls:
            raise ValueError("no shard URLs given")
        if mode not in ("image", "latent"):
            raise ValueError(f"mode must be 'image' or 'latent', got {mode!r}")
        self.batch_size, self.mode, self.resolution = int(batch_size), mode, int(resolution)
        self.reward_keys = tuple(reward_keys)
        self._set_caption_source(caption_source)
        self.text_embeddings, self.max_text_len = bool(text_embeddings), int(max_text_len)
        self.rank, self.world_size = int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.num_workers, self.seed, self.shuffle = int(num_workers), int(seed), bool(shuffle)
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.latent_std, self.max_pixels = bool(latent_std), int(max_pixels)
        self.max_warnings, self._warned = max_warnings, 0
        self.stats: Counter = Counter()
        self.epoch = 0
        W = max(1, self.num_workers)
        self.consumed = [0] * W

    # -- assignment --------------------------------------------------------------------------
    def worker_shards(self, epoch: int, w: int) -> list:
        n = len(self.urls)
        order = (np.random.default_rng([self.seed, epoch, 0x777364]).permutation(n) if self.shuffle
                 else np.arange(n))
        mine = order[self.rank::self.world_size]
        return [self.urls[j] for j in mine[w::max(1, self.num_workers)]]

    def _raw(self, urls: list, errors: list) -> Iterator[dict]:
        import webdataset as wds

        def handler(exn):
            errors.append(exn)
            return True  # continue with the next shard / sample

        ident = lambda x: x  # noqa: E731 - shards are already split by rank and worker
        ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=ident, workersplitter=ident,
                            handler=handler, empty_check=False)
        return iter(ds)

    def _shuffled(self, it: Iterator[dict], epoch: int, w: int) -> Iterator[dict]:
        if not self.shuffle:
            yield from it
            return
        rng = np.random.default_rng([self.seed, epoch, self.rank, w, 0x627566])
        buf: list = []
        for x in it:
            if len(buf) < self.shuffle_buffer:
                buf.append(x)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], x = x, buf[j]
            yield x
        for j in rng.permutation(len(buf)):
            yield buf[j]

    def _worker_batches(self, epoch: int, w: int, skip_batches: int):
        errors: list = []
        raw = self._shuffled(self._raw(self.worker_shards(epoch, w), errors), epoch, w)
        for _ in itertools.islice(raw, skip_batches * self.batch_size):
            pass
        errors.clear()  # reported before the checkpoint was taken
        b = skip_batches
        while True:
            chunk = list(itertools.islice(raw, self.batch_size))
            if not chunk and not errors:
                return
            stats: Counter = Counter()
            messages: list = []
            for e in errors:
                stats["stream_error"] += 1
                messages.append(f"webdataset: {type(e).__name__}: {e} (shard or sample skipped)")
            errors.clear()
            if not chunk:
                # errors after the last sample: hand them over in an empty batch
                yield w, b, self._collate([], [], [], stats, messages), stats, messages
                return
            rows, keys, wheres = [], [], []
            for sample in chunk:
                key = normalize_member_name(sample.get("__key__", "?")) or "?"  # './KEY' is KEY, as in tario
                where = f"{sample.get('__url__', '?')}:{key}"
                mem = {k: v for k, v in sample.items() if not k.startswith("__")}

                def load():
                    self._check_members(mem, where)
                    return self._row(mem.get, mem, where, zlib.crc32(where.encode("utf-8")), epoch)

                row = self._guarded(load, where, stats, messages)
                if row is None:
                    continue
                rows.append(row)
                keys.append(key)
                wheres.append(where)
            yield w, b, self._collate(rows, keys, wheres, stats, messages), stats, messages
            b += 1

    def _check_members(self, mem: dict, where: str) -> None:
        need = []
        if self.mode == "image":
            if not any(e in mem for e in IMAGE_EXTS):
                raise SampleError("missing_image", f"{where}: skipped (missing_image)")
        if "txt" in self.caption_names:
            need.append(TEXT_EXT)
        if self.reward_keys or self.caption_names != ["txt"]:
            need.append(JSON_EXT)
        if self.text_embeddings:
            need += [text_emb_ext(n) for n in self.caption_names if self.caption_source[n] > 0]
        for e in need:
            if e not in mem:
                raise SampleError(f"missing_{e}", f"{where}: skipped (missing_{e})")
        for e, v in mem.items():
            if isinstance(v, (bytes, bytearray)) and len(v) == 0 and (e in need or e in IMAGE_EXTS):
                raise SampleError("empty_member", f"{where}: skipped (member .{e} is empty)")

    # -- iteration and state -------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch; then the epoch advances."""
        W = max(1, self.num_workers)
        rotate = sum(self.consumed) % W
        ds = _WorkerStream(self, self.epoch, self.consumed, rotate)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, collate_fn=_identity,
                                         num_workers=self.num_workers)
        for w, b, batch, stats, messages in dl:
            if b != self.consumed[w]:
                raise RuntimeError(f"worker {w} produced batch {b} where {self.consumed[w]} was due")
            self.consumed[w] += 1
            self.stats.update(stats)
            for m in messages:
                self._warn(m)
            if not batch["keys"]:
                continue
            self.stats["samples"] += len(batch["keys"])
            self.stats["batches"] += 1
            yield self._to_torch(batch)
        self.epoch += 1
        self.consumed = [0] * W

    def _no_work_reason(self):
        if not any(self.worker_shards(self.epoch, w) for w in range(max(1, self.num_workers))):
            return f"rank {self.rank} of {self.world_size} gets no shards out of {len(self.urls)}"
        return None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.consumed = [0] * max(1, self.num_workers)

    def state_dict(self) -> dict:
        return {"kind": "wds_stream", "epoch": self.epoch, "consumed": list(self.consumed),
                "seed": self.seed, "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer,
                "batch_size": self.batch_size, "world_size": self.world_size, "rank": self.rank,
                "num_workers": self.num_workers, "num_shards": len(self.urls),
                "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        for name in ("seed", "shuffle", "shuffle_buffer", "batch_size", "world_size", "rank",
                     "num_workers"):
            if state.get(name, getattr(self, name)) != getattr(self, name):
                raise ValueError(f"loader state field {name!r} is {state[name]!r} but this loader has "
                                 f"{getattr(self, name)!r}; cannot resume exactly")
        if state.get("num_shards", len(self.urls)) != len(self.urls):
            raise ValueError(f"loader state has {state['num_shards']} shards, this loader "
                             f"{len(self.urls)}; cannot resume exactly")
        self.epoch = int(state["epoch"])
        self.consumed = [int(c) for c in state["consumed"]]
        if "stats" in state:
            self.stats = Counter(state["stats"])
