"""Nothing in a checkpoint is unpickled: a crafted pickle planted where each loader looks (resume,
export, a deployment bundle, a reward model's weights) runs no code, and the error names the file."""
import json
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from miro_scale.config import config_from_dict
from miro_scale.train.checkpoint import STATE_DIR, CheckpointError, split_tensors
from miro_scale.train.trainer import Trainer
from tests.conftest import ROOT, tiny_config_dict

SMALL_TEXT = {"kind": "small", "name_or_path": "", "max_length": 8}


class Payload:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def saved(tmp_path):
    cfg = config_from_dict(tiny_config_dict(text_encoder=SMALL_TEXT, train={"output_dir": str(tmp_path / "run")}))
    trainer = Trainer(cfg)
    trainer.train_step()
    path = trainer.save()
    trainer.release()
    return cfg, path


def test_the_payload_does_run_when_unpickled(tmp_path):
    """The planted files below would run code under pickle.load / torch.load(weights_only=False)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("target", [f"{STATE_DIR}/.metadata", f"{STATE_DIR}/__0_0.distcp", "rank_00000.json",
                                    "trainer.json"])
def test_a_planted_pickle_runs_no_code_on_resume(saved, tmp_path, target):
    cfg, path = saved
    marker = tmp_path / "ran"
    (path / target).write_bytes(pickle.dumps(Payload(marker)))
    named = path / (STATE_DIR if target.endswith(".distcp") else target)  # DCP reads tensors by directory
    with pytest.raises(CheckpointError, match=re.escape(str(named))):
        Trainer(cfg)
    assert not marker.exists()


def test_the_old_pickle_files_are_never_opened(saved, tmp_path):
    """engine.pt and rank_NNNNN.pt (the former format) planted beside a good checkpoint: ignored."""
    cfg, path = saved
    marker = tmp_path / "ran"
    for name in ("engine.pt", "rank_00000.pt", "scheduler.pt"):
        (path / name).write_bytes(pickle.dumps(Payload(marker)))
    assert Trainer(cfg).step == 1
    proc = subprocess.run([sys.executable, "checkpoints_tools/export.py", "--checkpoint", str(path),
                           "--out", str(tmp_path / "bundle")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists()


def export(path, out):
    return subprocess.run([sys.executable, "checkpoints_tools/export.py", "--checkpoint", str(path), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)


def test_export_of_a_planted_metadata_pickle_runs_no_code(saved, tmp_path):
    _, path = saved
    marker = tmp_path / "ran"
    (path / STATE_DIR / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    proc = export(path, tmp_path / "bundle")
    assert proc.returncode == 2 and str(path / STATE_DIR / ".metadata") in proc.stderr, proc.stderr[-2000:]
    assert "posix.system" in proc.stderr
    assert not marker.exists()


def test_export_refuses_a_tensor_stored_as_pickled_bytes(saved, tmp_path):
    """A well-formed DCP directory whose EMA entry is a pickled object (stock DCP would unpickle it
    with weights_only=False)."""
    _, path = saved
    marker = tmp_path / "ran"
    skeleton = json.loads((path / "trainer.json").read_text())["state"]
    victim = skeleton["ema"]["net.latents"]["__tensor__"]
    flat, _ = split_tensors({k: {n: torch.zeros(1) for n in v} for k, v in skeleton.items() if k in ("model", "ema")})
    flat[victim] = Payload(marker)
    forged = tmp_path / "forged"
    dcp.save(flat, checkpoint_id=str(forged), no_dist=True)
    os.rename(path / STATE_DIR, tmp_path / "original")
    os.rename(forged, path / STATE_DIR)
    proc = export(path, tmp_path / "bundle")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{path / STATE_DIR} stores {victim} as pickled bytes" in proc.stderr
    assert not marker.exists()


def planted_files(marker, tmp_path):
    """The payload as a bare pickle and inside a torch.save zip (what torch.load would unpickle)."""
    bare = pickle.dumps(Payload(marker))
    zipped = tmp_path / "zipped.pt"
    torch.save({"weight": Payload(marker)}, zipped)
    return {"bare": bare, "torch.save zip": zipped.read_bytes()}


@pytest.mark.parametrize("name", ["model.pt", "pytorch_model.bin", "open_clip_model.safetensors"])
def test_a_planted_reward_checkpoint_runs_no_code(tmp_path, name):
    from miro_scale.rewards.loading import CheckpointError as RewardCheckpointError, load_state_dict_file

    marker = tmp_path / "ran"
    for kind, payload in planted_files(marker, tmp_path).items():
        target = tmp_path / name
        target.write_bytes(payload)
        with pytest.raises(RewardCheckpointError, match=re.escape(str(target))):
            load_state_dict_file(target)
        assert not marker.exists(), kind


@pytest.mark.parametrize("target", ["model.safetensors", "uncond_embedding.npy", "config.json"])
def test_a_planted_pickle_in_a_bundle_runs_no_code(saved, tmp_path, target):
    from miro_scale.bundle import BundleError, load as load_bundle

    _, path = saved
    bundle = tmp_path / "bundle"
    assert export(path, bundle).returncode == 0
    load_bundle(str(bundle))
    marker = tmp_path / "ran"
    for payload in planted_files(marker, tmp_path).values():
        (bundle / target).write_bytes(payload)
        with pytest.raises(BundleError, match=re.escape(str(bundle / target))):
            load_bundle(str(bundle))
        assert not marker.exists(), target
