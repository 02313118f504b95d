"""DALI loader: ``fn.readers.webdataset`` + image decode, resize and crop/normalise on the GPU
("mixed" decoder) or, with ``device_id=None``, the same pipeline on the CPU.

It follows the same plan as :class:`miro_scale.data.loader.WebDatasetLoader` (same samples, same
order, same batches, same state): for the rest of this rank's epoch, each run of consecutive samples
from one shard becomes one ``paths``/``index_paths`` entry, whose DALI index file (written to a
temporary directory) lists exactly those samples in plan order; DALI reads them in sequence with
``pad_last_batch=True`` and the padded rows of the last batch are dropped, so nothing wraps into the
next epoch and nothing is duplicated. Each row's ``source_info`` (tar:offset:member) is checked
against the plan, so a mismatch fails loudly instead of mislabelling a sample.

A decoder error (corrupt or truncated image) fails a whole DALI batch: that batch is then decoded
with PIL (the bad samples are skipped with a warning naming shard and key and counted), and the
pipeline is rebuilt from the next batch. Captions and json (rewards) are parsed in Python.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter

import numpy as np
import torch

from .decode import DEFAULT_MAX_PIXELS, decode_image, resize_center_crop
from .format import IMAGE_EXTS, INDEX_VERSION, JSON_EXT, TEXT_EXT, SampleError, image_ext, split_member_name
from .loader import PlannedLoader
from .plan import num_batches
from .tario import MemberReader

_IMAGE_EXT_ARG = ";".join(IMAGE_EXTS)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class DaliLoader(PlannedLoader):
    """Args (besides :class:`miro_scale.data.loader.PlannedLoader`'s): ``device_id`` (CUDA device for
    the "mixed" decoder and GPU ops; None runs everything on the CPU), ``num_threads`` (DALI CPU
    threads), ``prefetch_queue_depth``, ``tmp_dir`` (where per-epoch index files go),
    ``max_pixels`` (for the PIL fallback). Only ``mode="image"``; precomputed latents go through
    WebDatasetLoader."""

    def __init__(self, shards, batch_size: int, *, device_id: int | None = None, num_threads: int = 4,
                 prefetch_queue_depth: int = 2, tmp_dir: str | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, **kw):
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
        self.prefetch_queue_depth = int(prefetch_queue_depth)
        self.tmp_dir = tmp_dir
        self.max_pixels = max_pixels

    # -- pipeline ------------------------------------------------------------------------------
    def _write_entries(self, ids: np.ndarray, d: str):
        """One (tar, index file) entry per run of consecutive samples from one shard."""
        di = self.index
        paths, idxs = [], []
        if len(ids) == 0:
            return paths, idxs
        sh = di.shard_of[ids]
        cuts = np.flatnonzero(np.diff(sh)) + 1
        for k, (a, b) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, len(ids)])):
            s = int(sh[a])
            shard_idx = di.indices[s]
            pos = di.pos_of[ids[a:b]]
            p = os.path.join(d, f"{k:07d}.idx")
            with open(p, "w") as f:
                lines = shard_idx.index_lines(pos)
                f.write(f"{INDEX_VERSION} {len(lines)}\n" + "\n".join(lines) + "\n")
            paths.append(os.path.abspath(di.shards[s]))
            idxs.append(p)
        return paths, idxs

    def _build(self, paths, idxs):
        from nvidia.dali import fn, pipeline_def, types

        res = self.resolution
        gpu = self.device_id is not None

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads,
                      device_id=self.device_id, prefetch_queue_depth=self.prefetch_queue_depth,
                      exec_dynamic=True)
        def pipe():
            img, txt, js = fn.readers.webdataset(
                paths=paths, index_paths=idxs, ext=[_IMAGE_EXT_ARG, TEXT_EXT, JSON_EXT],
                missing_component_behavior="empty", dtypes=[types.UINT8] * 3,
                random_shuffle=False, pad_last_batch=True, name="reader")
            info = fn.get_property(img, key="source_info")
            dec = fn.decoders.image(img, device="mixed" if gpu else "cpu", output_type=types.RGB)
            dec = fn.resize(dec, resize_shorter=res, interp_type=types.INTERP_CUBIC, antialias=True)
            out = fn.crop_mirror_normalize(dec, crop=(res, res), crop_pos_x=0.5, crop_pos_y=0.5,
                                           mean=[127.5] * 3, std=[127.5] * 3, dtype=types.FLOAT,
                                           output_layout="CHW")
            return out, txt, js, info

        p = pipe()
        p.build()
        return p

    def _dali_to_torch(self, tl) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = tl.as_tensor()
        dev = torch.device("cuda", self.device_id) if self.device_id is not None else torch.device("cpu")
        out = torch.empty(tuple(t.shape()), dtype=torch.float32, device=dev)
        if self.device_id is not None:
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(dev))
        else:
            feed_ndarray(t, out)
        return out

    # -- batches -------------------------------------------------------------------------------
    def _rows_to_batch(self, ids, images, txts, jsons, infos):
        """Parse text/json, check source_info, drop failed rows. ``images``: tensor [n, 3, H, W]
        (or None rows for the PIL path, handled by the caller)."""
        di = self.index
        stats: Counter = Counter()
        messages: list = []
        keep, keys, wheres, texts, rewards = [], [], [], [], []
        for r, i in enumerate(ids):
            i = int(i)
            where = di.where(i)
            if infos is not None:
                info = infos[r]
                member = info.rsplit(":", 1)[-1]
                if split_member_name(member)[0] != di.key(i):
                    raise RuntimeError(f"DALI returned {info} where the plan has {where}; "
                                       "the reader and the plan disagree")
            try:
                caption, rv = self._text_and_rewards(txts[r], jsons[r], where, i, self.epoch)
            except SampleError as e:
                stats[e.reason] += 1
                messages.append(f"{e} (skipped)")
                continue
            keep.append(r)
            keys.append(di.key(i))
            wheres.append(where)
            texts.append(caption)
            rewards.append(rv)
        return keep, keys, wheres, texts, rewards, stats, messages

    def _finish(self, images, keep, keys, wheres, texts, rewards):
        if len(keep) != images.shape[0]:
            images = images[torch.as_tensor(keep, dtype=torch.long, device=images.device)]
        rw = (torch.from_numpy(np.stack(rewards)) if rewards
              else torch.zeros((0, len(self.reward_keys))))
        return {"image": images, "keys": keys, "where": wheres, "text": texts, "rewards": rw}

    def _pil_batch(self, ids):
        """Fallback after a DALI decoder error: decode this batch with PIL, skipping bad images."""
        di = self.index
        reader = MemberReader()
        stats: Counter = Counter()
        messages: list = []
        imgs, ok_ids, txts, jsons = [], [], [], []
        try:
            for i in ids:
                i = int(i)
                mem = di.members(i)
                path = di.shards[di.shard_of[i]]
                where = di.where(i)
                get = (lambda ext: reader.read(path, mem[ext][0], mem[ext][1]) if ext in mem else None)
                try:
                    im = decode_image(get(image_ext(mem)), where, min_size=self.resolution,
                                      max_pixels=self.max_pixels)
                except SampleError as e:
                    stats[e.reason] += 1
                    messages.append(f"{e} (skipped; DALI decoder failed on this batch)")
                    continue
                imgs.append(resize_center_crop(im, self.resolution).transpose(2, 0, 1))
                ok_ids.append(i)
                txts.append(get(TEXT_EXT))
                jsons.append(get(JSON_EXT))
        finally:
            reader.close()
        keep, keys, wheres, texts, rewards, st2, m2 = self._rows_to_batch(ok_ids, None, txts, jsons, None)
        stats.update(st2)
        messages += m2
        res = self.resolution
        images = (torch.from_numpy(np.stack(imgs)).float().div_(127.5).sub_(1.0) if imgs
                  else torch.zeros((0, 3, res, res)))
        if self.device_id is not None:
            images = images.to(torch.device("cuda", self.device_id))
        return self._finish(images, keep, keys, wheres, texts, rewards), stats, messages

    def _iter_epoch(self, order, start_batch):
        B = self.batch_size
        nb = num_batches(len(order), B)
        b = start_batch
        while b < nb:
            d = tempfile.mkdtemp(prefix="miro_dali_idx_", dir=self.tmp_dir)
            pipe = None
            try:
                paths, idxs = self._write_entries(order[b * B:], d)
                pipe = self._build(paths, idxs)
                rebuild = False
                while b < nb and not rebuild:
                    ids = order[b * B:(b + 1) * B]
                    try:
                        out, txt, js, info = pipe.run()
                    except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError subclasses
                        batch, stats, messages = self._pil_batch(ids)
                        messages.insert(0, f"DALI failed on batch {b} of epoch {self.epoch} "
                                        f"({str(e).splitlines()[0][:200]}); decoded it with PIL")
                        stats["dali_batch_fallback"] += 1
                        yield b, batch, stats, messages
                        b += 1
                        rebuild = True
                        break
                    n = len(ids)
                    txts = [bytes(np.asarray(txt.at(r))) if np.asarray(txt.at(r)).size else None
                            for r in range(n)]
                    jsons = [bytes(np.asarray(js.at(r))) if np.asarray(js.at(r)).size else None
                             for r in range(n)]
                    infos = [bytes(np.asarray(info.at(r))).decode("utf-8", "replace") for r in range(n)]
                    images = self._dali_to_torch(out)[:n]
                    keep, keys, wheres, texts, rewards, stats, messages = self._rows_to_batch(
                        ids, images, txts, jsons, infos)
                    yield b, self._finish(images, keep, keys, wheres, texts, rewards), stats, messages
                    b += 1
            finally:
                del pipe
                shutil.rmtree(d, ignore_errors=True)
