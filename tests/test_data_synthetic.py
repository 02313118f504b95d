"""Synthetic shapes world: determinism, GenEval category coverage, controlled mismatch and
degradation shares, scene graph consistent with the pixels, CLI."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from miro_scale.synthetic import world as sw
from miro_scale.data.tario import iter_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def samples():
    return [sw.make_sample(i, seed=3, resolution=64) for i in range(300)]


def test_deterministic_and_seeded():
    a = sw.make_sample(17, seed=1)
    assert a == sw.make_sample(17, seed=1)
    assert a[1]["jpg"] != sw.make_sample(17, seed=2)[1]["jpg"]
    assert a[0] == "000000017"


def test_generate_independent_of_sharding_and_workers(tmp_path):
    e1 = sw.generate(str(tmp_path / "a"), 30, 10, resolution=32, seed=4, workers=1, progress=False)
    e2 = sw.generate(str(tmp_path / "b"), 30, 7, resolution=32, seed=4, workers=2, progress=False)
    assert [e["num_samples"] for e in e1] == [10, 10, 10]
    assert [e["num_samples"] for e in e2] == [7, 7, 7, 7, 2]

    def all_samples(d):
        out = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".tar"):
                out.update(dict(iter_samples(os.path.join(d, f))))
        return out

    assert all_samples(tmp_path / "a") == all_samples(tmp_path / "b")


def test_categories_and_rates(samples):
    metas = [m["json"] for _, m in samples]
    tags = {m["tag"] for m in metas}
    assert tags == set(sw.TAGS)
    n = len(metas)
    mis = sum(m["mismatch"] is not None for m in metas) / n
    deg = sum(bool(m["corruption"]) for m in metas) / n
    assert abs(mis - 0.25) < 0.08 and abs(deg - 0.3) < 0.08
    assert {m["mismatch"]["type"] for m in metas if m["mismatch"]} == {"color", "count", "position", "object"}
    assert {m["corruption"][0]["type"] for m in metas if m["corruption"]} == set(sw.DEGRADATIONS)
    none = [sw.make_sample(i, seed=0, mismatch_rate=0.0, degrade_rate=0.0)[1]["json"] for i in range(40)]
    assert all(m["caption_matches"] and not m["corruption"] for m in none)


def test_captions_follow_scene(samples):
    colour_words = set(sw.COLOURS)
    for key, m in samples:
        meta, txt = m["json"], m["txt"]
        scene = meta["scene"]
        assert txt == meta["caption"]
        true = sw.caption_for(meta["tag"], scene)
        assert meta["captions"]["short"] == true
        if meta["caption_matches"]:
            assert txt == true
        else:
            assert txt != true and meta["mismatch"]["true_caption"] == true
        assert txt.startswith("a photo of ")
        objs = scene["objects"]
        if meta["tag"] == "counting":
            assert len(objs) in (2, 3, 4) and len({o["shape"] for o in objs}) == 1
            if meta["caption_matches"]:
                assert sw.NUMBER_WORDS[len(objs)] in txt
        if meta["tag"] in ("colors", "color_attr") and meta["caption_matches"]:
            assert all(o["color"] in txt for o in objs)
        if meta["tag"] in ("single_object", "two_object", "counting", "position"):
            assert not colour_words & set(txt.split())
        if meta["tag"] == "position":
            r = scene["relations"][0]
            s, o = objs[r["subject"]], objs[r["object"]]
            assert sw._relation_holds(r["relation"], (s["cx"], s["cy"]), (o["cx"], o["cy"]), 0.1)
            if meta["caption_matches"]:
                assert r["relation"] in txt


def test_pixels_match_scene_graph(samples):
    checked = 0
    for key, m in samples:
        meta = m["json"]
        if meta["corruption"]:
            continue
        im = np.asarray(Image.open(io.BytesIO(m["jpg"])).convert("RGB"), np.float32)
        res = im.shape[0]
        assert im.shape == (64, 64, 3) and meta["width"] == meta["height"] == 64
        for o in meta["scene"]["objects"]:
            if o["size"] * res < 12 or o["shape"] in ("rectangle", "ellipse", "star"):
                continue  # thin or spiky shapes: the centre pixel may be antialiased
            y, x = int(o["cy"] * res), int(o["cx"] * res)
            px = im[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0)
            assert np.abs(px - np.array(o["rgb"])).max() < 35, (key, o, px)
            checked += 1
        bg = meta["scene"]["background"]
        if bg["kind"] == "flat":
            assert np.abs(im[0, 0] - np.array(bg["rgb"])).max() < 12
    assert checked > 100


@pytest.mark.parametrize("res", [32, 128])
def test_resolutions(res):
    key, m = sw.make_sample(0, seed=0, resolution=res)
    im = Image.open(io.BytesIO(m["jpg"]))
    assert im.size == (res, res)
    key, m = sw.make_sample(1, seed=0, resolution=res, image_format="png")
    assert Image.open(io.BytesIO(m["png"])).size == (res, res)


def test_json_is_img2dataset_like(samples):
    meta = samples[0][1]["json"]
    for f in ("key", "status", "caption", "url", "width", "height", "original_width", "original_height",
              "sha256"):
        assert f in meta
    json.dumps(meta, allow_nan=False)


def test_cli(tmp_path):
    out = tmp_path / "w"
    r = subprocess.run([sys.executable, "-m", "miro_scale.synthetic.world", "--out", str(out),
                        "--num-samples", "20", "--shard-size", "8", "--resolution", "32", "--seed", "0",
                        "--workers", "1"], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "manifest.json").read_text())
    assert man["num_samples"] == 20 and len(man["shards"]) == 3
    assert man["synthetic_world"]["resolution"] == 32
    assert (out / "00000.idx").exists()


def test_generate_resumes_and_skips_done_shards(tmp_path):
    d = str(tmp_path / "w")
    sw.generate(d, 20, 8, resolution=32, seed=1, progress=False)
    t0 = {f: os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".tar")}
    os.remove(os.path.join(d, "00001.tar"))  # as if interrupted
    entries = sw.generate(d, 20, 8, resolution=32, seed=1, progress=False)
    assert [e["num_samples"] for e in entries] == [8, 8, 4]
    assert os.path.getmtime(os.path.join(d, "00000.tar")) == t0["00000.tar"]  # kept
    ref = str(tmp_path / "ref")
    sw.generate(ref, 20, 8, resolution=32, seed=1, progress=False)
    for f in ("00000.tar", "00001.tar", "00002.tar"):
        assert open(os.path.join(d, f), "rb").read() == open(os.path.join(ref, f), "rb").read()
    with pytest.raises(ValueError, match="settings"):
        sw.generate(d, 20, 8, resolution=64, seed=1, progress=False)
    assert sw.ensure_world(d, 20, resolution=32, seed=1, shard_size=8, workers=1, progress=False) == d
