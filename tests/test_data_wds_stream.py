"""Streaming loader on the webdataset package: exactly once over ranks x workers, seeded epochs,
resume, bad input."""
import collections
import glob
import json
import logging
import os
import tarfile

import pytest
import torch

from miro_scale.data._testing import rewards_json, simple_dataset, solid_jpeg, write_raw_tar
from miro_scale.data.loader import device_batch

wds_stream = pytest.importorskip("miro_scale.data.wds_stream")
WdsStreamLoader = wds_stream.WdsStreamLoader

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


@pytest.fixture(scope="module")
def urls(tmp_path_factory):
    d = tmp_path_factory.mktemp("wds")
    simple_dataset(str(d), 48, 6)  # 8 shards of 6
    return sorted(glob.glob(os.path.join(str(d), "*.tar")))


def keys_of(loader):
    return [k for b in loader for k in b["keys"]]


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 1)])
def test_exactly_once(urls, world, workers):
    seen = collections.Counter()
    for rank in range(world):
        L = WdsStreamLoader(urls, 4, resolution=16, reward_keys=["a"], rank=rank, world_size=world,
                            num_workers=workers, seed=1, shuffle_buffer=8)
        ks = keys_of(L)
        seen.update(ks)
    assert sum(seen.values()) == 48 and max(seen.values()) == 1


def test_epochs_seeded(urls):
    L = WdsStreamLoader(urls, 4, resolution=16, num_workers=0, seed=3, shuffle_buffer=10)
    e0, e1 = keys_of(L), keys_of(L)
    assert sorted(e0) == sorted(e1) and e0 != e1
    L2 = WdsStreamLoader(urls, 4, resolution=16, num_workers=0, seed=3, shuffle_buffer=10)
    assert keys_of(L2) == e0


@pytest.mark.parametrize("workers,stop", [(0, 5), (2, 4), (2, 5)])
def test_resume_exact(urls, workers, stop):
    mk = lambda: WdsStreamLoader(urls, 4, resolution=16, num_workers=workers, seed=2,  # noqa: E731
                                 shuffle_buffer=6)
    ref = [b["keys"] for b in mk()]
    L = mk()
    it = iter(L)
    got = [next(it)["keys"] for _ in range(stop)]
    st = L.state_dict()
    del it
    R = mk()
    R.load_state_dict(st)
    got += [b["keys"] for b in R]
    assert got == ref
    with pytest.raises(ValueError, match="num_workers"):
        WdsStreamLoader(urls, 4, num_workers=workers + 1, seed=2, shuffle_buffer=6).load_state_dict(st)


def test_bad_input_streaming(tmp_path, caplog):
    js = json.dumps(rewards_json(0, ("a",))).encode()
    g = solid_jpeg((10, 200, 10))
    bad = bytearray(g)
    bad[2:40] = b"x" * 38
    write_raw_tar(str(tmp_path / "a.tar"), [
        ("ok.jpg", g), ("ok.txt", b"x"), ("ok.json", js),
        ("corrupt.jpg", bytes(bad)), ("corrupt.txt", b"x"), ("corrupt.json", js),
        ("nojson.jpg", g), ("nojson.txt", b"x"),
        ("noreward.jpg", g), ("noreward.txt", b"x"), ("noreward.json", b'{"rewards": {}}'),
        ("empty.jpg", b""), ("empty.txt", b"x"), ("empty.json", js)])
    write_raw_tar(str(tmp_path / "b.tar"), [(f"t{i}.{e}", d) for i in range(3)
                                            for e, d in (("jpg", g), ("txt", b"x"), ("json", js))])
    with tarfile.open(tmp_path / "b.tar") as tf:
        cut = tf.getmember("t2.jpg").offset_data + 50
    with open(tmp_path / "b.tar", "r+b") as f:
        f.truncate(cut)
    caplog.set_level(logging.WARNING, logger="miro_scale.data")
    L = WdsStreamLoader([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], 4, resolution=16,
                        reward_keys=["a"], num_workers=0, shuffle=False)
    got = keys_of(L)
    assert sorted(got) == ["ok", "t0", "t1"]
    for r in ("corrupt_image", "missing_json", "missing_reward", "empty_member", "stream_error"):
        assert L.stats[r] >= 1, (r, dict(L.stats))
    assert "a.tar:corrupt" in caplog.text and "a.tar:nojson" in caplog.text


def test_latents_stream(tmp_path):
    simple_dataset(str(tmp_path), 10, 5, latents=True, text_emb=True)
    L = WdsStreamLoader(sorted(glob.glob(str(tmp_path / "*.tar"))), 4, mode="latent",
                        latent_std=False, text_embeddings=True, max_text_len=8, num_workers=0)
    host = next(iter(L))
    assert host["latents"].dtype == host["text_embeddings"].dtype == torch.float16  # as stored
    b = device_batch(host, "cpu", max_text_len=8)
    assert b["latents"].shape[1:] == (4, 4, 4) and b["text_embeddings"].shape[1:] == (8, 8)
    assert b["text_mask"].dtype == torch.bool
