"""The encode stage: VAE posterior and text-encoder embeddings of every sample, precomputed once.

For each source shard ``STEM.tar`` it writes ``STEM.encoded.tar`` (plus its DALI index): per sample
key, the members the latent-mode loader reads

``latent_mean.npy``, ``latent_std.npy``   fp16 ``[C, h, w]``: the autoencoder's posterior mean and
                                          std (raw units) of the image, centre-cropped to the largest
                                          square and resized to ``autoencoder.image_size`` as the
                                          release did (torchvision CenterCrop + Resize, bilinear)
``text_emb.npy``                          fp16 ``[n, D]``: the text encoder's last hidden state for the
                                          ``txt`` caption, trimmed to its n <= ``data.max_text_len``
                                          tokens (the release trains on up to 256)
``text_emb_<name>.npy``                   the same for the caption ``name`` (json or caption sidecar)

The encoders, sizes and caption sources come from the training config (``autoencoder``,
``text_encoder``, ``data.max_text_len``, ``data.caption_source``), so what is precomputed is what
that config trains on. A sample whose image cannot be decoded is left out (counted by reason); a
sample lacking one caption source gets no embedding for it. On CUDA the encoders run under bf16
autocast (as the release); outputs are stored in fp16.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

from miro_scale import shard_jobs

from .decode import decode_image
from .format import LATENT_MEAN_EXT, LATENT_STD_EXT, SampleError, clean_caption, image_ext
from .loader import text_emb_ext
from .sidecars import (count_index_problems, iter_members, open_source_shard, read_captions, sample_captions,
                       sample_meta)
from .tario import write_index_file
from .writer import TarSampleWriter

STAGE = "encode"
OUTPUT = "{stem}.encoded.tar"
INDEX = "{stem}.encoded.idx"  # its DALI index, so the shard stage need not scan it (none if a key has a space)


def vae_input(im, size: int) -> torch.Tensor:
    """The release's VAE preprocessing: the largest centred square, resized to ``size`` (bilinear,
    antialiased), as float [3, size, size] in [-1, 1]."""
    import torchvision.transforms.functional as TF

    side = min(im.size)
    im = TF.resize(TF.center_crop(im, [side, side]), size)
    return TF.to_tensor(im).mul_(2).sub_(1)


@dataclass
class EncodeSettings:
    caption_sources: List[str]
    image_size: int
    max_text_len: int
    batch_size: int = 64
    num_workers: int = 4
    chunk_size: int = 256
    precision: str = "bf16"  # autocast on CUDA


class ShardEncoder:
    def __init__(self, autoencoder, text_encoder, settings: EncodeSettings, device: torch.device):
        self.ae, self.te, self.s, self.device = autoencoder, text_encoder, settings, device
        self.pool = ThreadPoolExecutor(max(1, settings.num_workers))
        if device.type == "cuda" and settings.precision == "bf16":
            self.autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
        else:
            self.autocast = nullcontext

    def _prepare(self, stem: str, key: str, members: dict, captions: Optional[dict]):
        """(image tensor or None, {source: caption}, reasons): the reasons a caption source or the
        image (then the whole sample, and the reason is the last one) is unusable."""
        where = f"{stem}:{key}"
        reasons = []
        try:
            meta = sample_meta(members, where, captions)
        except SampleError as e:
            meta = sample_meta({}, where, captions)
            reasons.append(e.reason)
        found, errors = sample_captions(members, meta, where, self.s.caption_sources)
        reasons += [e.reason for e in errors.values()]
        ext = image_ext(members)
        image = None
        try:
            if ext is None:
                raise SampleError("missing_image", f"{where}: no image member")
            # a full decode, then vae_input's bilinear resize, as the release prepared VAE inputs
            image = vae_input(decode_image(members[ext], where), self.s.image_size)
        except SampleError as e:
            reasons.append(e.reason)
        except Exception:  # noqa: BLE001 - whatever else the decoder raises, the sample is out
            reasons.append("corrupt_image")
        return image, {k: clean_caption(v) for k, v in found.items()}, reasons

    @torch.no_grad()
    def _latents(self, images: List[torch.Tensor]):
        means, stds = [], []
        for b in range(0, len(images), self.s.batch_size):
            x = torch.stack(images[b:b + self.s.batch_size]).to(self.device)
            with self.autocast():
                mean, std = self.ae.encode(x)
            means.append(mean.float().cpu())
            stds.append(std.float().cpu())
        return torch.cat(means).half().numpy(), torch.cat(stds).half().numpy()

    @torch.no_grad()
    def _embeddings(self, texts: List[str]) -> List[np.ndarray]:
        """fp16 ``[n_i, D]`` per text, trimmed to its tokens; batches of similar length."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: List[Optional[np.ndarray]] = [None] * len(texts)
        for b in range(0, len(order), self.s.batch_size):
            idx = order[b:b + self.s.batch_size]
            with self.autocast():
                emb, mask = self.te.encode([texts[i] for i in idx])
            emb, n = emb.float().cpu(), mask.sum(1).tolist()
            for j, i in enumerate(idx):
                out[i] = emb[j, :n[j]].half().numpy()
        return out

    def encode_shard(self, task: shard_jobs.ShardTask, captions_dir: Optional[str]) -> dict:
        t0 = time.perf_counter()
        idx = open_source_shard(task.shard)
        captions = read_captions(captions_dir, task.stem, task.source)
        failures: Dict[str, int] = {}
        left_out: Dict[str, list] = {}  # samples without latents, by the reason their image failed
        n = written = 0
        timing = {"decode": 0.0, "autoencoder": 0.0, "text_encoder": 0.0}
        samples = iter_members(task.shard, idx)
        with open(task.path(OUTPUT), "wb") as f:
            writer = TarSampleWriter(f)
            while True:
                chunk = [kv for _, kv in zip(range(self.s.chunk_size), samples)]
                if not chunk:
                    break
                t = time.perf_counter()
                prepared = list(self.pool.map(lambda kv: self._prepare(task.stem, kv[0], kv[1],
                                                                       captions.get(kv[0])), chunk))
                timing["decode"] += time.perf_counter() - t
                n += len(chunk)
                keep = [j for j, (img, _, _) in enumerate(prepared) if img is not None]
                for (key, _), (img, _, reasons) in zip(chunk, prepared):
                    for r in dict.fromkeys(reasons):
                        failures[r] = failures.get(r, 0) + 1
                    if img is None:
                        left_out.setdefault(reasons[-1], []).append(key)
                t = time.perf_counter()
                mean, std = self._latents([prepared[j][0] for j in keep]) if keep else (None, None)
                timing["autoencoder"] += time.perf_counter() - t
                t = time.perf_counter()
                emb = {}
                for src in self.s.caption_sources:
                    has = [j for j in keep if src in prepared[j][1]]
                    emb[src] = dict(zip(has, self._embeddings([prepared[j][1][src] for j in has]))) if has else {}
                timing["text_encoder"] += time.perf_counter() - t
                for r, j in enumerate(keep):
                    members = {LATENT_MEAN_EXT: mean[r], LATENT_STD_EXT: std[r]}
                    for src in self.s.caption_sources:
                        if j in emb[src]:
                            members[text_emb_ext(src)] = emb[src][j]
                    writer.write(chunk[j][0], members)
                    written += 1
                if task.bar is not None:
                    task.bar.update(len(chunk))
            writer.close()
        write_index_file(str(task.path(INDEX)), writer.keys, writer.members)
        count_index_problems(idx, failures, left_out)
        timing["total"] = time.perf_counter() - t0
        return {"samples": n, "written": written, "failures": failures, "skipped_keys": left_out,
                "timing": timing}
