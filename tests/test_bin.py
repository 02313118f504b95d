"""Calibration and binning: strategies, ties, constant/empty rewards, missing policies, bins.json, CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from miro_scale.rewards import binning
from miro_scale.rewards.binning import apply_bins, compute_edges, fit_bins, load_bins, save_bins

ROOT = Path(__file__).resolve().parents[1]


def _table(**cols):
    n = len(next(iter(cols.values())))
    base = {"key": [f"k{i:05d}" for i in range(n)], "status": ["ok"] * n, "error": [None] * n}
    return pa.table({**base, **{k: pa.array(np.asarray(v, np.float32)) for k, v in cols.items()}})


def test_quantile_bins_are_equal_population():
    x = np.random.default_rng(0).normal(size=20000)
    rb = fit_bins(_table(r=x), num_bins=64, strategy="quantile")["r"]
    assert rb.num_bins == 64 and len(rb.edges) == 63
    counts = np.bincount(rb.assign(x), minlength=64)
    assert counts.min() >= 20000 / 64 - 2 and counts.max() <= 20000 / 64 + 2
    v = rb.value(rb.assign(x))
    assert v.min() == 0.0 and v.max() == 1.0
    assert np.allclose(np.unique(v), np.arange(64) / 63)


def test_refined_splits_the_top_bins():
    x = np.random.default_rng(1).uniform(size=72_000)
    rb = fit_bins(_table(r=x), num_bins=64, strategy="refined", refine_last=8, refine_factor=2)["r"]
    assert rb.num_bins == 56 + 16 and len(rb.edges) == 71
    counts = np.bincount(rb.assign(x), minlength=72)
    assert abs(counts[:56].mean() - 72_000 / 64) < 5          # ordinary quantile bins
    assert abs(counts[56:].mean() - 72_000 / 128) < 5         # the top 8/64 split in two each
    assert rb.value(np.array([71]))[0] == 1.0


def test_uniform_bins_are_equal_width():
    x = np.linspace(0, 10, 1001)
    rb = fit_bins(_table(r=x), num_bins=10, strategy="uniform")["r"]
    assert np.allclose(rb.edges, np.arange(1, 10))
    assert rb.assign(np.array([0.0, 0.99, 1.5, 9.99, 10.0, -5, 50])).tolist() == [0, 0, 1, 9, 9, 0, 9]


def test_ties_land_in_the_middle_of_their_run():
    x = np.concatenate([np.zeros(5000), np.linspace(0.01, 1, 5000)])
    rb = fit_bins(_table(r=x), num_bins=64, unique_values=False)["r"]  # population quantiles: tied edges
    b = rb.assign(x)
    # zeros fill the bottom half of the quantiles: edges 1..31 are 0 -> middle of bins 0..31
    left = np.searchsorted(rb.edges, 0.0, "left")
    right = np.searchsorted(rb.edges, 0.0, "right")
    assert (left, right) == (0, 31)
    assert set(b[:5000]) == {15}
    assert b[5000:].min() >= 31 and b[-1] == 63
    # no tie: bins (e_k-1, e_k], as the release's bucketize
    e = np.asarray(rb.edges)
    assert rb.assign(np.array([e[40]]))[0] == 40 and rb.assign(np.array([e[40] + 1e-9]))[0] == 41


def test_quantiles_of_unique_values_bin_as_the_release():
    """The release: edges = torch.quantile(unique(values), linspace(0, 1, B + 1)), value =
    (bucketize(v, edges) - 1) / (B - 1) clipped at 0. Same inner edges and bins here, on tied
    fp16-rounded scores, except that the release set the outer edges to 0 and 1, which sends a
    score above 1 to bin B (value 64/63): here bins stay in [0, B - 1]."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.beta(5, 1.4, 20000), np.ones(3000)]).astype(np.float16).astype(np.float64)
    rb = fit_bins(_table(r=x), num_bins=64)["r"]
    uniq = torch.unique(torch.tensor(x, dtype=torch.float64))
    release_edges = torch.quantile(uniq, torch.linspace(0, 1, 65, dtype=torch.float64))
    np.testing.assert_allclose(rb.edges, release_edges[1:-1].numpy(), rtol=1e-12, atol=0)
    ours = rb.assign(x)
    inside = x < release_edges[-1].item()  # the release's clobbered top edge (1.0) aside
    release = (torch.bucketize(torch.tensor(x[inside]), release_edges) - 1).clamp(min=0).numpy()
    np.testing.assert_array_equal(ours[inside], release)
    assert ours.max() == 63 and (rb.value(ours) <= 1.0).all()
    # population quantiles put far fewer samples in the release's bins on such data
    pop = fit_bins(_table(r=x), num_bins=64, unique_values=False)["r"].assign(x)
    assert (pop[inside] == release).mean() < 0.5 < (ours[inside] == release).mean()


