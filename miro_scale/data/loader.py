"""Shard loaders that yield MIRO training batches; the PIL + torch DataLoader one lives here.

All loaders (this one, :class:`miro_scale.data.dali_loader.DaliLoader`) yield the same batch dict:

``"image"``      float32 [B, 3, H, W] in [-1, 1] (``mode="image"``), or
``"latents"``    [B, C, h, w] raw VAE posterior mean (``mode="latent"``), in the dtype stored
                 (fp16 as the encode stage writes it), and
``"latents_std"`` its std when ``latent_std`` (the trainer samples mean + std * eps on the device)
``"text"``       list[str] of B captions (always; ``caption_source`` "txt", a ``json["captions"]``
                 name, or a {name: weight} mix drawn per sample and epoch)
``"text_embeddings"`` [B, L, D] in the dtype stored and ``"text_mask"`` bool [B, L]
                 (``text_embeddings=True``), L the batch's longest caption (<= ``max_text_len``)
``"rewards"``    float32 [B, N]: the normalised bin values of ``reward_keys``, in that order
``"keys"``       list[str] of B sample keys (``"shard_name/key"`` is in ``"where"``)

Latent-mode batches stay compact on the host (stored dtype, text padded to the batch's longest
caption only) and cross from DataLoader workers in shared memory; :func:`device_batch` pads the
text to ``max_text_len`` and casts to float32 on the device, where that costs nothing.

Batches are compact: a sample that fails (bad image, json without a configured reward, ...) is left
out with a warning naming shard and key and counted in :attr:`stats`, so a batch can be shorter than
``batch_size``. Ordering, rank/worker split and resume follow :mod:`miro_scale.data.plan`; the state
(``state_dict()``) is the epoch and the number of batches already handed out, and restoring it
resumes on the next batch exactly, with any number of workers.
"""
from __future__ import annotations

import functools
import io
import logging
import math
from collections import Counter
from typing import Iterator, Sequence

import numpy as np
import torch

from .decode import DEFAULT_MAX_PIXELS, decode_image, resize_center_crop
from .format import (IMAGE_EXTS, JSON_EXT, LATENT_MEAN_EXT, LATENT_STD_EXT, TEXT_EMB_EXT,
                     TEXT_MASK_EXT, TEXT_EXT, SampleError, choose_caption, image_ext, parse_json,
                     reward_vector)
from .plan import (DatasetIndex, build_dataset_index, epoch_order, num_batches, rank_chunks, rank_slice,
                   resolve_shards)
from .tario import MemberReader

log = logging.getLogger("miro_scale.data")

STATE_VERSION = 1


def _load_npy(data: bytes, where: str, ext: str) -> np.ndarray:
    """A read-only view of a .npy member's data, without copying it (np.load copies in 256 KiB
    pieces); object arrays are refused, so nothing is unpickled."""
    try:
        if data[:6] != b"\x93NUMPY" or data[6] not in (1, 2, 3):
            raise ValueError("not a .npy file (versions 1-3)")
        start = 10 if data[6] == 1 else 12  # magic, version, then a 2- or 4-byte header length
        end = start + int.from_bytes(data[8:start], "little")
        shape, fortran, dtype = _npy_header(bytes(data[:end]))
        a = np.frombuffer(data, dtype, math.prod(shape), offset=end)
        return a.reshape(shape, order="F" if fortran else "C")
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad member
        raise SampleError("bad_npy", f"{where}: member .{ext} is not a valid .npy ({e})") from None


@functools.lru_cache(maxsize=4096)
def _npy_header(head: bytes) -> tuple:
    """(shape, fortran_order, dtype) of a .npy header. Cached: shards repeat a few headers, and
    numpy parses each with ast.literal_eval (a third of the loader's time per sample)."""
    fp = io.BytesIO(head)
    version = np.lib.format.read_magic(fp)
    # version 3 differs from 2 only in allowing a UTF-8 header, which our arrays' headers never need
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fp)
    if dtype.hasobject:
        raise ValueError("object arrays are not read")
    return shape, fortran, dtype


