"""ShardWriter (atomic, caps, DALI index, manifest) and the reshard / index tool."""
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from miro_scale.data._testing import simple_dataset, solid_jpeg, write_raw_tar
from miro_scale.data.format import reward_entry, split_member_name
from miro_scale.data.loader import WebDatasetLoader
from miro_scale.data.reshard import reshard
from miro_scale.data.tario import load_index, read_index_file, scan_tar
from miro_scale.data.writer import ShardWriter, keys_digest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_split_member_name():
    assert split_member_name("a/b/000123.latent_mean.npy") == ("a/b/000123", "latent_mean.npy")
    assert split_member_name("x.y/k.jpg") == ("x.y/k", "jpg")
    assert split_member_name("noext") == ("noext", "")


def test_sample_cap_manifest_and_index(tmp_path):
    paths = simple_dataset(str(tmp_path), 23, 10, latents=True)
    assert [os.path.basename(p) for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["num_samples"] == 23 and [e["num_samples"] for e in man["shards"]] == [10, 10, 3]
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    for p, e in zip(paths, man["shards"]):
        idx = read_index_file(p[:-4] + ".idx", p)
        scan = scan_tar(p)
        assert idx.keys == scan.keys and idx.members == scan.members
        assert e["keys_sha256"] == keys_digest(scan.keys)
        with tarfile.open(p) as tf:  # offsets really point at the member data
            for key, mem in zip(idx.keys, idx.members):
                off, size, name = mem["latent_mean.npy"]
                data = tf.extractfile(name).read()
                with open(p, "rb") as f:
                    f.seek(off)
                    assert f.read(size) == data


@pytest.mark.skipif(shutil.which("wds2idx") is None, reason="DALI's wds2idx not installed")
def test_index_matches_wds2idx(tmp_path):
    paths = simple_dataset(str(tmp_path), 5, 10, text_emb=True)
    ref = tmp_path / "ref.idx"
    subprocess.run(["wds2idx", paths[0], str(ref)], check=True, capture_output=True)
    assert ref.read_text() == open(paths[0][:-4] + ".idx").read()


def test_byte_cap(tmp_path):
    big = bytes(3000)
    with ShardWriter(str(tmp_path), max_samples=None, max_bytes=10_000) as w:
        for i in range(7):
            w.write(f"k{i}", {"bin": big, "txt": "x"})
    sizes = [os.path.getsize(p) for p in w.paths]
    # each sample is 512+3072+512+512 = 4608 bytes: two per shard
    assert [e["num_samples"] for e in w.entries] == [2, 2, 2, 1]
    assert all(s <= 10_000 + 10240 for s in sizes)  # cap on member data; tar end padding on top
    with ShardWriter(str(tmp_path / "one"), max_samples=None, max_bytes=100) as w:
        w.write("huge", {"bin": big})  # larger than the cap: a shard of its own, not an error
    assert w.entries[0]["num_samples"] == 1


def test_atomic_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(str(tmp_path), max_samples=3) as w:
            for i in range(5):
                w.write(f"k{i}", {"txt": "x"})
            raise RuntimeError("boom")
    files = sorted(os.listdir(tmp_path))
    assert files == ["00000.idx", "00000.tar", "manifest.json"]  # the open shard was dropped
    assert json.loads((tmp_path / "manifest.json").read_text())["num_samples"] == 3


def test_bad_keys_and_members(tmp_path):
    with ShardWriter(str(tmp_path)) as w:
        for bad in ("a.b", "a/b", "a b", ""):
            with pytest.raises(ValueError):
                w.write(bad, {"txt": "x"})
        with pytest.raises(TypeError, match="k1"):
            w.write("k1", {"txt": object()})


def test_reward_entry_values():
    assert reward_entry(1.0, 63, 64)["value"] == 1.0 and reward_entry(1.0, 0, 64)["value"] == 0.0


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet"])
def test_reshard_merges_sidecar(tmp_path, fmt):
    src = tmp_path / "src"
    # img2dataset-style input: jpg/txt/json with its metadata fields, no rewards, no index
    members = []
    for i in range(12):
        k = f"{i:09d}"
        meta = {"key": k, "status": "success", "caption": f"c{i}", "url": f"http://x/{i}",
                "width": 48, "height": 40, "original_width": 480, "original_height": 400}
        members += [(f"{k}.jpg", solid_jpeg((i * 10, 0, 0))), (f"{k}.txt", f"c{i}".encode()),
                    (f"{k}.json", json.dumps(meta).encode())]
    os.makedirs(src)
    write_raw_tar(str(src / "00000.tar"), members[:18])
    write_raw_tar(str(src / "00001.tar"), members[18:])
    keys = [f"{i:09d}" for i in range(12) if i != 5]  # sample 5 has no scores
    if fmt == "json":
        side = tmp_path / "s.json"
        side.write_text(json.dumps({k: {"r1": {"raw": int(k) * 0.1, "bin": int(k) % 64},
                                        "r2": {"raw": 1.0, "bin": 63, "value": 1.0}} for k in keys}))
    elif fmt == "jsonl":
        side = tmp_path / "s.jsonl"
        side.write_text("\n".join(json.dumps({"key": k, "rewards": {
            "r1": {"raw": int(k) * 0.1, "bin": int(k) % 64}, "r2": {"bin": 63}}}) for k in keys))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        side = tmp_path / "s.parquet"
        pq.write_table(pa.table({"key": keys, "r1_raw": [int(k) * 0.1 for k in keys],
                                 "r1_bin": [int(k) % 64 for k in keys], "r2_bin": [63] * len(keys)}),
                       str(side))
    out = tmp_path / "out"
    stats = reshard(str(src), str(out), str(side), ["r1", "r2"], shard_size=5, drop_missing=True,
                    validate_images=True, progress=False)
    assert stats["written"] == 11 and stats["no_sidecar_rewards"] == 1
    man = json.loads((out / "manifest.json").read_text())
    assert [e["num_samples"] for e in man["shards"]] == [5, 5, 1] and man["reward_keys"] == ["r1", "r2"]
    L = WebDatasetLoader(str(out), 4, resolution=16, reward_keys=["r1", "r2"], num_workers=0,
                         shuffle=False, drop_last=False)
    got = {}
    for b in L:
        for k, r in zip(b["keys"], b["rewards"]):
            got[k] = r.tolist()
    assert sorted(got) == keys
    for k in keys:
        assert got[k] == pytest.approx([(int(k) % 64) / 63, 1.0])
    # img2dataset fields survive
    idx = load_index(str(out / "00000.tar"))
    with open(out / "00000.tar", "rb") as f:
        off, size, _ = idx.members[0]["json"]
        f.seek(off)
        meta = json.loads(f.read(size))
    assert meta["url"] == "http://x/0" and meta["original_width"] == 480
    assert meta["rewards"]["r1"] == {"raw": 0.0, "bin": 0, "value": 0.0}


def test_reshard_bin_from_raw_and_cli_index_only(tmp_path):
    src = tmp_path / "src"
    simple_dataset(str(src), 40, 40)
    for f in src.glob("*.idx"):
        f.unlink()
    os.remove(src / "manifest.json")
    side = tmp_path / "raw.json"
    side.write_text(json.dumps({f"s{i:06d}": {"q": float(i)} for i in range(40)}))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "miro_scale.data.reshard", "--input", str(src / "*.tar"),
                        "--out", str(out), "--sidecar", str(side), "--bin-from-raw", "--num-bins", "4",
                        "--shard-size", "15"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "manifest.json").read_text())
    assert man["num_samples"] == 40 and len(man["reward_bin_edges"]["q"]) == 3
    L = WebDatasetLoader(str(out), 40, resolution=16, reward_keys=["q"], num_workers=0, shuffle=False)
    b = next(iter(L))
    vals = sorted(b["rewards"][:, 0].tolist())
    assert vals == pytest.approx([0.0] * 10 + [1 / 3] * 10 + [2 / 3] * 10 + [1.0] * 10)
    r = subprocess.run([sys.executable, "-m", "miro_scale.data.reshard", "--input", str(src),
                        "--index-only"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert (src / "00000.idx").exists() and (src / "manifest.json").exists()


def test_index_read_paths_agree(tmp_path):
    """Uniform (fast path) and mixed-member (slow path) index files read back as the tar scan."""
    for sub, kw in (("uniform", {}), ("mixed", {"text_emb": True})):
        paths = simple_dataset(str(tmp_path / sub), 9, 20, **kw)
        idx = read_index_file(paths[0][:-4] + ".idx", paths[0])
        scan = scan_tar(paths[0])
        assert idx.keys == scan.keys and idx.members == scan.members and len(idx) == 9
