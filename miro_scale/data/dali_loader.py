"""DALI loader: image decode, resize and crop/normalise on the GPU ("mixed" decoder) or, with
``device_id=None``, the same pipeline on the CPU; reading, captions and rewards in Python.

It follows the same plan as :class:`miro_scale.data.loader.WebDatasetLoader` (same samples, same
order, same batches, same state). A producer thread reads each batch's members by offset, in plan
order, parses captions and json (rewards) and probes every image's header
(:func:`~miro_scale.data.decode.probe_image`). Only complete JPEG, PNG and WebP files are fed to DALI
(``fn.external_source``): DALI's GPU decoder can kill the process on a file it cannot read, before
any fallback runs. Other images PIL reads (a GIF named .jpg) are decoded with PIL as the torch loader
does and merged back in plan order; empty, unreadable, truncated or too-large images are skipped with
a warning naming shard and key and counted. Should DALI still fail on a batch, that batch is decoded
with PIL (``dali_batch_fallback``).
"""
from __future__ import annotations

import queue
import threading
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
import torch

from .decode import DEFAULT_MAX_PIXELS, decode_image, probe_image, resize_center_crop
from .format import JSON_EXT, TEXT_EXT, SampleError, image_ext
from .loader import PlannedLoader
from .plan import num_batches
from .tario import MemberReader


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class _Batch:
    """A plan batch between the producer and the consumer. ``rows``: (key, where, caption, rewards,
    image) in plan order; image is the encoded bytes for DALI or a PIL-decoded uint8 [3, H, W]."""
    index: int
    rows: list = field(default_factory=list)
    stats: Counter = field(default_factory=Counter)
    messages: list = field(default_factory=list)
    pipe: object = None  # the pipeline its DALI images were scheduled on
    # why DALI failed on them: a string, as a stored exception would tie this batch and its
    # pipeline into a reference cycle through the traceback (see _iter_epoch)
    error: str | None = None

    @property
    def encoded(self) -> list:
        return [r[4] for r in self.rows if isinstance(r[4], bytes)]


def _reason(e: Exception) -> str:
    """The operator's own words from a DALI error (its first lines are generic)."""
    lines = str(e).split("encountered:")[-1].strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


