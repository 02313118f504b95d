"""DALI loader on the CPU (device_id=None): same plan as the torch loader, exactly once over ranks,
no wrap-around duplicates, exact resume, bad images kept away from DALI's decoder; the header probe;
GPU test when CUDA is present."""
import collections
import gc
import io
import json
import logging
import os
import struct
import threading
import weakref
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from miro_scale.data._testing import encode, rewards_json, simple_dataset, write_raw_tar
from miro_scale.data.dali_loader import DaliLoader, dali_available
from miro_scale.data.decode import probe_image
from miro_scale.data.format import SampleError
from miro_scale.data.loader import WebDatasetLoader
from miro_scale.synthetic.world import generate

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    d = tmp_path_factory.mktemp("dali_ds")
    simple_dataset(str(d), 37, 8)
    return str(d)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("dali_world")
    generate(str(d), 48, 16, resolution=64, seed=5, progress=False)
    return str(d)


def keys_of(loader):
    return [k for b in loader for k in b["keys"]]


@needs_dali
def test_same_batches_as_torch_loader(world):
    kw = dict(resolution=32, seed=2, drop_last=False)
    T = WebDatasetLoader(world, 8, num_workers=0, **kw)
    D = DaliLoader(world, 8, num_threads=2, **kw)
    tb, db = list(T), list(D)
    assert [b["keys"] for b in tb] == [b["keys"] for b in db]
    assert [b["text"] for b in tb] == [b["text"] for b in db]
    x, y = torch.cat([b["image"] for b in tb]), torch.cat([b["image"] for b in db])
    assert x.shape == y.shape == (48, 3, 32, 32) and y.dtype == torch.float32 and y.device.type == "cpu"
    assert -1 <= y.min() and y.max() <= 1
    # DALI's resize does not bit-match PIL's; they agree to a few grey levels on average
    assert (x - y).abs().mean() < 0.04


@needs_dali
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_exactly_once_no_wraparound(ds, world_size, drop_last):
    B = 5  # 37 samples: the last batch of every rank is partial without drop_last
    seen = collections.Counter()
    per_rank = []
    for rank in range(world_size):
        D = DaliLoader(ds, B, resolution=16, reward_keys=["a", "b"], rank=rank, world_size=world_size,
                       num_threads=1, drop_last=drop_last, seed=4)
        T = WebDatasetLoader(ds, B, resolution=16, reward_keys=["a", "b"], rank=rank,
                             world_size=world_size, num_workers=0, drop_last=drop_last, seed=4)
        dk = keys_of(D)
        assert dk == keys_of(T)
        per_rank.append(len(dk))
        seen.update(dk)
        assert len(dk) == len(set(dk)), "DALI padded/wrapped a sample into the epoch"
    assert max(seen.values()) == 1
    if drop_last:
        assert len(set(per_rank)) == 1 and sum(per_rank) == 37 // world_size // B * B * world_size
    else:
        assert sum(per_rank) == 37


@needs_dali
def test_two_epochs_and_resume(ds):
    mk = lambda: DaliLoader(ds, 4, resolution=16, reward_keys=["a"], num_threads=1,  # noqa: E731
                            drop_last=False, seed=9)
    ref = mk()
    e0, e1 = [b["keys"] for b in ref], [b["keys"] for b in ref]
    assert sorted(sum(e0, [])) == sorted(sum(e1, [])) and e0 != e1
    L = mk()
    it = iter(L)
    got = [next(it)["keys"] for _ in range(4)]
    state = L.state_dict()
    del it
    R = mk()
    R.load_state_dict(state)
    got += [b["keys"] for b in R]
    got += [b["keys"] for b in R]
    assert got == e0 + e1
    # and the torch loader resumes from a DALI state (same plan)
    T = WebDatasetLoader(ds, 4, resolution=16, reward_keys=["a"], num_workers=0, drop_last=False, seed=9)
    T.load_state_dict(state)
    assert [b["keys"] for b in T] == e0[4:]


