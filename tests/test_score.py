"""The shard scorer in one process: output format, statuses, caption sources, groups, resume."""
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "rewards"))

from miro_scale.rewards import registry  # noqa: E402
from miro_scale.data.plan import resolve_shards  # noqa: E402
from miro_scale.rewards.scores_io import read_scores  # noqa: E402
from miro_scale.rewards.scoring import ScoreConfig, parse_groups, run_scoring  # noqa: E402
from miro_scale.shard_jobs import assign as assign_shards  # noqa: E402

REWARDS = ["caption_alignment_score", "sharpness_score", "hpsv2_score", "aesthetic_score"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from shards import write_shards
    d = tmp_path_factory.mktemp("data")
    return write_shards(str(d), num_shards=3, per_shard=8)


def _cfg(shards, out, **kw):
    base = dict(shards=shards, rewards=list(REWARDS), out_dir=str(out), variant="tiny", num_workers=2,
                chunk_size=5, progress=False, rank=0, world_size=1)
    base.update(kw)
    return ScoreConfig(**base)


def test_expand_and_assign_shards(tmp_path):
    for i in range(5):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    got = resolve_shards(str(tmp_path / "{00000..00004}.tar"))
    assert [Path(g).name for g in got] == [f"{i:05d}.tar" for i in range(5)]
    assert resolve_shards([str(tmp_path / "0000[0-1].tar"), str(tmp_path / "00000.tar")]) == got[:2]
    assert resolve_shards(str(tmp_path)) == got  # a directory of shards, as the loaders take it
    assert resolve_shards(f"{got[3]},{got[1]}") == [got[3], got[1]]
    with pytest.raises(FileNotFoundError, match="00008.tar does not exist"):
        resolve_shards(str(tmp_path / "{00008..00009}.tar"))
    parts = [assign_shards(got, r, 2) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(got) and not set(parts[0]) & set(parts[1])
    with pytest.raises(ValueError, match="collide"):
        assign_shards(["a/x.tar", "b/x.tar"], 0, 1)
    assert parse_groups("aesthetic,hpsv2;sharpness", ["aesthetic_score", "hpsv2_score", "sharpness_score"]) == \
        [["aesthetic_score", "hpsv2_score"], ["sharpness_score"]]
    with pytest.raises(ValueError, match="exactly once"):
        parse_groups("aesthetic", ["aesthetic_score", "hpsv2_score"])


def test_score_rows_statuses_and_caption_sources(shards, tmp_path):
    summary = run_scoring(_cfg(shards, tmp_path / "s", caption_sources=["txt", "short"]))
    assert summary["shards_done"] == 3 and summary["counts"]["samples"] == 3 * 14
    t = pq.read_table(tmp_path / "s" / "00001.scores.parquet")
    cols = t.column_names
    assert cols[:3] == ["key", "status", "error"]
    assert {"hpsv2_score", "hpsv2_score@short", "caption_alignment_score@short", "sharpness_score",
            "aesthetic_score"} <= set(cols)
    assert "sharpness_score@short" not in cols  # image-only rewards are scored once
    rows = {k: i for i, k in enumerate(t.column("key").to_pylist())}
    st = t.column("status").to_pylist()
    err = t.column("error").to_pylist()
    val = lambda c, k: t.column(c).to_pylist()[rows[k]]  # noqa: E731
    # the broken samples have no json, hence no "short" caption either
    assert st[rows["s001_corrupt"]] == "missing_caption;corrupt_image"
    assert "s001_corrupt" in err[rows["s001_corrupt"]]
    assert st[rows["s001_empty"]] == "missing_caption;empty_member"
    assert st[rows["s001_noimage"]].startswith("missing_image") or "missing_image" in st[rows["s001_noimage"]]
    assert "missing_txt" in st[rows["s001_notxt"]] and "bad_txt" in st[rows["s001_badtxt"]]
    assert "empty_caption" in st[rows["s001_emptytxt"]]
    # an image without a usable caption still gets its image-only rewards
    assert np.isfinite(val("sharpness_score", "s001_notxt")) and np.isnan(val("hpsv2_score", "s001_notxt"))
    assert np.isnan(val("sharpness_score", "s001_corrupt"))
    good = [k for k in rows if not k.startswith("s001")]
    assert len(good) == 8 and all(st[rows[k]] == "ok" for k in good)
    assert all(np.isfinite(val(c, k)) for k in good for c in ("hpsv2_score", "hpsv2_score@short", "aesthetic_score"))
    # the synthetic world's true caption ("short") aligns at least as well as the (maybe mismatched) txt
    a_txt = np.array([val("caption_alignment_score", k) for k in good])
    a_short = np.array([val("caption_alignment_score@short", k) for k in good])
    assert a_short.mean() >= a_txt.mean() - 1e-6
    meta = json.loads(pq.read_schema(tmp_path / "s" / "00001.scores.parquet").metadata[b"miro_scoring"])
    assert meta["rewards"]["hpsv2_score"]["model_id"] == "random" and meta["captions"] == ["txt", "short"]
    rec = json.loads((tmp_path / "s" / "00001.score.done.json").read_text())
    assert rec["counts"]["samples"] == 14 and rec["counts"]["failures"]["corrupt_image"] == 1
    assert rec["input"]["name"] == "00001.tar" and rec["outputs"] == {
        "00001.scores.parquet": (tmp_path / "s" / "00001.scores.parquet").stat().st_size}
    assert summary["counts"]["rewards"]["hpsv2_score"]["images"] == 3 * 11
    assert summary["images_per_s"]["hpsv2_score"] > 0
    # features shared across captions give the same numbers as scoring each caption alone
    alone = run_scoring(_cfg(shards[1:2], tmp_path / "alone", caption_sources=["short"], rewards=["hpsv2_score"]))
    t2 = pq.read_table(tmp_path / "alone" / "00001.scores.parquet")
    a = np.array(t2.column("hpsv2_score").to_pylist(), dtype=float)
    b = np.array(t.column("hpsv2_score@short").to_pylist(), dtype=float)
    assert alone["counts"]["samples"] == 14 and np.allclose(a, b, atol=1e-5, equal_nan=True)


def test_groups_give_the_same_scores_as_one_pass(shards, tmp_path):
    run_scoring(_cfg(shards, tmp_path / "one"))
    run_scoring(_cfg(shards, tmp_path / "two", groups=[["hpsv2_score", "sharpness_score"],
                                                      ["caption_alignment_score", "aesthetic_score"]]))
    a = read_scores(str(tmp_path / "one"))
    b = read_scores(str(tmp_path / "two"))
    assert not (tmp_path / "two" / "_parts").exists() or not list((tmp_path / "two" / "_parts").iterdir())
    assert a.column("key").to_pylist() == b.column("key").to_pylist()
    assert a.column("status").to_pylist() == b.column("status").to_pylist()
    for c in REWARDS:
        assert np.allclose(np.array(a.column(c).to_pylist(), float), np.array(b.column(c).to_pylist(), float),
                           atol=1e-6, equal_nan=True), c
    meta = json.loads(pq.read_schema(tmp_path / "two" / "00000.scores.parquet").metadata[b"miro_scoring"])
    assert set(meta["rewards"]) == set(REWARDS)


def test_rerun_skips_finished_shards(shards, tmp_path):
    run_scoring(_cfg(shards[:2], tmp_path / "r"))
    m = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "r").glob("*.parquet")}
    s = run_scoring(_cfg(shards, tmp_path / "r"))
    assert s["this_run"]["samples"] == 14 and s["shards_done"] == 3
    for name, t in m.items():
        assert (tmp_path / "r" / name).stat().st_mtime_ns == t


