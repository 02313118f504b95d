"""Small builders for test shards (used by tests/test_data*.py; no test framework needed)."""
from __future__ import annotations

import io
import tarfile

import numpy as np
from PIL import Image

from .format import reward_entry


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def solid_jpeg(rgb, size=(48, 40)) -> bytes:
    return encode(Image.new("RGB", size, tuple(int(c) for c in rgb)), "JPEG", quality=95, subsampling=0)


def rewards_json(i: int, keys=("a", "b"), num_bins: int = 64) -> dict:
    return {"rewards": {k: reward_entry(float(i + j), (i * 7 + j * 3) % num_bins, num_bins)
                        for j, k in enumerate(keys)}}


def write_raw_tar(path: str, members) -> None:
    """A tar with exactly these (name, bytes) members, in order (no index file)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def simple_dataset(out_dir: str, n: int, shard_size: int, keys=("a", "b"), seed: int = 0,
                   latents: bool = False, text_emb: bool = False, size=(48, 40)) -> list:
    """n samples with noisy images, captions "caption <i>", rewards; optional npy members."""
    from .writer import ShardWriter

    rng = np.random.default_rng(seed)
    with ShardWriter(out_dir, max_samples=shard_size) as w:
        for i in range(n):
            a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            m = {"jpg": encode(Image.fromarray(a), "JPEG", quality=90), "txt": f"caption {i}",
                 "json": rewards_json(i, keys)}
            if latents:
                m["latent_mean.npy"] = np.full((4, 4, 4), i, np.float16)
                m["latent_std.npy"] = np.full((4, 4, 4), 0.5, np.float16)
            if text_emb:
                L = 3 + i % 5
                m["text_emb.npy"] = np.full((L, 8), i, np.float16)
                if i % 2:
                    m["text_mask.npy"] = np.ones(L, np.uint8)
            w.write(f"s{i:06d}", m)
    return w.paths


def png16(a: np.ndarray) -> bytes:
    """A 16-bit PNG (gray [H,W], RGB [H,W,3] or RGBA [H,W,4] uint16), written by hand since PIL
    cannot write 16-bit colour PNGs."""
    import struct
    import zlib

    if a.ndim == 2:
        a = a[..., None]
    h, w, c = a.shape
    colour_type = {1: 0, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