class DaliLoader(PlannedLoader):
    """Args (besides :class:`miro_scale.data.loader.PlannedLoader`'s): ``device_id`` (CUDA device for
    the "mixed" decoder and GPU ops; None runs everything on the CPU), ``num_threads`` (DALI CPU
    threads), ``prefetch_queue_depth`` (batches read and decoded ahead of the one handed out),
    ``max_pixels`` (larger images are skipped). Only ``mode="image"``; precomputed latents go
    through WebDatasetLoader."""

    def __init__(self, shards, batch_size: int, *, device_id: int | None = None, num_threads: int = 4,
                 prefetch_queue_depth: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS, **kw):
        if kw.get("mode", "image") != "image":
            raise ValueError("DaliLoader reads images only; use WebDatasetLoader(mode='latent') for "
                             "precomputed latents")
        if kw.get("text_embeddings"):
            raise ValueError("DaliLoader does not read text embeddings; use WebDatasetLoader")
        if not dali_available():
            raise ImportError("nvidia-dali is not installed (pip install nvidia-dali-cuda130)")
        super().__init__(shards, batch_size, **kw)
        if device_id is not None and not torch.cuda.is_available():
            raise RuntimeError(f"device_id={device_id} but CUDA is not available; pass device_id=None "
                               "for the CPU pipeline")
        self.device_id = device_id
        self.num_threads = int(num_threads)
        self.prefetch_queue_depth = max(1, int(prefetch_queue_depth))
        self.max_pixels = int(max_pixels)

    @property
    def _device(self) -> torch.device:
        return torch.device("cpu") if self.device_id is None else torch.device("cuda", self.device_id)

    # -- producer (thread): read, parse, probe --------------------------------------------------
    def _pil_chw(self, data: bytes, where: str) -> np.ndarray:
        im = decode_image(data, where, min_size=self.resolution, max_pixels=self.max_pixels)
        return resize_center_crop(im, self.resolution).transpose(2, 0, 1)

    def _row(self, i: int, reader: MemberReader, epoch: int) -> tuple:
        get, mem, where = self._member_getter(i, reader)
        # caption and rewards first, as the torch loader does, so a sample is skipped for the same reason
        caption, rewards = self._text_and_rewards(get(TEXT_EXT), get(JSON_EXT), where,
                                                  self._pick_caption(i, epoch))
        ext = image_ext(mem)
        if ext is None:
            raise SampleError("missing_image", f"{where}: no image member")
        data = get(ext)
        try:
            dali_safe = probe_image(data, where, self.max_pixels).dali_safe
        except SampleError as e:
            if e.reason != "too_large" or data[:2] != b"\xff\xd8":
                raise
            # decode_image reads a big JPEG at reduced DCT scale and applies max_pixels to that
            # size: let it decide, as in the torch loader
            dali_safe = False
        image = data if dali_safe else self._pil_chw(data, where)
        return self.index.key(i), where, caption, rewards, image

    def _produce(self, order, start_batch: int, nb: int, epoch: int, out: queue.Queue,
                 stop: threading.Event) -> None:
        B = self.batch_size
        reader = MemberReader()
        try:
            for b in range(start_batch, nb):
                batch = _Batch(b)
                for i in order[b * B:(b + 1) * B]:
                    i = int(i)
                    row = self._guarded(lambda: self._row(i, reader, epoch), self.index.where(i),
                                        batch.stats, batch.messages)
                    if row is not None:
                        batch.rows.append(row)
                if not _put(out, batch, stop):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            _put(out, e, stop)
        finally:
            reader.close()

    # -- DALI -----------------------------------------------------------------------------------
    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        res = self.resolution

        # Depth 1: each schedule_run() runs exactly the batch fed before it; _iter_epoch keeps
        # prefetch_queue_depth of them in flight, so each output belongs to a known plan batch.
        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads,
                      device_id=self.device_id, prefetch_queue_depth=1, exec_dynamic=True,
                      enable_conditionals=True)
        def pipe():
            enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, batch=True)
            dec = fn.decoders.image(enc, device="cpu" if self.device_id is None else "mixed",
                                    output_type=types.RGB)
            # An image already `res` on its shorter side is only cropped: resampling it cost more
            # than its decode. Linear with antialiasing (a triangle filter when shrinking) is the
            # release's preprocessing (torchvision Resize, bilinear, on PIL images).
            if fn.reductions.min(fn.peek_image_shape(enc)[0:2]) != res:
                dec = fn.resize(dec, resize_shorter=res, interp_type=types.INTERP_LINEAR, antialias=True)
            return fn.crop_mirror_normalize(dec, crop=(res, res), crop_pos_x=0.5, crop_pos_y=0.5,
                                            mean=[127.5] * 3, std=[127.5] * 3, dtype=types.FLOAT,
                                            output_layout="CHW")

        p = pipe()
        p.build()
        return p

    def _dali_to_torch(self, tl) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = tl.as_tensor()
        out = torch.empty(tuple(t.shape()), dtype=torch.float32, device=self._device)
        if self.device_id is not None:
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self._device))
        else:
            feed_ndarray(t, out)
        return out

    # -- consumer -------------------------------------------------------------------------------
    def _assemble(self, batch: _Batch) -> tuple[dict, bool]:
        """The batch dict, with DALI's images put back in plan order; (batch, DALI failed)."""
        dali, failed = None, False
        if batch.pipe is not None:
            try:
                (out,) = batch.pipe.outputs()
                dali = self._dali_to_torch(out)
            except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError subclasses
                batch.error = _reason(e)
        rows = batch.rows
        if batch.error is not None:
            failed = True
            batch.stats["dali_batch_fallback"] += 1
            batch.messages.insert(0, f"DALI failed on batch {batch.index} of epoch {self.epoch} "
                                  f"({batch.error}); decoded it with PIL")
            decoded = []
            for key, where, caption, rewards, image in rows:
                if isinstance(image, bytes):
                    try:
                        image = self._pil_chw(image, where)
                    except SampleError as e:
                        batch.stats[e.reason] += 1
                        batch.messages.append(f"{e} (skipped; DALI decoder failed on this batch)")
                        continue
                decoded.append((key, where, caption, rewards, image))
            rows = decoded
        from_pil = [j for j, r in enumerate(rows) if not isinstance(r[4], bytes)]
        if dali is not None and not from_pil:
            images = dali
        else:
            res = self.resolution
            images = torch.empty((len(rows), 3, res, res), dtype=torch.float32, device=self._device)
            if from_pil:
                pil = torch.from_numpy(np.stack([rows[j][4] for j in from_pil]))
                images[from_pil] = pil.to(self._device).float().div_(127.5).sub_(1.0)
            if dali is not None:
                images[[j for j, r in enumerate(rows) if isinstance(r[4], bytes)]] = dali
        rewards = (torch.from_numpy(np.stack([r[3] for r in rows])) if rows
                   else torch.zeros((0, len(self.reward_keys))))
        return {"image": images, "keys": [r[0] for r in rows], "where": [r[1] for r in rows],
                "text": [r[2] for r in rows], "rewards": rewards}, failed

    def _iter_epoch(self, order, start_batch):
        nb = num_batches(len(order), self.batch_size)
        depth = self.prefetch_queue_depth
        ready: queue.Queue = queue.Queue(maxsize=depth)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, name="miro-dali-reader", daemon=True,
                                    args=(order, start_batch, nb, self.epoch, ready, stop))
        producer.start()
        pipe, fails = None, 0  # the current pipeline and its consecutive failed batches
        inflight: deque = deque()
        try:
            for b in range(start_batch, nb):
                batch = ready.get()
                if isinstance(batch, BaseException):
                    raise batch
                if batch.encoded:
                    if pipe is None:
                        pipe, fails = self._build(), 0
                    try:
                        pipe.feed_input("encoded", [np.frombuffer(x, np.uint8) for x in batch.encoded])
                        pipe.schedule_run()
                        batch.pipe = pipe
                    except Exception as e:  # noqa: BLE001 - a pipeline that refuses input is broken
                        batch.error, pipe = _reason(e), None
                inflight.append(batch)
                while len(inflight) > (depth if b + 1 < nb else 0):  # the last batch drains the rest
                    batch = inflight.popleft()
                    out, failed = self._assemble(batch)
                    if batch.pipe is not None and batch.pipe is pipe:
                        # one failure is the data's; two in a row and the pipeline may be broken
                        fails = fails + 1 if failed else 0
                        if fails == 2:
                            pipe = None
                    yield batch.index, out, batch.stats, batch.messages
        finally:
            stop.set()
            producer.join()
            # Drop the pipelines now, even if a traceback keeps this frame: one left to the garbage
            # collector may be finalised in a forked DataLoader worker, where DALI's destructor hangs.
            pipe = batch = None
            inflight.clear()
