"""preprocessing/score.py under torchrun: 2 ranks, killed with SIGKILL mid-run, then resumed."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "rewards"))


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _cmd(shards_glob, out, delay):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), str(ROOT / "preprocessing" / "score.py"),
            "--shards", shards_glob, "--rewards", "caption_alignment,sharpness,hpsv2", "--variant", "tiny",
            "--out", str(out), "--chunk-size", "4", "--num-workers", "1", "--no-progress",
            "--debug-delay", str(delay)]


@pytest.mark.timeout(240)
def test_torchrun_killed_and_resumed(tmp_path):
    import pyarrow.parquet as pq
    from shards import write_shards

    from miro_scale.data.tario import load_index

    shards = write_shards(str(tmp_path / "data"), num_shards=6, per_shard=6)
    expected = []
    for s in shards:
        expected += load_index(s).keys
    assert len(expected) == len(set(expected)) == 6 * 12
    out = tmp_path / "scores"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    glob = str(tmp_path / "data" / "{00000..00005}.tar")
    # 1) slow run, SIGKILLed (whole process group: torchrun and both ranks) once a shard is done
    p = subprocess.Popen(_cmd(glob, out, 0.6), env=env, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    while not list(out.glob("*.score.done.json")) and p.poll() is None:  # pytest-timeout bounds it
        time.sleep(0.2)
    assert p.poll() is None, p.stdout.read().decode()[-3000:]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done_before = {f.name: f.stat().st_mtime_ns for f in out.glob("*.scores.parquet")
                   if (out / f.name.replace(".scores.parquet", ".score.done.json")).exists()}
    assert 1 <= len(done_before) < 6, done_before
    assert not (out / "score.summary.json").exists()
    # 2) resume: finished shards are kept as they are, the others are scored, nothing twice
    r = subprocess.run(_cmd(glob, out, 0.0), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=180)
    assert r.returncode == 0, r.stdout.decode()[-3000:]
    files = sorted(out.glob("*.parquet"))
    assert [f.name for f in files] == [f"{i:05d}.scores.parquet" for i in range(6)]
    for name, mtime in done_before.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"{name} was rescored"
    keys = []
    for f in files:
        t = pq.read_table(f)
        keys += t.column("key").to_pylist()
        st = dict(zip(t.column("key").to_pylist(), t.column("status").to_pylist()))
        n = int(f.name.split(".")[0])
        assert st[f"s{n:03d}_corrupt"] == "corrupt_image"
        assert st[f"s{n:03d}_notxt"] == "missing_txt"
    assert sorted(keys) == sorted(expected)  # none lost, none duplicated
    assert not list(out.glob(".*tmp*"))
    summary = json.loads((out / "score.summary.json").read_text())
    assert summary["shards_done"] == 6 and summary["complete"] and summary["counts"]["samples"] == 72
    assert summary["counts"]["ok"] == 36 and len(summary["this_run"]["per_rank"]) == 2
    assert summary["counts"]["failures"]["corrupt_image"] == 6
    assert set(summary["counts"]["rewards"]) == {"caption_alignment_score", "sharpness_score", "hpsv2_score"}
    assert summary["timing"]["rewards"]["hpsv2_score"] > 0
