"""preprocessing/bench_scale.py: a tiny run of both stages (no wall-clock assertions) writes a
complete JSON and plot, and the measured commands really finished: bins.json and every sidecar, the
shard stage's manifest, and every input row written or skipped for the reason the generator made."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = str(ROOT / "preprocessing" / "bench_scale.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    w = tmp_path_factory.mktemp("bench_scale")
    out = w / "result.json"
    cmd = [sys.executable, BENCH, "--stages", "bin,shard", "--sizes", "2k,4k", "--rows-per-file", "1000",
           "--shard-sizes", "40,80", "--samples-per-shard", "20", "--unique-shards", "1", "--resolution", "64",
           "--images", "drop", "--text-dim", "64", "--latent-shape", "4,8,8", "--no-import-baseline",
           "--work-dir", str(w / "work"), "--keep-work", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return w, json.loads(out.read_text()), r.stdout


def test_json_has_machine_commands_and_numbers(run):
    w, doc, stdout = run
    m = doc["machine"]
    assert m["cpu_count"] >= 1 and m["python"] and m["torch"] and m["pyarrow"]
    assert doc["created"] and doc["command"].startswith("python preprocessing/bench_scale.py")
    assert doc["plot"] and Path(doc["plot"]).stat().st_size > 0
    bins = doc["bin"]["configs"]
    assert [c["rows"] for c in bins] == [2000, 4000]
    for c in bins:
        assert c["command"].startswith("python preprocessing/bin.py --scores ")
        assert c["wall_s"] > 0 and c["rows_per_s"] > 0 and c["peak_rss_mib"] > 0
        assert c["input_bytes"] > 0 and c["output_bytes"] > 0
        assert c["ok"] and all(c["checks"].values()), c["checks"]
    shards = doc["shard"]["configs"]
    assert [(c["samples"], c["images"]) for c in shards] == [(40, "drop"), (80, "drop")]
    for c in shards:
        assert c["command"].startswith("python preprocessing/shard.py --shards ")
        assert c["wall_s"] > 0 and c["samples_per_s"] > 0 and c["peak_rss_mib"] > 0
        assert c["output_bytes"] > 0 and c["input_bytes"]["encoded"] > 0
        assert c["ok"] and all(c["checks"].values()), c["checks"]
    enc = doc["shard"]["bytes_per_sample_by_member"]
    assert enc["latent_mean.npy"] == 128 + 4 * 8 * 8 * 2 and "text_emb_long.npy" in enc
    for stage, n in (("bin", 2), ("shard", 2)):
        rat = doc[stage]["ratios"]
        assert len(rat) == n and rat[0]["time_per_unit_x"] == 1 and "marginal_us_per_unit" in rat[1]
        assert {"linear_time", "bounded_memory"} <= set(doc[stage]["verdict"])
    assert "ratios vs the smallest size" in stdout


def test_bin_outputs_are_complete(run):
    import pyarrow.parquet as pq

    w, doc, _ = run
    for c in doc["bin"]["configs"]:
        out = w / "work" / "bin" / f"bins_{c['rows']}"
        assert json.loads((out / "bins.json").read_text())["rewards"].keys() == {
            "clip_score", "aesthetic_score", "image_reward_score", "pick_a_score_score", "hpsv2_score",
            "vqa_score", "sciscore_score"}
        files = sorted(out.glob("*.rewards.parquet"))
        assert len(files) == c["files"] == c["rows"] // 1000
        written = sum(pq.read_metadata(f).num_rows for f in files)
        assert written == c["rows_written"] and written + c["rows_dropped_missing_reward"] == c["rows"]


def test_shard_outputs_are_complete(run):
    w, doc, _ = run
    for c in doc["shard"]["configs"]:
        out = w / "work" / "shard" / f"train_{c['samples']}_{c['images']}"
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["complete"] and manifest["num_shards"] == c["shards"]
        skipped = {}
        for rec in out.glob("*.shard.done.json"):
            for reason, keys in json.loads(rec.read_text())["counts"]["skipped_keys"].items():
                skipped[reason] = skipped.get(reason, 0) + len(keys)
        assert manifest["num_samples"] + sum(skipped.values()) == c["samples"]
        assert all(r.startswith("no_rewards:") for r in skipped), skipped
        # latent mode: no image bytes in the output
        assert c["images"] == "drop" and not any(".jpg" in line for line in (out / "00000.idx").read_text().splitlines())
