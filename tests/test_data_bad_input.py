"""Bad input: every case is decoded correctly or skipped with a warning naming shard and key, and
counted in the loader's stats; never a crash, never a silently wrong sample. Both loaders."""
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from miro_scale.data._testing import encode, png16, rewards_json, solid_jpeg, write_raw_tar
from miro_scale.data.dali_loader import DaliLoader, dali_available
from miro_scale.data.decode import decode_image
from miro_scale.data.format import SampleError
from miro_scale.data.loader import WebDatasetLoader

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

RES = 16
GOOD = solid_jpeg((200, 40, 40))


def _js(i=0, **extra):
    d = rewards_json(i, ("a",))
    d.update(extra)
    return json.dumps(d).encode()


# key -> (members, expected outcome). Outcome: an RGB triple the decoded image must show, or the
# stats reason it must be skipped under.
def _cases():
    g = GOOD
    trunc = g[: len(g) // 2]
    corrupt = bytearray(g)
    corrupt[2:40] = b"x" * 38
    cmyk = encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95)
    rgba = encode(Image.new("RGBA", (40, 30), (20, 200, 30, 0)), "PNG")
    p16 = encode(Image.fromarray(np.full((30, 40), 40000, np.uint16)), "PNG")
    gray = encode(Image.new("L", (40, 30), 90), "JPEG", quality=95)
    rgb16 = np.zeros((30, 40, 3), np.uint16)
    rgb16[...] = (65535, 30000, 1000)
    rgba16 = np.concatenate([rgb16, np.full((30, 40, 1), 20000, np.uint16)], axis=2)
    pal = encode(Image.new("RGB", (40, 30), (0, 0, 255)).convert("P"), "PNG")
    return {
        "good0": ([("jpg", g), ("txt", b"ok"), ("json", _js())], (200, 40, 40)),
        "corrupt": ([("jpg", bytes(corrupt)), ("txt", b"x"), ("json", _js())], "corrupt_image"),
        "truncjpg": ([("jpg", trunc), ("txt", b"x"), ("json", _js())], "corrupt_image"),
        "zerojpg": ([("jpg", b""), ("txt", b"x"), ("json", _js())], "empty_member"),
        "zerojson": ([("jpg", g), ("txt", b"x"), ("json", b"")], "empty_member"),
        "notxt": ([("jpg", g), ("json", _js())], "missing_txt"),
        "nojson": ([("jpg", g), ("txt", b"x")], "missing_json"),
        "noimage": ([("txt", b"x"), ("json", _js())], "missing_image"),
        "noreward": ([("jpg", g), ("txt", b"x"), ("json", json.dumps({"rewards": {"b": 1}}).encode())],
                     "missing_reward"),
        "badjson": ([("jpg", g), ("txt", b"x"), ("json", b"{not json")], "bad_json"),
        "gray": ([("jpg", gray), ("txt", b"x"), ("json", _js())], (90, 90, 90)),
        "cmyk": ([("jpg", cmyk), ("txt", b"x"), ("json", _js())], (255, 0, 0)),
        "rgba": ([("png", rgba), ("txt", b"x"), ("json", _js())], (20, 200, 30)),
        "png16": ([("png", p16), ("txt", b"x"), ("json", _js())], (156, 156, 156)),
        "rgb16": ([("png", png16(rgb16)), ("txt", b"x"), ("json", _js())], (255, 117, 4)),
        "rgba16": ([("png", png16(rgba16)), ("txt", b"x"), ("json", _js())], (255, 117, 4)),
        "palette": ([("png", pal), ("txt", b"x"), ("json", _js())], (0, 0, 255)),
        "good1": ([("jpg", g), ("txt", b"ok"), ("json", _js())], (200, 40, 40)),
    }


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    members = []
    for key, (mem, _) in _cases().items():
        members += [(f"{key}.{ext}", data) for ext, data in mem]
    write_raw_tar(str(d / "00000.tar"), members)
    # a truncated tar: 3 good samples, the third cut in the middle of its image
    good = []
    for i in range(3):
        good += [(f"t{i}.jpg", GOOD), (f"t{i}.txt", b"ok"), (f"t{i}.json", _js(i))]
    write_raw_tar(str(d / "00001.tar"), good)
    with tarfile.open(d / "00001.tar") as tf:
        cut = tf.getmember("t2.jpg").offset_data + 100
    with open(d / "00001.tar", "r+b") as f:
        f.truncate(cut)  # in the middle of t2's image
    # a zero-byte tar and a tar of garbage
    (d / "00002.tar").write_bytes(b"")
    (d / "00003.tar").write_bytes(os.urandom(3000))
    return str(d)


def _expected():
    cases = _cases()
    ok = {k: v for k, (_, v) in cases.items() if isinstance(v, tuple)}
    bad = {k: v for k, (_, v) in cases.items() if isinstance(v, str)}
    ok.update({"t0": (200, 40, 40), "t1": (200, 40, 40)})
    return ok, bad