def test_a_failing_reward_marks_rows_not_the_run(shards, tmp_path, monkeypatch):
    from miro_scale.synthetic.rewards import SharpnessReward

    def flaky(self, images, captions=None):
        if any(im.shape[0] == 30 for im in images):  # the 40x30 PNG of the broken samples
            raise RuntimeError("boom")
        return torch.zeros(len(images))
    monkeypatch.setattr(SharpnessReward, "score", flaky)
    run_scoring(_cfg(shards[:1], tmp_path / "f", rewards=["sharpness_score"]))
    t = pq.read_table(tmp_path / "f" / "00000.scores.parquet")
    st = dict(zip(t.column("key").to_pylist(), t.column("status").to_pylist()))
    assert "reward_error:sharpness_score" in st["s000_notxt"]
    assert sum("reward_error" in v for v in st.values()) == 3  # notxt, badtxt, emptytxt
    ok = [k for k, v in st.items() if v == "ok"]
    assert len(ok) == 8


def test_an_unreadable_shard_is_reported_and_retried(shards, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(shards[0], bad / "00000.tar")
    (bad / "00001.tar").write_bytes(b"this is not a tar file at all" * 40)
    s = run_scoring(_cfg([str(bad / "00000.tar"), str(bad / "00001.tar")], tmp_path / "o",
                         rewards=["sharpness_score"]))
    assert s["shards_done"] == 1 and list(s["shards_failed"]) == [str(bad / "00001.tar")]
    assert "not a tar" in s["shards_failed"][str(bad / "00001.tar")]
    err = json.loads((tmp_path / "o" / "00001.score.error.json").read_text())
    assert err["attempts"] == 1  # a whole-shard input error is not retried within the run
    assert not (tmp_path / "o" / "00001.scores.parquet").exists()
    shutil.copy(shards[1], bad / "00001.tar")  # fixed: the rerun scores it and clears the error
    s = run_scoring(_cfg([str(bad / "00000.tar"), str(bad / "00001.tar")], tmp_path / "o",
                         rewards=["sharpness_score"]))
    assert s["shards_done"] == 2 and not s["shards_failed"]
    assert not (tmp_path / "o" / "00001.score.error.json").exists()


def test_bf16_precision(shards, tmp_path):
    keys = ["aesthetic_score", "hpsv2_score", "pick_a_score_score", "image_reward_score", "vqa_score"]
    a = run_scoring(_cfg(shards[:1], tmp_path / "fp32", rewards=keys))
    b = run_scoring(_cfg(shards[:1], tmp_path / "bf16", rewards=keys, precision="bf16"))
    meta = json.loads(pq.read_schema(tmp_path / "bf16" / "00000.scores.parquet").metadata[b"miro_scoring"])
    assert meta["precision"] == dict.fromkeys(keys, "bf16")
    assert a["counts"]["ok"] == b["counts"]["ok"] == 8
    ta, tb = read_scores(str(tmp_path / "fp32")), read_scores(str(tmp_path / "bf16"))
    for k in keys:
        x = np.array(ta.column(k).to_pylist(), float)
        y = np.array(tb.column(k).to_pylist(), float)
        ok = np.isfinite(x)
        assert ok.sum() >= 8 and np.isfinite(y[ok]).all()
        assert np.allclose(x[ok], y[ok], rtol=0.1, atol=0.05 * (np.abs(x[ok]).max() + 1e-6)), k


def test_release_scale_caption_routing_and_empty_captions(shards, tmp_path):
    keys = ["aesthetic_score", "hpsv2_score", "image_reward_score", "pick_a_score_score"]
    raw = run_scoring(_cfg(shards[:1], tmp_path / "raw", rewards=keys, caption_sources=["txt", "short"]))
    rel = run_scoring(_cfg(shards[:1], tmp_path / "rel", rewards=keys, caption_sources=["short"],
                           caption_for={"image_reward": "short", "hpsv2": "txt", "pickscore": "short"},
                           scale="release", empty_captions="score"))
    assert raw["shards_done"] == rel["shards_done"] == 1
    t = pq.read_table(tmp_path / "raw" / "00000.scores.parquet")
    r = pq.read_table(tmp_path / "rel" / "00000.scores.parquet")
    assert r.column_names == ["key", "status", "error"] + keys  # one column per reward: no @source
    assert r.column("key").to_pylist() == t.column("key").to_pylist()
    col = lambda tab, c: np.array(tab.column(c).to_pylist(), dtype=float)  # noqa: E731
    ok = np.isfinite(col(t, "image_reward_score@short"))
    assert ok.sum() >= 8
    np.testing.assert_allclose(col(r, "aesthetic_score"), col(t, "aesthetic_score") / 10, rtol=1e-6)
    np.testing.assert_allclose(col(r, "image_reward_score")[ok], (col(t, "image_reward_score@short")[ok] + 2) / 4,
                               rtol=1e-6)
    np.testing.assert_allclose(col(r, "pick_a_score_score")[ok], col(t, "pick_a_score_score@short")[ok] / 100,
                               rtol=1e-6)
    # hpsv2 on txt, raw units; the whitespace-only txt is scored, not a failure
    keys_ = t.column("key").to_pylist()
    e = keys_.index("s000_emptytxt")
    assert np.isnan(col(t, "hpsv2_score")[e]) and "empty_caption" in t.column("status").to_pylist()[e]
    assert np.isfinite(col(r, "hpsv2_score")[e]) and "empty_caption" not in r.column("status").to_pylist()[e]
    good = np.isfinite(col(t, "hpsv2_score"))
    np.testing.assert_allclose(col(r, "hpsv2_score")[good], col(t, "hpsv2_score")[good], rtol=1e-6)
    meta = json.loads(r.schema.metadata[b"miro_scoring"])
    assert meta["scale"] == "release" and meta["caption_for"]["hpsv2_score"] == "txt"


def test_score_cli_as_released(shards, tmp_path):
    sys.path.insert(0, str(ROOT / "preprocessing"))
    import score

    out = tmp_path / "cli"
    rc = score.main(["--shards", shards[0], "--rewards", "hpsv2,sharpness,vqa", "--variant", "tiny", "--as-released",
                     "--num-workers", "1", "--no-progress", "--out", str(out)])
    assert rc == 0
    meta = json.loads(pq.read_schema(out / "00000.scores.parquet").metadata[b"miro_scoring"])
    assert meta["caption_for"] == {"hpsv2_score": "short", "vqa_score": "long"} and meta["scale"] == "release"
    assert meta["captions"] == ["short", "long"] and meta["precision"]["vqa_score"] == "fp32"
    assert meta["rewards"]["vqa_score"]["view"] == "clip336_padmean_jpeg75"


def test_vqascore_as_released_inputs():
    from PIL import Image

    from miro_scale.rewards.vqascore import release_caption
    assert release_caption("```python\nA <b>red</b> circle ```") == "A red circle"
    r = registry.build_reward("vqa", "tiny", as_released=True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (4, 6, 3), dtype=np.uint8)).resize((60, 40))
    plain = registry.build_reward("vqa", "tiny")
    a, b = r.view.one(img), plain.view.one(img)
    assert a.shape == b.shape and 0 < (a - b).abs().mean() < 0.2  # the JPEG round trip, nothing else
    feats = plain.encode_images(torch.stack([b, b]))
    assert torch.allclose(r.score_features(feats, ["```A <i>red</i> circle```", "a red circle"])[0],
                          plain.score_features(feats, ["A red circle", "a red circle"])[0])