def test_constant_and_empty_rewards():
    t = _table(c=np.full(100, 3.0), e=np.full(100, np.nan))
    bins = fit_bins(t, num_bins=64)
    c, e = bins["c"], bins["e"]
    assert c.constant and not c.empty
    assert c.assign(np.array([3.0, 2.0, 4.0])).tolist() == [31, 0, 63]
    assert e.empty and e.n_missing == 100
    assert (e.assign(np.array([1.0, 2.0])) == -1).all()
    out = apply_bins(t, bins, missing="median")
    assert set(out.column("e.bin").to_pylist()) == {31}
    assert out.column("e.imputed").to_pylist() == [True] * 100


def test_missing_policies():
    x = np.arange(10, dtype=float)
    x[[2, 7]] = np.nan
    t = _table(r=x)
    bins = fit_bins(t, num_bins=4)
    assert bins["r"].n_missing == 2 and bins["r"].n_calibration == 8
    drop = apply_bins(t, bins, "drop")
    assert drop.num_rows == 8 and "k00002" not in drop.column("key").to_pylist()
    med = apply_bins(t, bins, "median")
    assert med.num_rows == 10
    mb = bins["r"].median_bin
    assert med.column("r.bin").to_pylist()[2] == mb and med.column("r.imputed").to_pylist()[2]
    nan = apply_bins(t, bins, "nan")
    assert nan.column("r.bin").to_pylist()[7] == -1 and np.isnan(nan.column("r.value").to_pylist()[7])
    with pytest.raises(ValueError, match="missing"):
        apply_bins(t, bins, "zero")


def test_calibration_subsample_is_seeded_and_capped():
    x = np.random.default_rng(2).normal(size=5000)
    a = fit_bins(_table(r=x), num_bins=16, calibration_size=1000, seed=3)["r"]
    b = fit_bins(_table(r=x), num_bins=16, calibration_size=1000, seed=3)["r"]
    c = fit_bins(_table(r=x), num_bins=16, calibration_size=1000, seed=4)["r"]
    assert a.n_calibration == 1000 and a.edges == b.edges and a.edges != c.edges


def test_caption_source_columns_share_bins():
    rng = np.random.default_rng(3)
    t = _table(**{"hpsv2_score": rng.normal(size=500), "hpsv2_score@long": rng.normal(1, 1, size=500)})
    bins = fit_bins(t, num_bins=8)
    assert list(bins) == ["hpsv2_score"] and bins["hpsv2_score"].n_calibration == 1000
    out = apply_bins(t, bins)
    assert {"hpsv2_score.bin", "hpsv2_score@long.bin"} <= set(out.column_names)