@needs_dali
def test_resumes_from_torch_loader_state(ds):
    kw = dict(resolution=16, reward_keys=["a"], drop_last=False, seed=9)
    T = WebDatasetLoader(ds, 4, num_workers=2, **kw)
    it = iter(T)
    head = [next(it)["keys"] for _ in range(3)]
    state = T.state_dict()
    del it
    D = DaliLoader(ds, 4, num_threads=1, **kw)
    D.load_state_dict(state)
    ref = [b["keys"] for b in WebDatasetLoader(ds, 4, num_workers=0, **kw)]
    assert head + [b["keys"] for b in D] == ref and D.epoch == 1


@needs_dali
def test_rewards_match_json(ds):
    D = DaliLoader(ds, 6, resolution=16, reward_keys=["b", "a"], num_threads=1, drop_last=False)
    for b in D:
        for k, r in zip(b["keys"], b["rewards"]):
            i = int(k[1:])
            assert r.tolist() == pytest.approx([((i * 7 + 3) % 64) / 63, ((i * 7) % 64) / 63])


@needs_dali
def test_refuses_latent_mode(ds):
    with pytest.raises(ValueError, match="latent"):
        DaliLoader(ds, 4, mode="latent")
    with pytest.raises(ValueError, match="text embeddings"):
        DaliLoader(ds, 4, text_embeddings=True)


@needs_dali
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_pipeline_matches_cpu(world):
    C = DaliLoader(world, 8, resolution=32, num_threads=2, drop_last=False)
    G = DaliLoader(world, 8, resolution=32, num_threads=2, drop_last=False, device_id=0)
    cb, gb = list(C), list(G)
    assert [b["keys"] for b in cb] == [b["keys"] for b in gb]
    x = torch.cat([b["image"] for b in cb])
    y = torch.cat([b["image"].cpu() for b in gb])
    assert gb[0]["image"].is_cuda
    assert (x - y).abs().mean() < 0.03  # the GPU decoder differs slightly from the CPU one


# -- bad images never reach DALI's decoder ---------------------------------------------------------

def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png(w: int, h: int, idat: bytes) -> bytes:
    """An 8-bit RGB PNG with this IHDR size and IDAT payload, whatever the payload holds."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def _smooth(seed: int, size=(48, 40)) -> Image.Image:
    """A smooth image (DALI's and PIL's resizers agree on it to a few grey levels)."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(-80, 80, 3) + rng.uniform(60, 190, 3)
    return Image.fromarray(np.broadcast_to(ramp, (h, w, 3)).clip(0, 255).astype(np.uint8))


def _noisy_jpeg(size=(96, 80)) -> bytes:
    a = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(a), "JPEG", quality=90)


def _exif_thumbnail_jpeg() -> tuple[bytes, int]:
    """A JPEG whose EXIF (APP1) carries a JPEG thumbnail, built by hand (PIL does not write
    thumbnails), and the offset just after the thumbnail's EOI."""
    thumb = encode(Image.new("RGB", (16, 12), (9, 99, 199)), "JPEG")
    ifd0 = struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 3, 1, 1) + struct.pack("<I", 26)
    ifd1 = (struct.pack("<H", 2) + struct.pack("<HHII", 0x0201, 4, 1, 56)  # JPEGInterchangeFormat
            + struct.pack("<HHII", 0x0202, 4, 1, len(thumb)) + struct.pack("<I", 0))
    payload = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd0 + ifd1 + thumb
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    main = _noisy_jpeg()
    return main[:2] + app1 + main[2:], 2 + len(app1)


GIF = encode(_smooth(7), "GIF")
TRUNCATED_JPEG = _noisy_jpeg()[:-3000]  # cut in the entropy-coded data
HUGE_PNG = _png(30000, 30000, zlib.compress(b"\x00" * 100))  # header only: the pixels are not there
GARBAGE_JPEG = b"\xff\xd8\xff" + b"not a jpeg at all " * 20


def _js(i):
    return json.dumps(rewards_json(i, ("a",))).encode()


