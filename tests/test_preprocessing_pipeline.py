"""The real path, end to end, on shards as users' tools write them: caption -> encode -> score -> bin ->
shard -> load -> train, each stage its own command under torchrun with 2 processes (bin: one), with
tiny random models of the real architectures (Gemma-3, AutoencoderKL, T5, the reward towers).

Every key that goes in is either in the training data or skipped for a named reason, and a kill -9
in the middle of any stage followed by a rerun gives byte-identical outputs."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from miro_scale.data.loader import device_batch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(FIX))
sys.path.insert(0, str(FIX / "rewards"))

REWARDS = ["caption_alignment_score", "sharpness_score", "hpsv2_score"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _port() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return str(port)


def _torchrun(nproc: int):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", _port()]


def stage_commands(w: Path) -> dict:
    """Each stage's command (script and arguments) over the work directory ``w``."""
    data = str(w / "data")
    return {
        "caption": ["preprocessing/caption.py", "--shards", data, "--model", str(w / "gemma"), "--kinds", "long",
                    "--out", str(w / "captions"), "--batch-size", "4", "--max-new-tokens-long", "6",
                    "--precision", "fp32", "--no-progress"],
        "encode": ["preprocessing/encode.py", "--shards", data, "--captions", str(w / "captions"),
                   "--config", str(w / "config.json"), "--out", str(w / "encoded"), "--batch-size", "4",
                   "--precision", "fp32", "--num-workers", "1", "--no-progress"],
        "score": ["preprocessing/score.py", "--shards", data, "--rewards", ",".join(REWARDS), "--variant", "tiny",
                  "--captions", str(w / "captions"), "--caption-sources", "txt,long", "--out", str(w / "scores"),
                  "--num-workers", "1", "--chunk-size", "8", "--no-progress"],
        "bin": ["preprocessing/bin.py", "--scores", str(w / "scores"), "--num-bins", "8", "--out", str(w / "bins"),
                "--no-progress"],
        "shard": ["preprocessing/shard.py", "--shards", data, "--captions", str(w / "captions"),
                  "--encoded", str(w / "encoded"), "--bins", str(w / "bins"), "--images", "drop",
                  "--out", str(w / "train"), "--no-progress"],
    }


OUT_DIRS = {"caption": "captions", "encode": "encoded", "score": "scores", "bin": "bins", "shard": "train"}


def run_stage(name: str, w: Path, nproc: int, env=None, **kw):
    cmd = stage_commands(w)[name]
    launcher = _torchrun(nproc) if nproc > 1 else [sys.executable]
    return subprocess.run(launcher + [str(ROOT / cmd[0])] + cmd[1:], cwd=ROOT, env=env or ENV,
                          capture_output=True, text=True, timeout=300, **kw)