def _float_array(a: np.ndarray) -> np.ndarray:
    """fp16/fp32 stay as stored (no up-cast on the host); anything else becomes float32."""
    if a.dtype in (np.float16, np.float32) and a.dtype.isnative:
        return a
    return a.astype(np.float32)


def _batch_tensor(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker it lives in shared memory, so handing it to
    the main process passes a file descriptor instead of pickling its bytes (what torch's
    default_collate does)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _stack(arrays: list, fill=0) -> torch.Tensor:
    """Stack [n_j, ...] arrays into one [B, max n_j, ...] tensor (shared memory in a worker), each
    row's tail set to ``fill``; equal-shape arrays are simply stacked."""
    n = max(a.shape[0] for a in arrays)
    dtype = torch.from_numpy(np.empty(0, np.result_type(*arrays))).dtype
    out = _batch_tensor((len(arrays), n) + arrays[0].shape[1:], dtype)
    dst = out.numpy()
    for j, a in enumerate(arrays):
        dst[j, :a.shape[0]] = a
        dst[j, a.shape[0]:] = fill
    return out


def device_batch(batch: dict, device: torch.device | str, max_text_len: int | None = None) -> dict:
    """A loader batch on ``device`` in the trainer's form: tensors moved there, latents and text
    embeddings cast to float32 and the text padded with zeros (mask False) to ``max_text_len``
    tokens, on the device (cheap there; on the host it cost more than reading the sample).
    Lists (keys, captions) are kept as they are. To CUDA, host tensors are pinned first, so the
    copy runs asynchronously on the current stream (a pageable one blocks the host)."""
    device = torch.device(device)

    def move(v: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda" and v.device.type == "cpu" and not v.is_pinned():
            v = v.pin_memory()
        return v.to(device, non_blocking=True)

    out = {k: (move(v) if torch.is_tensor(v) else v) for k, v in batch.items()}
    for name in ("latents", "latents_std", "text_embeddings"):
        if name in out:
            out[name] = out[name].float()
    if max_text_len is not None and "text_embeddings" in out:
        emb, mask = out["text_embeddings"], out["text_mask"]
        pad = max_text_len - emb.shape[1]
        if pad < 0:
            raise ValueError(f"text embeddings have {emb.shape[1]} tokens, more than max_text_len "
                             f"{max_text_len}")
        out["text_embeddings"] = torch.nn.functional.pad(emb, (0, 0, 0, pad))
        out["text_mask"] = torch.nn.functional.pad(mask, (0, pad), value=False)
    return out


class RowBuilder:
    """Per-sample CPU work shared by the loaders: caption choice, rewards, image decode, latents,
    text embeddings, and collation into tensors. Needs the attributes set by
    ``_set_caption_source`` and: mode, resolution, max_pixels, latent_std, seed, reward_keys,
    text_embeddings, max_text_len."""

    @staticmethod
    def _guarded(load, where: str, stats: Counter, messages: list):
        """load() -> a row, or None with the reason counted and a message naming shard and key."""
        try:
            return load()
        except SampleError as e:
            stats[e.reason] += 1
            messages.append(f"{e} (skipped)")
        except Exception as e:  # noqa: BLE001 - bad input must not kill a training run
            stats["unexpected_error"] += 1
            messages.append(f"{where}: unexpected {type(e).__name__}: {e} (skipped)")
        return None

    def stream(self) -> Iterator[dict]:
        """Endless: the rest of this epoch, then the following epochs (state stays exact)."""
        while True:
            n = 0
            for batch in self:
                n += 1
                yield batch
            if n == 0 and (reason := self._no_work_reason()):  # an empty epoch would spin forever
                raise RuntimeError(reason)

    # Subclasses set max_warnings (None: no cap) and _warned = 0.
    def _warn(self, msg: str) -> None:
        self._warned += 1
        if self.max_warnings is None or self._warned <= self.max_warnings:
            log.warning(msg)
        elif self._warned == self.max_warnings + 1:
            log.warning("more data warnings follow; see the loader's stats")

    def _set_caption_source(self, caption_source) -> None:
        if isinstance(caption_source, str):
            caption_source = {caption_source: 1.0}
        names = list(caption_source)
        probs = np.asarray([float(caption_source[n]) for n in names], dtype=np.float64)
        if not names or (probs < 0).any() or probs.sum() <= 0:
            raise ValueError(f"caption_source needs non-negative weights, got {caption_source!r}")
        self.caption_names, self.caption_probs = names, probs / probs.sum()
        self.caption_source = dict(zip(names, self.caption_probs.tolist()))

    def _pick_caption(self, i: int, epoch: int) -> str:
        if len(self.caption_names) == 1:
            return self.caption_names[0]
        u = np.random.default_rng([self.seed, epoch, int(i), 0x636170]).random()
        k = int(np.searchsorted(np.cumsum(self.caption_probs), u, side="right"))
        return self.caption_names[min(k, len(self.caption_names) - 1)]

    def _text_and_rewards(self, txt: bytes | None, meta_bytes: bytes | None, where: str, source: str):
        """Caption and reward vector for the caption ``source`` (``_pick_caption``: with several
        sources one is drawn per sample and epoch, seeded); rewards come from
        ``json["rewards_by_caption"][source]`` when the json has them for that source, else from
        ``json["rewards"]``."""
        meta = parse_json(meta_bytes, where) if meta_bytes is not None else {}
        if txt is not None:
            try:
                txt_s = txt.decode("utf-8-sig").strip()
            except UnicodeDecodeError:
                raise SampleError("bad_txt", f"{where}: txt member is not UTF-8") from None
        else:
            txt_s = None
        caption = choose_caption(txt_s, meta, source, where)
        by_cap = meta.get("rewards_by_caption")
        if isinstance(by_cap, dict) and isinstance(by_cap.get(source), dict):
            meta = {"rewards": by_cap[source]}
            where = f"{where} (rewards_by_caption.{source})"
        rewards = reward_vector(meta, self.reward_keys, where)
        return caption, rewards

    def _text_embedding(self, emb_b: bytes, mask_b: bytes | None, where: str):
        emb = _load_npy(emb_b, where, TEXT_EMB_EXT)
        if emb.ndim != 2:
            raise SampleError("bad_npy", f"{where}: .{TEXT_EMB_EXT} has shape {emb.shape}, want [L, D]")
        if mask_b is not None:
            mask = _load_npy(mask_b, where, TEXT_MASK_EXT).astype(bool).reshape(-1)
            if mask.shape[0] != emb.shape[0]:
                raise SampleError("bad_npy", f"{where}: text mask length {mask.shape[0]} != "
                                  f"embedding length {emb.shape[0]}")
        else:
            mask = np.ones(emb.shape[0], dtype=bool)
        n = min(self.max_text_len, emb.shape[0])  # padded per batch here, to max_text_len on the device
        return _float_array(emb[:n]), mask[:n]

    def _row(self, get, exts, where: str, i: int, epoch: int) -> dict:
        """One sample's arrays. ``get(ext)`` returns a member's bytes or None; ``exts`` lists the
        members present; ``i`` seeds per-sample randomness (caption choice, latent noise)."""
        source = self._pick_caption(i, epoch)
        caption, rewards = self._text_and_rewards(get(TEXT_EXT), get(JSON_EXT), where, source)
        s = {"caption": caption, "rewards": rewards}
        if self.mode == "image":
            ext = image_ext(exts)
            if ext is None:
                raise SampleError("missing_image", f"{where}: no image member")
            im = decode_image(get(ext), where, min_size=self.resolution, max_pixels=self.max_pixels)
            s["image"] = resize_center_crop(im, self.resolution).transpose(2, 0, 1)
        else:
            mean_b = get(LATENT_MEAN_EXT)
            if mean_b is None:
                raise SampleError("missing_latent_mean", f"{where}: no .{LATENT_MEAN_EXT} member")
            mean = _float_array(_load_npy(mean_b, where, LATENT_MEAN_EXT))
            s["latents"] = mean
            if self.latent_std:
                std_b = get(LATENT_STD_EXT)
                if std_b is None:
                    raise SampleError("missing_latent_std", f"{where}: no .{LATENT_STD_EXT} member")
                std = _float_array(_load_npy(std_b, where, LATENT_STD_EXT))
                if std.shape != mean.shape:
                    raise SampleError("bad_npy", f"{where}: latent std shape {std.shape} != mean "
                                      f"shape {mean.shape}")
                s["latents_std"] = std
        if self.text_embeddings:
            emb_b = get(text_emb_ext(source))
            if emb_b is None:
                raise SampleError("missing_text_emb", f"{where}: no .{text_emb_ext(source)} member")
            s["text_embeddings"], s["text_mask"] = self._text_embedding(
                emb_b, get(text_mask_ext(source)), where)
        return s

    def _collate(self, rows: list, keys: list, wheres: list, stats: Counter, messages: list) -> dict:
        """Stack rows into tensors (in shared memory when run in a DataLoader worker); a row whose
        array shapes differ from the batch's first row is dropped (counted as ``shape_mismatch``)
        rather than failing the batch. Text embeddings are padded to the batch's longest."""
        if rows:
            ref = {n: _shape_key(n, rows[0][n]) for n in ("image", "latents", "text_embeddings")
                   if n in rows[0]}
            keep = [j for j, r in enumerate(rows) if all(_shape_key(n, r[n]) == sh for n, sh in ref.items())]
            for j in sorted(set(range(len(rows))) - set(keep)):
                stats["shape_mismatch"] += 1
                messages.append(f"{wheres[j]}: array shapes differ from the rest of its batch "
                                f"{ {n: rows[j][n].shape for n in ref} } vs {ref} (skipped)")
            rows = [rows[j] for j in keep]
            keys[:] = [keys[j] for j in keep]
            wheres[:] = [wheres[j] for j in keep]
        out = {"keys": keys, "where": wheres, "text": [r["caption"] for r in rows],
               "rewards": (_stack([r["rewards"] for r in rows]) if rows
                           else torch.zeros((0, len(self.reward_keys))))}
        for name in ("image", "latents", "latents_std"):
            if rows and name in rows[0]:
                out[name] = _stack([r[name] for r in rows])
        if rows and "text_embeddings" in rows[0]:
            out["text_embeddings"] = _stack([r["text_embeddings"] for r in rows])
            out["text_mask"] = _stack([r["text_mask"] for r in rows], fill=False)
        if not rows and self.mode == "image":
            out["image"] = torch.zeros((0, 3, self.resolution, self.resolution), dtype=torch.uint8)
        return out

    def _to_torch(self, a: dict) -> dict:
        """In the main process: images to float in [-1, 1]; pinned when ``pin_memory``."""
        out = dict(a)
        if "image" in a:
            out["image"] = a["image"].float().div_(127.5).sub_(1.0)  # uint8 [B, 3, H, W]
        if getattr(self, "pin_memory", False) and torch.cuda.is_available():
            out = {k: (v.pin_memory() if torch.is_tensor(v) else v) for k, v in out.items()}
        return out


def _shape_key(name: str, a: np.ndarray) -> tuple:
    """What must match across a batch: the whole shape, or for text embeddings the width only."""
    return a.shape[1:] if name == "text_embeddings" else a.shape


class PlannedLoader(RowBuilder):
    """Shared logic: shard indexing, the epoch plan for this rank, state, stats.

    Subclasses implement ``_iter_epoch(order, start_batch)`` yielding ``(batch_index, batch_dict,
    stats_counter, messages)``.
    """

    def __init__(self, shards, batch_size: int, *, mode: str = "image", resolution: int = 256,
                 reward_keys: Sequence[str] = (), caption_source: str = "txt",
                 text_embeddings: bool = False, max_text_len: int = 256,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 shuffle_chunk: int = 64, drop_last: bool = True, use_index_files: bool = True,
                 max_warnings: int = 100):
        if mode not in ("image", "latent"):
            raise ValueError(f"mode must be 'image' or 'latent', got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.shards = resolve_shards(shards)
        self.batch_size = int(batch_size)
        self.mode = mode
        self.resolution = int(resolution)
        self.reward_keys = tuple(reward_keys)
        self._set_caption_source(caption_source)
        names = self.caption_names
        self.text_embeddings = bool(text_embeddings)
        self.max_text_len = int(max_text_len)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed, self.shuffle, self.shuffle_chunk = int(seed), bool(shuffle), int(shuffle_chunk)
        self.drop_last = bool(drop_last)
        self.max_warnings = max_warnings
        self._warned = 0
        required = []
        if mode == "image":
            required.append(IMAGE_EXTS)
        else:
            required.append((LATENT_MEAN_EXT,))
        if "txt" in names:
            required.append((TEXT_EXT,))
        if self.reward_keys or names != ["txt"]:
            required.append((JSON_EXT,))
        if self.text_embeddings:
            for n in names:
                if self.caption_source[n] > 0:
                    required.append((text_emb_ext(n),))
        self.index: DatasetIndex = build_dataset_index(self.shards, required, use_index_files)
        self.stats: Counter = Counter()
        for reason, n in self.index.skipped.items():
            self.stats[reason] += n
        if self.rank == 0:
            for m in self.index.messages:
                self._warn(m)
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of this epoch already handed out
        rank_chunks(len(self.index), self.rank, self.world_size, self.batch_size, self.drop_last)

    # -- plan --------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Usable samples in the dataset (all ranks)."""
        return len(self.index)

    def rank_order(self, epoch: int) -> np.ndarray:
        """This rank's sample ids for ``epoch``, in order."""
        order = epoch_order(self.index, self.seed, epoch, self.shuffle, self.shuffle_chunk)
        return rank_slice(order, self.rank, self.world_size, self.batch_size, self.drop_last)

    def __len__(self) -> int:
        return len(rank_chunks(len(self.index), self.rank, self.world_size, self.batch_size,
                               self.drop_last))

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batch_in_epoch = int(epoch), 0

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "seed": self.seed, "shuffle": self.shuffle, "shuffle_chunk": self.shuffle_chunk,
                "batch_size": self.batch_size, "world_size": self.world_size, "rank": self.rank,
                "drop_last": self.drop_last, "num_samples": self.num_samples,
                "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        """Resume. The world size may differ from the saved one when the global position
        (``batch_in_epoch * world_size`` chunks, ranks move in lockstep) is a multiple of the new
        world size, i.e. at an optimizer-step boundary."""
        for name in ("seed", "shuffle", "shuffle_chunk", "batch_size", "drop_last", "num_samples"):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(f"loader state field {name!r} is {state[name]!r} but this loader has "
                                 f"{getattr(self, name)!r}; cannot resume exactly")
        self.epoch = int(state["epoch"])
        pos = int(state["batch_in_epoch"])
        old_world = int(state.get("world_size", self.world_size))
        if old_world != self.world_size:
            done = pos * old_world
            if done % self.world_size:
                raise ValueError(f"loader state: {done} global batches done in epoch {self.epoch} is "
                                 f"not a multiple of world_size {self.world_size} (saved with "
                                 f"{old_world}); cannot resume exactly")
            pos = done // self.world_size
        self.batch_in_epoch = pos
        if "stats" in state:
            self.stats = Counter(state["stats"])

    def _member_getter(self, i: int, reader: MemberReader):
        """(get, members, where) of sample i: ``get(ext)`` reads a member's bytes by offset (None
        when the sample has no such member)."""
        di = self.index
        path, mem, where = di.shards[di.shard_of[i]], di.members(i), di.where(i)

        def get(ext):
            if ext not in mem:
                return None
            off, size, _ = mem[ext]
            try:
                return reader.read(path, off, size)
            except (OSError, EOFError) as e:
                raise SampleError("read_error", f"{where}: cannot read .{ext} ({e})") from None

        return get, mem, where

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch (from ``batch_in_epoch``); then the epoch advances."""
        order = self.rank_order(self.epoch)
        nb = num_batches(len(order), self.batch_size)
        start = self.batch_in_epoch
        expected = start
        for b, batch, stats, messages in self._iter_epoch(order, start):
            if b != expected:
                raise RuntimeError(f"loader produced batch {b} where {expected} was due")
            expected += 1
            self.stats.update(stats)
            for m in messages:
                self._warn(m)
            self.batch_in_epoch = b + 1
            if len(batch["keys"]) == 0:
                continue
            self.stats["samples"] += len(batch["keys"])
            self.stats["batches"] += 1
            yield batch
        if expected != nb:
            raise RuntimeError(f"epoch {self.epoch} ended after batch {expected} of {nb}")
        self.epoch += 1
        self.batch_in_epoch = 0

    def _no_work_reason(self):
        if len(self) == 0:
            return (f"this rank ({self.rank} of {self.world_size}) gets no batches from "
                    f"{self.num_samples} samples with batch_size {self.batch_size}")
        return None

    def _iter_epoch(self, order: np.ndarray, start_batch: int):
        raise NotImplementedError

def text_emb_ext(caption_source: str) -> str:
    """The npy member with the embeddings of a caption source: ``text_emb.npy`` for txt,
    ``text_emb_<name>.npy`` for ``json["captions"][name]``."""
    return TEXT_EMB_EXT if caption_source == "txt" else f"text_emb_{caption_source}.npy"


def text_mask_ext(caption_source: str) -> str:
    return TEXT_MASK_EXT if caption_source == "txt" else f"text_mask_{caption_source}.npy"


def _identity(x):
    return x


class _BatchStream(torch.utils.data.IterableDataset):
    def __init__(self, loader: "WebDatasetLoader", order: np.ndarray, start_batch: int, epoch: int):
        self.loader, self.order, self.start_batch, self.epoch = loader, order, start_batch, epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        L = self.loader
        reader = MemberReader()
        nb = num_batches(len(self.order), L.batch_size)
        try:
            for b in range(self.start_batch + w, nb, W):
                ids = self.order[b * L.batch_size:(b + 1) * L.batch_size]
                yield (b,) + L._load_batch(ids, reader, self.epoch)
        finally:
            reader.close()


class WebDatasetLoader(PlannedLoader):
    """PIL decode + torch DataLoader workers, reading members by offset (random access).

    Args (besides :class:`PlannedLoader`'s): ``num_workers`` DataLoader workers (0: in-process),
    ``latent_std`` (latent mode: also read the posterior std, required; the trainer samples
    mean + std * eps), ``max_pixels`` (larger images are skipped), ``pin_memory``, ``prefetch_factor``.
    """

    def __init__(self, shards, batch_size: int, *, num_workers: int = 2, latent_std: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS, pin_memory: bool = False,
                 prefetch_factor: int = 2, **kw):
        super().__init__(shards, batch_size, **kw)
        self.num_workers = int(num_workers)
        self.latent_std = bool(latent_std)
        self.max_pixels = int(max_pixels)
        self.pin_memory = bool(pin_memory)
        self.prefetch_factor = int(prefetch_factor)

    def _iter_epoch(self, order, start_batch):
        ds = _BatchStream(self, order, start_batch, self.epoch)
        kw = {}
        if self.num_workers > 0:
            kw = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False}
        dl = torch.utils.data.DataLoader(ds, batch_size=None, collate_fn=_identity,
                                         num_workers=self.num_workers, pin_memory=False, **kw)
        for b, batch, stats, messages in dl:
            yield b, self._to_torch(batch), stats, messages

    def _load_sample(self, i: int, reader: MemberReader, epoch: int) -> dict:
        get, mem, where = self._member_getter(i, reader)
        return self._row(get, mem, where, i, epoch)

    def _load_batch(self, ids: np.ndarray, reader: MemberReader, epoch: int):
        stats: Counter = Counter()
        messages: list = []
        rows = []
        keys, wheres = [], []
        for i in ids:
            i = int(i)
            where = self.index.where(i)
            row = self._guarded(lambda: self._load_sample(i, reader, epoch), where, stats, messages)
            if row is None:
                continue
            rows.append(row)
            keys.append(self.index.key(i))
            wheres.append(where)
        out = self._collate(rows, keys, wheres, stats, messages)
        return out, stats, messages
