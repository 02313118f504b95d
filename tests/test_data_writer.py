"""ShardWriter (atomic, caps, DALI index, manifest), the index tool, and member names as users' tools write them."""
import io
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
from miro_scale.data.tario import read_index_file, scan_tar, write_index_file
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
        for bad in ("a.b", "", "/a", "a/", "a/../b", "a\nb", "d.x/"):
            with pytest.raises(ValueError):
                w.write(bad, {"txt": "x"})
        with pytest.raises(TypeError, match="k1"):
            w.write("k1", {"txt": object()})


def test_keys_survive_a_round_trip_intact(tmp_path):
    """Directories, spaces, non-ASCII and dots in directory names are kept; a key with whitespace gets
    no DALI index (its lines are space-separated) and is read by scanning the tar."""
    keys = ["plain", "dir/sub/k", "my photo", "café", "x.y/k", "L" * 150]
    with ShardWriter(str(tmp_path), max_samples=None, max_bytes=10**9) as w:
        for k in keys:
            w.write(k, {"jpg": solid_jpeg((10, 20, 30)), "txt": k})
    assert scan_tar(w.paths[0]).keys == keys
    assert not (tmp_path / "00000.idx").exists()
    L = WebDatasetLoader(str(tmp_path), 6, resolution=16, num_workers=0, shuffle=False, drop_last=False)
    b = next(iter(L))
    assert b["keys"] == keys and b["text"] == keys


def test_reward_entry_values():
    assert reward_entry(1.0, 63, 64)["value"] == 1.0 and reward_entry(1.0, 0, 64)["value"] == 0.0


def test_index_only_cli(tmp_path):
    src = tmp_path / "src"
    simple_dataset(str(src), 40, 40)
    for f in src.glob("*.idx"):
        f.unlink()
    os.remove(src / "manifest.json")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "preprocessing", "shard.py"), "--shards", str(src),
                        "--index-only", "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (src / "00000.idx").exists() and json.loads((src / "manifest.json").read_text())["num_samples"] == 40
    idx = read_index_file(str(src / "00000.idx"), str(src / "00000.tar"))
    assert idx.keys == scan_tar(str(src / "00000.tar")).keys


def _gnu_tar(tmp_path, files: dict, fmt: str = "gnu") -> str:
    src = tmp_path / f"src_{fmt}"
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    out = str(tmp_path / f"{fmt}.tar")
    subprocess.run(["tar", f"--format={fmt}", "-C", str(src), "-cf", out, "."], check=True)
    return out


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_member_names_as_tar_writes_them(tmp_path, fmt):
    """tar -C dir -cf x.tar . : './' prefixes, directory order (a sample's members not adjacent),
    sub-directories, spaces, non-ASCII, long names, dotted names (key up to the first dot)."""
    names = ["plain", "sub/nested", "my photo", "café", "L" * 140]
    files = {f"{n}.{e}": f"{n}.{e}".encode() for n in names for e in ("jpg", "txt", "json")}
    files.update({"photo.v2.jpg": b"p", "photo.v2.txt": b"t", ".hidden": b"h"})
    idx = scan_tar(_gnu_tar(tmp_path, files, fmt))
    assert sorted(idx.keys) == sorted(names + ["photo"]) and idx.problems == []
    for j, k in enumerate(idx.keys):
        mem = idx.member_dict(j)
        if k == "photo":  # 'photo.v2.jpg': key 'photo', extension 'v2.jpg', read as the sample's jpg
            assert set(mem) == {"jpg", "txt"}
        else:
            assert set(mem) == {"jpg", "txt", "json"}
            with open(idx.path, "rb") as f:
                f.seek(mem["txt"][0])
                assert f.read(mem["txt"][1]) == f"{k}.txt".encode()


def test_duplicate_keys_are_named_never_merged(tmp_path):
    p = str(tmp_path / "dup.tar")
    write_raw_tar(p, [("a.jpg", b"1"), ("a.txt", b"1"), ("a.jpg", b"2"), ("a.txt", b"2"),  # consecutive
                      ("b.jpg", b"3"), ("b.txt", b"3"), ("c.jpg", b"4"), ("b.jpg", b"5"),  # not consecutive
                      ("c.txt", b"6")])                                                     # scattered member
    idx = scan_tar(p)
    assert idx.keys == ["a", "b", "c"]
    assert idx.problems == [("duplicate_key", "a"), ("duplicate_key", "b")]
    with open(p, "rb") as f:
        f.seek(idx.member_dict(0)["jpg"][0])
        assert f.read(1) == b"1"  # the first sample keeps the key
    assert set(idx.member_dict(2)) == {"jpg", "txt"}
    # an index file with a repeated key says the same
    write_index_file(str(tmp_path / "dup.idx"), ["a", "a"], [{"jpg": (512, 1)}, {"jpg": (2048, 1)}])
    assert read_index_file(str(tmp_path / "dup.idx"), p).problems == [("duplicate_key", "a")]


def test_member_names_that_are_not_utf8_are_named(tmp_path):
    p = tmp_path / "latin1.tar"
    with tarfile.open(p, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        for name in ["caf\xe9.jpg", "ok.jpg"]:
            ti = tarfile.TarInfo(name)
            ti.size = 1
            tf.addfile(ti, io.BytesIO(b"x"))
    idx = scan_tar(str(p))
    assert idx.keys == ["ok"] and idx.problems[0][0] == "bad_member_name" and "caf" in idx.problems[0][1]


def test_index_read_paths_agree(tmp_path):
    """Uniform (fast path) and mixed-member (slow path) index files read back as the tar scan."""
    for sub, kw in (("uniform", {}), ("mixed", {"text_emb": True})):
        paths = simple_dataset(str(tmp_path / sub), 9, 20, **kw)
        idx = read_index_file(paths[0][:-4] + ".idx", paths[0])
        scan = scan_tar(paths[0])
        assert idx.keys == scan.keys and idx.members == scan.members and len(idx) == 9