def test_bins_json_roundtrip_and_errors(tmp_path):
    x = np.random.default_rng(4).normal(size=3000)
    t = _table(r=x, s=np.full(3000, 1.0))
    bins = fit_bins(t, num_bins=64, reward_meta={"r": {"model_id": "org/model", "checkpoint_digest": "sha256:ab"}})
    doc = save_bins(str(tmp_path / "bins.json"), bins, strategy="quantile")
    again, doc2 = load_bins(str(tmp_path / "bins.json"))
    assert doc2["edges_sha256"] == doc["edges_sha256"] == binning.edges_digest(again)
    assert (again["r"].assign(x) == bins["r"].assign(x)).all()
    assert doc2["rewards"]["r"]["model_id"] == "org/model"
    assert doc2["rewards"]["r"]["checkpoint_digest"] == "sha256:ab"
    assert doc2["rewards"]["s"]["constant"] is True
    with pytest.raises(KeyError, match="zz"):
        fit_bins(t, rewards=["zz"])
    with pytest.raises(KeyError, match="not define"):
        apply_bins(_table(q=x), bins)
    with pytest.raises(ValueError, match="strategy"):
        compute_edges(x, 8, "median")


def _write_scores(d: Path):
    """Three finished score shards as the score stage leaves them (parquet + done record)."""
    from miro_scale.shard_jobs import fingerprint
    d.mkdir(parents=True)
    rng = np.random.default_rng(5)
    meta = {"rewards": {"aesthetic_score": {"model_id": "m-aes", "checkpoint_digest": "sha256:01"},
                        "sharpness_score": {"model_id": "pixel-statistics-v1", "checkpoint_digest": ""}},
            "captions": ["txt"]}
    for s in range(3):
        n = 50
        aes = rng.normal(5, 1, n)
        aes[0] = np.nan
        status = ["ok"] * n
        status[0] = "corrupt_image"
        t = pa.table({"key": [f"{s}_{i:03d}" for i in range(n)], "status": status, "error": [None] * n,
                      "aesthetic_score": pa.array(aes.astype(np.float32)),
                      "sharpness_score": pa.array(rng.uniform(0, 9, n).astype(np.float32))})
        out = d / f"{s:05d}.scores.parquet"
        pq.write_table(t.replace_schema_metadata({"miro_scoring": json.dumps(meta)}), out)
        (d / f"src{s}.tar").write_bytes(bytes(1024 * (s + 1)))
        fp = fingerprint(d / f"src{s}.tar")
        rec = {"version": 1, "stage": "score", "input": fp, "source": fp, "params_sha256": "x",
               "outputs": {out.name: out.stat().st_size}, "counts": {"samples": n}, "timing": {}}
        (d / f"{s:05d}.score.done.json").write_text(json.dumps(rec))


def _bin(*args):
    return subprocess.run([sys.executable, str(ROOT / "preprocessing" / "bin.py"), *map(str, args), "--no-progress"],
                          capture_output=True, text=True)


