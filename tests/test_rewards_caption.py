"""preprocessing/caption.py with a tiny random Gemma-3 saved as a local model directory."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "rewards"))
sys.path.insert(0, str(ROOT / "preprocessing"))


def test_extract_caption():
    from caption import extract_caption
    assert extract_caption("blah <CAPTION> a  red\ncircle </CAPTION> tail") == ("a red circle", True)
    assert extract_caption("<CAPTION>unterminated text") == ("unterminated text", True)
    assert extract_caption("no tags here") == ("no tags here", False)


@pytest.mark.timeout(240)
def test_caption_cli_on_tiny_gemma3(tmp_path):
    from shards import write_shards
    from tiny_vlm import save_tiny_gemma3
    model = save_tiny_gemma3(str(tmp_path / "tiny-gemma3"))
    shards = write_shards(str(tmp_path / "data"), num_shards=2, per_shard=3)
    cmd = [sys.executable, str(ROOT / "preprocessing" / "caption.py"), "--shards", str(tmp_path / "data" / "{00000..00001}.tar"),
           "--model", model, "--out", str(tmp_path / "cap"), "--batch-size", "2", "--max-new-tokens-long", "6",
           "--max-new-tokens-short", "3", "--precision", "fp32", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=200, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-3000:]
    t = pq.read_table(tmp_path / "cap" / "00001.captions.parquet")
    assert (tmp_path / "cap" / "00001.caption.done.json").exists()
    assert t.column_names == ["key", "status", "error", "caption_long", "caption_short"]
    st = dict(zip(t.column("key").to_pylist(), t.column("status").to_pylist()))
    assert st["s001_corrupt"] == "corrupt_image" and st["s001_noimage"] == "missing_image"
    good = [i for i, k in enumerate(t.column("key").to_pylist()) if not k.startswith("s001")]
    assert len(good) == 3
    longs = t.column("caption_long").to_pylist()
    assert all(isinstance(longs[i], str) for i in good)  # random weights: words, not sense
    meta = json.loads(pq.read_schema(tmp_path / "cap" / "00001.captions.parquet").metadata[b"miro_captions"])
    assert meta["kinds"] == ["long", "short"] and "CAPTION" in meta["prompts"]["long"]
    # rerun: nothing to do
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=200, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0 and json.loads(r.stdout)["this_run"]["samples"] == 0