def training_config(w: Path) -> dict:
    from tests.conftest import tiny_config_dict

    return tiny_config_dict(
        model={"latent_size": 4, "patch_size": 2, "text_dim": 32, "reward_keys": REWARDS, "reward_bins": 8},
        data={"source": "shards", "shards": str(w / "train"), "mode": "latent", "precomputed_text": True,
              "caption_source": {"txt": 0.5, "long": 0.5}, "max_text_len": 16, "num_workers": 0},
        train={"steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "precision": "fp32", "log_every": 1,
               "checkpoint_every": 2, "output_dir": str(w / "run")},
        engine={"fsdp_param_dtype": "fp32"},
        text_encoder={"kind": "t5", "name_or_path": str(w / "t5"), "max_length": 16},
        autoencoder={"kind": "sdxl_vae", "name_or_path": str(w / "vae"), "image_size": 32})


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The clean run of every stage, under torchrun with 2 processes."""
    from encoders import save_tiny_t5, save_tiny_vae
    from odd_shards import write_odd_shards
    from tiny_vlm import save_tiny_gemma3

    w = tmp_path_factory.mktemp("real_path")
    write_odd_shards(str(w / "data"))
    save_tiny_gemma3(str(w / "gemma"))
    save_tiny_t5(str(w / "t5"))
    save_tiny_vae(str(w / "vae"))
    (w / "config.json").write_text(json.dumps(training_config(w)))
    logs = {}
    for name in ("caption", "encode", "score", "bin", "shard"):
        r = run_stage(name, w, 1 if name == "bin" else 2)
        logs[name] = r.stdout + r.stderr
        assert r.returncode == 0, f"{name} failed:\n{logs[name][-4000:]}"
    return w, logs


def _done_counts(d: Path, stage: str) -> dict:
    return {p.name.split(".")[0]: json.loads(p.read_text())["counts"] for p in sorted(d.glob(f"*.{stage}.done.json"))}


def test_every_key_is_trained_on_or_skipped_with_a_reason(pipeline):
    from odd_shards import LONG

    from miro_scale.data import WebDatasetLoader

    w, _ = pipeline
    manifest = json.loads((w / "train" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_shards"] == 3 and manifest["reward_keys"] == sorted(REWARDS)
    L = WebDatasetLoader(str(w / "train"), 4, mode="latent", reward_keys=REWARDS, text_embeddings=True,
                         caption_source={"txt": 0.5, "long": 0.5}, max_text_len=16, num_workers=0, shuffle=False,
                         drop_last=False)
    trained = [k for b in L for k in b["keys"]]
    assert not {k: v for k, v in L.stats.items() if k not in ("samples", "batches")}, dict(L.stats)
    skipped = {}
    for counts in _done_counts(w / "train", "shard").values():
        for reason, keys in counts["skipped_keys"].items():
            skipped.update({k if reason != "duplicate_key" else f"{k}#dup": reason for k in keys})
    # keys intact end to end: './' dropped, directories, spaces, non-ASCII, long names, dotted names
    good = {f"{i:09d}" for i in range(6)} | {"plain", "sub/nested", "my photo", "café", "photo", LONG, "a", "b",
                                             "gif_as_jpg"}
    assert sorted(trained) == sorted(good)
    # each skip names its cause; no_rewards carries the score stage's status of the sample (a sample
    # whose image failed has no synthetic caption either: the caption stage could not see it)
    assert skipped == {"000000002#dup": "duplicate_key", "b#dup": "duplicate_key", "badjson": "bad_json",
                       "truncated": "no_rewards:missing_caption;corrupt_image",
                       "emptytxt": "no_rewards:empty_caption",
                       "onlyjson": "no_rewards:missing_txt;missing_caption;missing_image"}
    # 50/50 captions, each with its own rewards and text embedding
    b = next(iter(WebDatasetLoader(str(w / "train"), 8, mode="latent", reward_keys=REWARDS, text_embeddings=True,
                                   caption_source={"txt": 0.5, "long": 0.5}, max_text_len=16, num_workers=0)))
    assert b["latents"].shape[1:] == (4, 4, 4) and b["latents_std"].shape == b["latents"].shape
    assert b["text_embeddings"].shape[1] <= 16 and b["text_embeddings"].shape[2] == 32 and b["rewards"].shape[1] == 3
    assert device_batch(b, "cpu", 16)["text_embeddings"].shape[1:] == (16, 32)  # padded on the device


def test_sidecars_carry_captions_and_rewards_per_caption(pipeline):
    import io

    import numpy as np

    from miro_scale.data.sidecars import iter_members
    from miro_scale.data.tario import load_index

    w, _ = pipeline
    path = str(w / "train" / "00001.tar")
    samples = dict(iter_members(path, load_index(path)))
    s = samples["my photo"]
    assert "jpg" not in s and {"txt", "json", "latent_mean.npy", "latent_std.npy", "text_emb.npy",
                               "text_emb_long.npy"} <= set(s)
    meta = json.loads(s["json"])
    assert isinstance(meta["captions"]["long"], str)  # from the caption stage's sidecar
    assert set(meta["rewards"]) == set(REWARDS) == set(meta["rewards_by_caption"]["long"])
    assert meta["rewards"]["sharpness_score"] == meta["rewards_by_caption"]["long"]["sharpness_score"]  # image-only
    assert meta["reward_bins"]["num_bins"] == 8
    assert np.load(io.BytesIO(s["latent_mean.npy"])).dtype == np.float16
    assert (w / "train" / "00001.idx").exists() is False  # a key with a space: no DALI index, the tar is scanned
    assert (w / "train" / "00000.idx").exists()


def test_trains_on_the_shards_under_torchrun(pipeline):
    w, _ = pipeline
    r = subprocess.run(_torchrun(2) + [str(ROOT / "launchers" / "train.py"), "--config", str(w / "config.json"),
                                       "--engine", "fsdp"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (w / "run" / "checkpoints" / "step_00000002").exists()


def _snapshot(d: Path) -> dict:
    """Every file of a stage's output directory, done records without their timings; run summaries
    (timings, this run's counts) left out."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_dir() or p.name.endswith(".summary.json"):
            continue
        data = p.read_bytes()
        if p.name.endswith(".done.json"):
            rec = json.loads(data)
            rec.pop("timing")
            data = json.dumps(rec, sort_keys=True).encode()
        out[str(p.relative_to(d))] = data
    return out


@pytest.mark.parametrize("stage", ["caption", "encode", "score", "bin", "shard"])
def test_kill_9_mid_stage_then_rerun_gives_identical_outputs(pipeline, stage):
    w, _ = pipeline
    out = w / OUT_DIRS[stage]
    clean = _snapshot(out)
    shutil.rmtree(out)
    cmd = stage_commands(w)[stage]
    # one process this time (the clean run had two): outputs do not depend on the world size
    p = subprocess.Popen([sys.executable, str(ROOT / cmd[0])] + cmd[1:], cwd=ROOT, start_new_session=True,
                         env=dict(ENV, MIRO_SHARD_JOB_DELAY="30"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    while not list(out.glob(f"*.{stage}.done.json")) and p.poll() is None:  # pytest-timeout bounds it
        time.sleep(0.05)
    assert p.poll() is None, p.stderr.read()[-3000:]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert len(list(out.glob(f"*.{stage}.done.json"))) == 1  # killed with shards left to do
    r = run_stage(stage, w, 1)
    assert r.returncode == 0, r.stderr[-3000:]
    again = _snapshot(out)
    assert sorted(again) == sorted(clean)
    for name in clean:
        assert again[name] == clean[name], f"{stage}: {name} differs after kill -9 and rerun"