@pytest.fixture(scope="module")
def bad_batch_dir(tmp_path_factory):
    """Batches of 6 (shuffle=False): good; the bad one; good PNG/WebP/JPEG."""
    images = [encode(_smooth(i), "JPEG", quality=95) for i in range(6)]
    images += [encode(_smooth(6), "JPEG", quality=95), GIF, TRUNCATED_JPEG, HUGE_PNG, GARBAGE_JPEG,
               encode(_smooth(8), "PNG")]
    images += [encode(_smooth(9 + i), fmt, quality=95) if fmt != "PNG" else encode(_smooth(9 + i), fmt)
               for i, fmt in enumerate(["PNG", "WEBP", "JPEG", "PNG", "WEBP", "JPEG"])]
    members = []
    for i, data in enumerate(images):  # every image named .jpg, whatever it holds
        members += [(f"k{i:02d}.jpg", data), (f"k{i:02d}.txt", f"caption {i}".encode()),
                    (f"k{i:02d}.json", _js(i))]
    d = tmp_path_factory.mktemp("dali_bad")
    write_raw_tar(str(d / "00000.tar"), members)
    return str(d)


def _mk_bad(d, cls, **kw):
    common = dict(resolution=24, reward_keys=["a"], shuffle=False, drop_last=False)
    if cls is WebDatasetLoader:
        return WebDatasetLoader(d, 6, num_workers=0, **common)
    return DaliLoader(d, 6, num_threads=1, **common, **kw)


@pytest.fixture
def builds(monkeypatch):
    """Weak references to the pipelines DaliLoader builds, with the garbage collector off: a
    pipeline must be freed when its epoch ends, since one finalised by the collector inside a forked
    DataLoader worker hangs there (DALI's destructor waits for threads the fork did not copy)."""
    refs = []
    real = DaliLoader._build

    def build(self):
        p = real(self)
        refs.append(weakref.ref(p))
        return p

    monkeypatch.setattr(DaliLoader, "_build", build)
    gc.disable()
    try:
        yield refs
    finally:
        gc.enable()


def _all_freed(refs) -> bool:
    return all(r() is None for r in refs)


@needs_dali
def test_bad_images_are_kept_from_dali(bad_batch_dir, caplog, builds):
    caplog.set_level(logging.WARNING, logger="miro_scale.data")
    T, D = _mk_bad(bad_batch_dir, WebDatasetLoader), _mk_bad(bad_batch_dir, DaliLoader)
    tb, db = list(T), list(D)
    assert [b["keys"] for b in db] == [b["keys"] for b in tb]
    assert db[1]["keys"] == ["k06", "k07", "k11"]  # the GIF named .jpg (k07) decoded by both
    # had any bad image reached DALI, the batch would have failed over to PIL
    assert D.stats["dali_batch_fallback"] == 0 and len(builds) == 1 and _all_freed(builds)
    for r, n in {"too_large": 1, "corrupt_image": 2, "samples": 15}.items():
        assert D.stats[r] == T.stats[r] == n, (r, dict(D.stats))
    for k in ("k08", "k09", "k10"):
        assert f"{os.path.join(bad_batch_dir, '00000.tar')}:{k}" in caplog.text
    x, y = torch.cat([b["image"] for b in tb]), torch.cat([b["image"] for b in db])
    assert y.shape == (15, 3, 24, 24) and y.dtype == torch.float32 and -1 <= y.min() and y.max() <= 1
    assert (x - y).abs().mean() < 0.04
    assert torch.equal(db[1]["image"][1], tb[1]["image"][1])  # the GIF went through PIL, not DALI
    assert not torch.equal(db[1]["image"][0], tb[1]["image"][0])  # a JPEG went through DALI
    assert [b["text"] for b in db] == [b["text"] for b in tb]
    assert all(torch.equal(p["rewards"], q["rewards"]) for p, q in zip(tb, db))


@needs_dali
def test_pixel_limit_as_torch_loader(tmp_path):
    """A JPEG over max_pixels is left to PIL, which decodes it at reduced DCT scale (as the torch
    loader does); a PNG over it is skipped by both."""
    members = []
    for k, data in (("bigjpg", encode(_smooth(0, (200, 160)), "JPEG", quality=95)),
                    ("bigpng", encode(_smooth(1, (100, 100)), "PNG")), ("small", encode(_smooth(2), "JPEG"))):
        members += [(f"{k}.jpg", data), (f"{k}.txt", b"x"), (f"{k}.json", _js(0))]
    write_raw_tar(str(tmp_path / "00000.tar"), members)
    kw = dict(resolution=16, reward_keys=["a"], shuffle=False, drop_last=False, max_pixels=5000)
    T = WebDatasetLoader(str(tmp_path), 3, num_workers=0, **kw)
    D = DaliLoader(str(tmp_path), 3, num_threads=1, **kw)
    tb, db = list(T), list(D)
    assert [b["keys"] for b in db] == [b["keys"] for b in tb] == [["bigjpg", "small"]]
    assert torch.equal(db[0]["image"][0], tb[0]["image"][0])
    assert D.stats["too_large"] == T.stats["too_large"] == 1 and D.stats["dali_batch_fallback"] == 0


