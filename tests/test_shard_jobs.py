"""The shard-job runner every per-shard stage uses: done records, fingerprints, retries, summaries."""
import json
import shutil

import pytest

from miro_scale import shard_jobs
from miro_scale.data._testing import simple_dataset
from miro_scale.data.sidecars import iter_members, open_source_shard


def _job(out, calls, fail=(), params=None, **kw):
    """A stage that writes each shard's keys, one per line."""
    def process(task):
        calls.append(task.stem)
        if task.stem in fail:
            raise RuntimeError(f"boom in {task.stem}")
        idx = open_source_shard(task.shard)
        keys = [k for k, _ in iter_members(task.shard, idx)]
        task.path("{stem}.keys.txt").write_text("\n".join(keys))
        return {"samples": len(keys), "failures": {"odd": 1}}
    return shard_jobs.ShardJob(stage="test", out_dir=str(out), outputs=["{stem}.keys.txt"],
                               params=params or {"v": 1}, process=process, progress=False, **kw)


@pytest.fixture
def shards(tmp_path):
    return simple_dataset(str(tmp_path / "data"), 12, 4)


def test_runs_each_shard_once_and_skips_finished_ones(tmp_path, shards):
    calls = []
    s = shard_jobs.run(_job(tmp_path / "out", calls), shards, 0, 1)
    assert calls == ["00000", "00001", "00002"] and s["complete"] and s["counts"] == {
        "samples": 12, "failures": {"odd": 3}}
    rec = json.loads((tmp_path / "out" / "00001.test.done.json").read_text())
    assert rec["input"] == shard_jobs.fingerprint(shards[1]) == rec["source"]
    assert rec["outputs"] == {"00001.keys.txt": (tmp_path / "out" / "00001.keys.txt").stat().st_size}
    assert json.loads((tmp_path / "out" / "test.job.json").read_text())["shards"] == shards
    calls.clear()
    s = shard_jobs.run(_job(tmp_path / "out", calls), shards, 0, 1)
    assert calls == [] and s["this_run"]["samples"] == 0 and s["shards_done"] == 3
    # ranks take shards i % world
    for rank in range(2):
        mine = []
        shard_jobs.run(_job(tmp_path / f"r{rank}", mine), shards, rank, 2)
        assert mine == ["00000", "00002"][: 2 - rank] if rank == 0 else mine == ["00001"]


def test_outputs_of_another_dataset_or_other_parameters_are_redone(tmp_path, shards):
    calls = []
    shard_jobs.run(_job(tmp_path / "out", calls), shards, 0, 1)
    other = simple_dataset(str(tmp_path / "other"), 12, 4, seed=9)  # same shard names, other content
    calls.clear()
    shard_jobs.run(_job(tmp_path / "out", calls), other, 0, 1)
    assert calls == ["00000", "00001", "00002"]
    calls.clear()
    shard_jobs.run(_job(tmp_path / "out", calls, params={"v": 2}), other, 0, 1)
    assert calls == ["00000", "00001", "00002"]
    # an output that changed size since its record is not done either
    (tmp_path / "out" / "00001.keys.txt").write_text("truncated")
    calls.clear()
    shard_jobs.run(_job(tmp_path / "out", calls, params={"v": 2}), other, 0, 1)
    assert calls == ["00001"]


def test_a_failing_shard_is_recorded_retried_and_never_ends_the_run(tmp_path, shards):
    calls = []
    s = shard_jobs.run(_job(tmp_path / "out", calls, fail={"00001"}, retries=1), shards, 0, 1)
    assert calls == ["00000", "00001", "00001", "00002"]  # one retry within the run
    assert not s["complete"] and s["shards_missing"] == [shards[1]]
    assert "boom in 00001" in s["shards_failed"][shards[1]]
    err = json.loads((tmp_path / "out" / "00001.test.error.json").read_text())
    assert err["attempts"] == 2 and "RuntimeError" in err["traceback"]
    assert not (tmp_path / "out" / "00001.keys.txt").exists()
    assert shard_jobs.report(s) == 1
    calls.clear()
    s = shard_jobs.run(_job(tmp_path / "out", calls), shards, 0, 1)  # the next run retries it
    assert calls == ["00001"] and s["complete"] and not (tmp_path / "out" / "00001.test.error.json").exists()
    assert shard_jobs.report(s) == 0


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_broken_tars_fail_their_shard_and_are_not_marked_done(tmp_path, shards, damage):
    p = shards[1]
    size = len(open(p, "rb").read())
    if damage == "empty":
        open(p, "wb").close()
    elif damage == "truncated":
        with open(p, "r+b") as f:
            f.truncate(size // 2)
    else:
        open(p, "wb").write(b"not a tar" * 300)
    (tmp_path / "data" / "00001.idx").unlink()
    calls = []
    s = shard_jobs.run(_job(tmp_path / "out", calls, retries=3), shards, 0, 1)
    assert calls.count("00001") == 1  # an input error is not retried within the run
    assert s["shards_missing"] == [p] and not (tmp_path / "out" / "00001.test.done.json").exists()
    msg = s["shards_failed"][p]
    assert p in msg and ("empty" in msg or "truncated" in msg)
    # the download completed: the rerun processes it
    simple_dataset(str(tmp_path / "fresh"), 12, 4)
    shutil.copy(tmp_path / "fresh" / "00001.tar", p)
    assert shard_jobs.run(_job(tmp_path / "out", calls), shards, 0, 1)["complete"]


def test_stale_temporary_files_are_removed(tmp_path, shards):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".00000.keys.txt.tmp999").write_text("half")
    shard_jobs.run(_job(out, []), shards, 0, 1)
    assert not list(out.glob(".*tmp*"))


def test_colliding_shard_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="collide"):
        shard_jobs.assign(["a/x.tar", "b/x.tar"], 0, 1)