@pytest.mark.parametrize("strategy", ["quantile", "refined", "uniform"])
def test_bin_cli_fit_and_apply(tmp_path, strategy):
    _write_scores(tmp_path / "scores")
    r = _bin("--scores", tmp_path / "scores", "--num-bins", 16, "--strategy", strategy, "--refine-last", 4,
             "--calibration-size", 100, "--out", tmp_path / "bins")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "bins" / "bins.json").read_text())
    nb = 16 - 4 + 8 if strategy == "refined" else 16
    assert doc["rewards"]["aesthetic_score"]["num_bins"] == nb
    assert doc["rewards"]["aesthetic_score"]["n_calibration"] == 100
    assert doc["rewards"]["aesthetic_score"]["model_id"] == "m-aes"
    assert doc["rewards"]["aesthetic_score"]["checkpoint_digest"] == "sha256:01"
    side = pq.read_table(tmp_path / "bins" / "00001.rewards.parquet")
    assert side.num_rows == 49  # the corrupt row is dropped (default policy)
    v = np.asarray(side.column("aesthetic_score.value"))
    b = np.asarray(side.column("aesthetic_score.bin"))
    assert np.allclose(v, b / (nb - 1)) and 0 <= v.min() and v.max() <= 1
    rec = json.loads((tmp_path / "bins" / "00001.bin.done.json").read_text())
    src = json.loads((tmp_path / "scores" / "00001.score.done.json").read_text())["source"]
    assert rec["source"] == src  # the source tar's fingerprint travels with the sidecar
    # apply the existing bins.json with median imputation
    r = _bin("--scores", tmp_path / "scores", "--use", tmp_path / "bins" / "bins.json", "--out", tmp_path / "med",
             "--missing", "median")
    assert r.returncode == 0, r.stderr
    ents = binning.rewards_by_key(pq.read_table(tmp_path / "med" / "00000.rewards.parquet"))
    assert len(ents) == 50
    ent = ents["0_000"]["aesthetic_score"]
    assert ent == {"raw": None, "bin": doc["rewards"]["aesthetic_score"]["median_bin"],
                   "value": ent["bin"] / (nb - 1), "imputed": True}
    # missing as nan: bin and value None, raw kept where finite
    r = _bin("--scores", tmp_path / "scores", "--use", tmp_path / "bins" / "bins.json", "--out", tmp_path / "nan",
             "--missing", "nan")
    assert r.returncode == 0, r.stderr
    ents = binning.rewards_by_key(pq.read_table(tmp_path / "nan" / "00000.rewards.parquet"))
    assert ents["0_000"]["aesthetic_score"] == {"raw": None, "bin": None, "value": None}
    assert ents["0_000"]["sharpness_score"]["bin"] is not None


def test_bin_stage_resumes_and_bins_json_comes_last(tmp_path):
    _write_scores(tmp_path / "scores")
    args = ("--scores", tmp_path / "scores", "--num-bins", 8, "--out", tmp_path / "bins")
    assert _bin(*args).returncode == 0
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "bins").glob("*.rewards.parquet")}
    # a run killed before its end: a sidecar lost, no bins.json -> the directory is not finished
    (tmp_path / "bins" / "bins.json").unlink()
    (tmp_path / "bins" / "00002.bin.done.json").unlink()
    r = _bin(*args)
    assert r.returncode == 0 and (tmp_path / "bins" / "bins.json").exists()
    again = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "bins").glob("*.rewards.parquet")}
    assert again["00000.rewards.parquet"] == first["00000.rewards.parquet"]  # finished shards kept
    assert again["00002.rewards.parquet"] != first["00002.rewards.parquet"]  # the unfinished one redone
    # other edges: every sidecar is redone, bins.json replaced
    r = _bin("--scores", tmp_path / "scores", "--num-bins", 4, "--out", tmp_path / "bins")
    assert r.returncode == 0
    assert json.loads((tmp_path / "bins" / "bins.json").read_text())["rewards"]["aesthetic_score"]["num_bins"] == 4
    assert np.asarray(pq.read_table(tmp_path / "bins" / "00000.rewards.parquet")
                      .column("aesthetic_score.bin")).max() == 3
    # scores without a done record (a killed score run) are not binned
    (tmp_path / "scores" / "00001.score.done.json").unlink()
    r = _bin("--scores", tmp_path / "scores", "--num-bins", 4, "--out", tmp_path / "bins2")
    assert r.returncode == 0 and not (tmp_path / "bins2" / "00001.rewards.parquet").exists()


def test_calibration_streams_over_shards():
    """Fitting shard by shard gives the same bins whether the shards come as one table or many."""
    rng = np.random.default_rng(6)
    parts = [_table(r=rng.normal(size=400)) for _ in range(5)]
    whole = fit_bins(pa.concat_tables(parts), num_bins=8, calibration_size=10_000)["r"]
    streamed = fit_bins(iter(parts), num_bins=8, calibration_size=10_000)["r"]
    assert streamed.edges == whole.edges and streamed.n_calibration == 2000
    capped = fit_bins(iter(parts), num_bins=8, calibration_size=300, seed=1)["r"]
    assert capped.n_calibration == 300 and capped.n_total == 2000