@pytest.fixture(scope="module")
def dali_fails_dir(tmp_path_factory):
    """A PNG whose zlib data is damaged but whose chunks are intact: the probe passes it, DALI's
    decoder fails on it (so its whole batch goes to PIL), PIL rejects it."""
    raw = b"".join(b"\x00" + bytes(range(120)) for _ in range(30))
    z = bytearray(zlib.compress(raw))
    z[2:10] = b"\xff" * 8
    images = [encode(_smooth(i), "JPEG", quality=95) for i in range(30)]
    images[8] = _png(40, 30, bytes(z))
    members = []
    for i, data in enumerate(images):
        members += [(f"k{i:02d}.jpg", data), (f"k{i:02d}.txt", b"x"), (f"k{i:02d}.json", _js(i))]
    d = tmp_path_factory.mktemp("dali_fails")
    write_raw_tar(str(d / "00000.tar"), members)
    return str(d)


@needs_dali
def test_dali_failure_decodes_the_batch_with_pil(dali_fails_dir, builds):
    T, D = _mk_bad(dali_fails_dir, WebDatasetLoader), _mk_bad(dali_fails_dir, DaliLoader)
    assert probe_image(_png(40, 30, b"xx"), "x").dali_safe  # structure only: DALI gets it
    tb, db = list(T), list(D)
    assert [b["keys"] for b in db] == [b["keys"] for b in tb]
    assert "k08" not in db[1]["keys"] and len(db[1]["keys"]) == 5
    assert D.stats["dali_batch_fallback"] == 1 and D.stats["corrupt_image"] == 1
    assert torch.equal(db[1]["image"], tb[1]["image"])  # the failed batch: all PIL
    assert not any(torch.equal(db[b]["image"], tb[b]["image"]) for b in (0, 2, 3, 4))  # DALI
    assert len(builds) == 1  # the pipeline kept working after the error
    assert _all_freed(builds)


@needs_dali
def test_broken_pipeline_is_rebuilt(ds, builds, monkeypatch):
    """A pipeline whose outputs() keeps failing is replaced; every batch is still served, by PIL."""

    def broken_outputs(self, *a, **k):
        raise RuntimeError("Current pipeline object is no longer valid.")

    monkeypatch.setattr("nvidia.dali.pipeline.Pipeline.outputs", broken_outputs)
    kw = dict(resolution=16, reward_keys=["a"], drop_last=False, seed=3)
    D = DaliLoader(ds, 4, num_threads=1, prefetch_queue_depth=1, **kw)
    T = WebDatasetLoader(ds, 4, num_workers=0, **kw)
    db, tb = list(D), list(T)
    assert [b["keys"] for b in db] == [b["keys"] for b in tb]
    assert all(torch.equal(p["image"], q["image"]) for p, q in zip(db, tb))
    assert D.stats["dali_batch_fallback"] == len(db) == 10
    assert len(builds) > 1 and _all_freed(builds)


@needs_dali
def test_stopping_early_stops_the_reader(ds, builds):
    D = DaliLoader(ds, 4, resolution=16, num_threads=1, drop_last=False)
    it = iter(D)
    next(it)
    it.close()
    assert not any(t.name == "miro-dali-reader" for t in threading.enumerate())
    assert len(builds) == 1 and _all_freed(builds)


