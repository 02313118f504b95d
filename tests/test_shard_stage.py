"""The shard stage (preprocessing/shard.py): missing-reward policies, stale or unfinished sidecars,
incomplete outputs the loaders refuse, image-mode shards."""
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "rewards"))
sys.path.insert(0, str(ROOT / "preprocessing"))

REWARDS = ["sharpness_score", "caption_alignment_score"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Two source shards (synthetic world + broken samples), scored with pixel rewards."""
    from shards import write_shards

    from miro_scale.rewards.scoring import ScoreConfig, run_scoring

    w = tmp_path_factory.mktemp("stage")
    shards = write_shards(str(w / "data"), num_shards=2, per_shard=6)
    run_scoring(ScoreConfig(shards=shards, rewards=REWARDS, out_dir=str(w / "scores"), variant="tiny",
                            num_workers=0, progress=False, rank=0, world_size=1))
    return w, shards


def _bin(w, out, *extra):
    import bin as bin_stage
    return bin_stage.main(["--scores", str(w / "scores"), "--num-bins", "8", "--out", str(w / out), "--no-progress",
                           *extra])


def _shard(w, bins, out, *extra):
    import shard as shard_stage
    return shard_stage.main(["--shards", str(w / "data"), "--bins", str(w / bins), "--out", str(w / out),
                             "--no-progress", *extra])


def _keys_and_stats(directory, **kw):
    from miro_scale.data import WebDatasetLoader
    L = WebDatasetLoader(str(directory), 4, resolution=16, reward_keys=REWARDS, num_workers=0, shuffle=False,
                         drop_last=False, **kw)
    return [k for b in L for k in b["keys"]], L.stats


@pytest.mark.parametrize("policy", ["drop", "median", "nan"])
def test_missing_reward_policies_reach_the_loader(scored, policy, caplog):
    w, _ = scored
    assert _bin(w, f"bins_{policy}", "--missing", policy) == 0
    assert _shard(w, f"bins_{policy}", f"train_{policy}") == 0
    caplog.set_level(logging.WARNING, logger="miro_scale.data")
    keys, stats = _keys_and_stats(w / f"train_{policy}")
    good = {k for k in keys if not k.startswith(("s000_", "s001_"))}
    assert len(good) == 12  # the good samples, whatever the policy
    if policy == "drop":  # samples without every reward are left out by the shard stage, named
        rec = json.loads((w / "train_drop" / "00000.shard.done.json").read_text())["counts"]
        skipped = {k: r for r, ks in rec["skipped_keys"].items() for k in ks}
        assert skipped == {"s000_corrupt": "no_rewards:corrupt_image", "s000_empty": "no_rewards:empty_member",
                           "s000_noimage": "no_rewards:missing_image", "s000_notxt": "no_rewards:missing_txt",
                           "s000_badtxt": "no_rewards:bad_txt", "s000_emptytxt": "no_rewards:empty_caption"}
        assert set(keys) == good
    elif policy == "median":  # imputed values, marked in the json
        assert set(keys) == good | {"s000_emptytxt", "s001_emptytxt"}  # the others fail in the loader
        from miro_scale.data.sidecars import iter_members
        from miro_scale.data.tario import load_index
        p = str(w / "train_median" / "00000.tar")
        meta = json.loads(dict(iter_members(p, load_index(p)))["s000_emptytxt"]["json"])
        assert meta["rewards"]["caption_alignment_score"]["imputed"] is True
        assert "imputed" not in meta["rewards"]["sharpness_score"]
    else:  # nan: written as null; the loader skips the sample naming shard, key and reward
        assert set(keys) == good and stats["missing_reward"] == 4  # emptytxt and corrupt (read first)
        assert "00000.tar:s000_emptytxt: json has no rewards.caption_alignment_score.value" in caplog.text


def test_sidecars_of_another_file_fail_the_shard_and_the_loader_refuses(scored, tmp_path):
    from miro_scale.data import WebDatasetLoader

    w, shards = scored
    assert _bin(w, "bins_stale") == 0
    data2 = tmp_path / "data"
    shutil.copytree(w / "data", data2)
    other = tmp_path / "other"
    from shards import write_shards
    write_shards(str(other), num_shards=2, per_shard=6, seed=3)
    shutil.copy(other / "00001.tar", data2 / "00001.tar")  # same name, another dataset
    (data2 / "00001.idx").unlink()
    import shard as shard_stage
    rc = shard_stage.main(["--shards", str(data2), "--bins", str(w / "bins_stale"), "--out", str(tmp_path / "train"),
                           "--no-progress"])
    assert rc == 1
    summary = json.loads((tmp_path / "train" / "shard.summary.json").read_text())
    msg = summary["shards_failed"][str(data2 / "00001.tar")]
    assert "00001.rewards.parquet: made from another file than 00001.tar" in msg
    assert not (tmp_path / "train" / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match=r"shard stage has not finished \(1 of 2 shards done.*missing: 00001"):
        WebDatasetLoader(str(tmp_path / "train"), 4)


def test_unfinished_bins_are_refused(scored):
    w, _ = scored
    assert _bin(w, "bins_x") == 0
    (w / "bins_x" / "bins.json").unlink()  # what a killed bin run leaves
    with pytest.raises(SystemExit, match="no bins.json; the bin stage has not finished"):
        _shard(w, "bins_x", "train_x")


def test_kept_images_train_in_image_mode_with_both_loaders(scored):
    from miro_scale.data.dali_loader import DaliLoader, dali_available

    w, _ = scored
    assert _bin(w, "bins_img") == 0
    assert _shard(w, "bins_img", "train_img") == 0
    keys, _ = _keys_and_stats(w / "train_img")
    assert len(keys) == 12
    if dali_available():
        D = DaliLoader(str(w / "train_img"), 4, resolution=16, reward_keys=REWARDS, num_threads=1, shuffle=False,
                       drop_last=False)
        assert [k for b in D for k in b["keys"]] == keys