def _loaders():
    out = [("torch0", lambda d: WebDatasetLoader(d, 4, resolution=RES, reward_keys=["a"], num_workers=0,
                                                  shuffle=False, drop_last=False)),
           ("torch2", lambda d: WebDatasetLoader(d, 3, resolution=RES, reward_keys=["a"], num_workers=2,
                                                  seed=1, drop_last=False))]
    if dali_available():
        out.append(("dali_cpu", lambda d: DaliLoader(d, 4, resolution=RES, reward_keys=["a"],
                                                      device_id=None, num_threads=1, shuffle=False,
                                                      drop_last=False)))
    return out


@pytest.mark.parametrize("name,make", _loaders(), ids=[n for n, _ in _loaders()])
def test_bad_inputs(bad_dir, name, make, caplog):
    ok, bad = _expected()
    caplog.set_level(logging.WARNING, logger="miro_scale.data")
    L = make(bad_dir)
    got = {}
    for b in L:
        assert b["image"].shape[1:] == (3, RES, RES)
        assert torch.isfinite(b["image"]).all()
        for k, img, txt in zip(b["keys"], b["image"], b["text"]):
            assert k not in got, f"{k} twice"
            got[k] = img
    assert set(got) == set(ok), f"{name}: got {sorted(got)}"
    for k, rgb in ok.items():
        want = torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1
        mean = got[k].mean(dim=(1, 2))
        assert torch.allclose(mean, want, atol=0.06), f"{name}: {k} decoded to {mean} not {want}"
    reasons = {}
    for k, r in bad.items():
        reasons[r] = reasons.get(r, 0) + 1
    reasons["truncated_sample"] = 1  # t2, cut by the truncated tar
    for r, n in reasons.items():
        assert L.stats[r] == n, f"{name}: stats[{r}]={L.stats[r]}, want {n}; stats={dict(L.stats)}"
    assert L.stats["truncated_shard"] == 3  # the cut tar, the empty file, the garbage file
    assert L.stats["samples"] == len(ok)
    text = caplog.text
    shard0 = os.path.join(bad_dir, "00000.tar")
    for k in bad:
        assert f"{shard0}:{k}" in text, f"{name}: no warning naming {shard0}:{k}"
    assert os.path.join(bad_dir, "00001.tar") + ":t2" in text
    if name == "dali_cpu":  # the probe keeps every bad image from DALI's decoder
        assert L.stats["dali_batch_fallback"] == 0


@pytest.fixture(scope="module")
def huge_jpeg():
    return encode(Image.new("L", (12000, 12000), 70), "JPEG", quality=80)


def test_huge_image_decoded_at_reduced_scale(huge_jpeg):
    big = huge_jpeg
    im = decode_image(big, "mem:huge", min_size=64)
    assert min(im.size) >= 64 and max(im.size) <= 12000 // 8 + 8  # DCT-scaled decode
    assert abs(np.asarray(im, np.float32).mean() - 70) < 2


def test_huge_image_in_loaders(tmp_path, huge_jpeg):
    big = huge_jpeg
    write_raw_tar(str(tmp_path / "00000.tar"), [("huge.jpg", big), ("huge.txt", b"x"),
                                                ("huge.json", _js())])
    loaders = [WebDatasetLoader(str(tmp_path), 2, resolution=RES, reward_keys=["a"], num_workers=0,
                                drop_last=False)]
    if dali_available():
        loaders.append(DaliLoader(str(tmp_path), 2, resolution=RES, reward_keys=["a"], num_threads=1,
                                  drop_last=False))
    for L in loaders:
        b = next(iter(L))
        assert b["keys"] == ["huge"]
        assert abs(b["image"].mean().item() - (70 / 127.5 - 1)) < 0.03


def test_pixel_limit_skips(tmp_path, caplog):
    png = encode(Image.new("RGB", (100, 100), (1, 2, 3)), "PNG")
    with pytest.raises(SampleError) as e:
        decode_image(png, "s.tar:k", max_pixels=5000)
    assert e.value.reason == "too_large" and "s.tar:k" in str(e.value)
    write_raw_tar(str(tmp_path / "00000.tar"), [("k.png", png), ("k.txt", b"x"), ("k.json", _js())])
    caplog.set_level(logging.WARNING, logger="miro_scale.data")
    L = WebDatasetLoader(str(tmp_path), 2, resolution=RES, reward_keys=["a"], num_workers=0,
                         drop_last=False, max_pixels=5000)
    assert list(L) == [] and L.stats["too_large"] == 1
    assert "00000.tar:k" in caplog.text


def test_decode_exif_rotation():
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = decode_image(encode(im, "JPEG", quality=95, exif=exif.tobytes()), "x")
    assert out.size == (20, 40)
    a = np.asarray(out, np.float32)
    assert a[:20].mean() > 200 and a[20:].mean() < 50  # white half now on top