@needs_dali
def test_reader_error_reaches_the_caller(ds, builds, monkeypatch):
    """An unexpected error in the reader thread is raised by the loader (not a hang), and the
    pipeline is freed although the exception's traceback holds the loader's frames."""
    calls = []
    real = DaliLoader._guarded

    def guarded(load, where, stats, messages):
        calls.append(where)
        if len(calls) == 10:
            raise OSError("disk gone")
        return real(load, where, stats, messages)

    monkeypatch.setattr(DaliLoader, "_guarded", staticmethod(guarded))
    D = DaliLoader(ds, 4, resolution=16, num_threads=1, drop_last=False)
    got = []
    with pytest.raises(OSError, match="disk gone"):
        for b in D:
            got.append(b["keys"])
    assert len(got) < 3 and D.batch_in_epoch == len(got)
    assert not any(t.name == "miro-dali-reader" for t in threading.enumerate())
    assert len(builds) == 1 and _all_freed(builds)


# -- probe_image -----------------------------------------------------------------------------------

def test_probe_good_images():
    im = _smooth(0, (50, 30))
    for fmt, kw in (("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {}), ("WEBP", {}),
                    ("WEBP", {"lossless": True})):
        p = probe_image(encode(im, fmt, **kw), "x")
        assert p == (fmt.lower(), (50, 30), True), (fmt, kw, p)
    # an RGBA WebP with EXIF is an extended (VP8X) file: still DALI's
    assert probe_image(encode(im.convert("RGBA"), "WEBP", exif=b"Exif\x00\x00"), "x").dali_safe


def test_probe_not_for_dali_but_valid():
    assert probe_image(GIF, "x") == ("gif", (48, 40), False)  # a GIF named .jpg
    assert probe_image(encode(_smooth(0), "BMP"), "x") == ("bmp", (48, 40), False)
    assert probe_image(TRUNCATED_JPEG, "x") == ("jpeg", (96, 80), False)
    assert probe_image(encode(_smooth(0), "PNG")[:-12], "x") == ("png", (48, 40), False)  # no IEND
    assert probe_image(encode(_smooth(0), "WEBP")[:-5], "x") == ("webp", (48, 40), False)
    frames = [_smooth(0), _smooth(1)]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:])
    assert probe_image(buf.getvalue(), "x") == ("webp", (48, 40), False)  # animated
    arith = bytearray(encode(_smooth(0), "JPEG"))
    sof = arith.index(b"\xff\xc0")
    arith[sof + 1] = 0xC9  # arithmetic-coded frame header
    assert probe_image(bytes(arith), "x") == ("jpeg", (48, 40), False)


def test_probe_exif_thumbnail_does_not_count_as_the_end():
    full, thumb_end = _exif_thumbnail_jpeg()
    assert probe_image(full, "x") == ("jpeg", (96, 80), True)
    # cut in the main image's scan: the file still holds an FF D9 (the thumbnail's)
    cut = full[:-2000]
    assert b"\xff\xd9" in cut
    assert probe_image(cut, "x") == ("jpeg", (96, 80), False)
    # cut right after the thumbnail's EOI: ends in FF D9 like a complete file, but has no frame
    cut = full[:thumb_end]
    assert cut.endswith(b"\xff\xd9")
    with pytest.raises(SampleError) as e:
        probe_image(cut, "s.tar:k")
    assert e.value.reason == "corrupt_image" and "s.tar:k" in str(e.value)


@pytest.mark.parametrize("data,reason", [(b"", "empty_member"), (GARBAGE_JPEG, "corrupt_image"),
                                         (b"\x89PNG\r\n\x1a\n" + b"\x00" * 10, "corrupt_image"),
                                         (b"hello", "corrupt_image"), (HUGE_PNG, "too_large")])
def test_probe_rejects(data, reason):
    with pytest.raises(SampleError) as e:
        probe_image(data, "s.tar:k")
    assert e.value.reason == reason and "s.tar:k" in str(e.value)


def test_probe_reads_the_size_from_the_header_only():
    # the IDAT is not even valid zlib: reading it would fail as corrupt, not as too large
    with pytest.raises(SampleError) as e:
        probe_image(_png(30000, 30000, b"\x00" * 16), "x")
    assert e.value.reason == "too_large"
    with pytest.raises(SampleError) as e:
        probe_image(encode(_smooth(0, (100, 100)), "JPEG"), "x", max_pixels=5000)
    assert e.value.reason == "too_large"
    assert probe_image(encode(_smooth(0, (100, 50)), "JPEG"), "x", max_pixels=5000).dali_safe
