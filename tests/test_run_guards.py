"""A run fails fast with a message naming the cause and the config key, and owns its directory:
--no-resume into a used directory, a second writer, a full disk, no launcher, missing encoder
weights, reward keys the data lacks."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from miro_scale.config import ConfigError, config_from_dict
from miro_scale.train.checkpoint import latest_checkpoint
from miro_scale.train.ownership import OWNER_FILE, RunOwnedError, RunOwner
from miro_scale.train.preflight import check_encoders, check_launcher, check_reward_keys
from miro_scale.train.trainer import Trainer
from tests.conftest import ROOT, tiny_config_dict

ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def train_cli(tmp_path, *args, **sections):
    sections.setdefault("train", {})
    sections["train"] = {"output_dir": str(tmp_path / "run"), "steps": 2, **sections["train"]}
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(tiny_config_dict(**sections)))
    return subprocess.run([sys.executable, "launchers/train.py", "--config", str(cfg), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)


def test_no_resume_into_a_used_directory_refuses_and_keeps_the_checkpoints(tmp_path):
    assert train_cli(tmp_path).returncode == 0
    before = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    proc = train_cli(tmp_path, "--no-resume")
    assert proc.returncode == 2
    assert "train.output_dir" in proc.stderr and "already holds checkpoints" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == before
    assert latest_checkpoint(tmp_path / "run/checkpoints").name == "step_00000002"
    assert not (tmp_path / "run" / OWNER_FILE).exists()  # the finished run gave the directory up


def test_a_second_writer_is_refused_while_the_owner_lives(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        from miro_scale.train.ownership import _start_time

        (run_dir / OWNER_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": owner.pid,
                                                      "pid_start": _start_time(owner.pid), "started": "then"}))
        proc = train_cli(tmp_path)
        assert proc.returncode == 3
        assert f"in use by pid {owner.pid}" in proc.stderr and "train.output_dir" in proc.stderr
        assert not (run_dir / "checkpoints").exists()
    finally:
        owner.communicate(b"")
    # Its process gone, the file is stale and the next run takes the directory over.
    assert train_cli(tmp_path).returncode == 0


def test_a_reused_pid_does_not_keep_a_stale_owner(tmp_path):
    (tmp_path / OWNER_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": os.getppid(),
                                                   "pid_start": "not-its-start-time", "started": "then"}))
    RunOwner(tmp_path).release()
    assert not (tmp_path / OWNER_FILE).exists()


COMMIT_GUARD = """
import subprocess, sys
from miro_scale.train import ownership
launcher = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
ownership._launchers[:] = [(launcher.pid, ownership._start_time(launcher.pid))]
ownership.die_if_orphaned()
print("alive while the launcher lives", flush=True)
launcher.communicate(b"")
ownership.die_if_orphaned()
print("committed after the launcher died", flush=True)
"""


def test_the_commit_guard_ends_a_rank_whose_launcher_is_gone():
    """The check the trainer makes right before a checkpoint commit (the watch thread may lag)."""
    proc = subprocess.run([sys.executable, "-c", COMMIT_GUARD], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout.splitlines() == ["alive while the launcher lives"]


def test_another_hosts_owner_is_not_guessed_at(tmp_path):
    (tmp_path / OWNER_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
    with pytest.raises(RunOwnedError, match="another host"):
        RunOwner(tmp_path)


def test_a_requeued_slurm_job_takes_its_directory_back_on_another_node(tmp_path, monkeypatch):
    """#SBATCH --requeue restarts the job on any node once its first allocation ended; the same job's
    other steps (same restart count) and other jobs stay refused."""
    earlier = {"host": "node-a", "pid": 1, "started": "then", "slurm_job_id": "77", "slurm_restart_count": None}
    (tmp_path / OWNER_FILE).write_text(json.dumps(earlier))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    with pytest.raises(RunOwnedError, match="another host"):
        RunOwner(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(RunOwnedError, match="another host"):
        RunOwner(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    owner = RunOwner(tmp_path)
    assert json.loads((tmp_path / OWNER_FILE).read_text())["slurm_restart_count"] == "1"
    owner.release()


@pytest.mark.parametrize("sbatch", sorted((ROOT / "launchers/slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_sbatch_files_signal_every_rank_and_shield_the_launcher(sbatch):
    """The step form of --signal (no B:) reaches the ranks; the launcher ignores SIGUSR1 across exec
    (torchrun would die of it mid-checkpoint); a requeued job resumes; the script parses."""
    text = sbatch.read_text()
    assert "#SBATCH --signal=USR1@" in text and "B:USR1" not in text
    assert "#SBATCH --requeue" in text
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert """bash -c 'trap "" USR1; exec "$@"'""" in srun
    config = next(word for word in text.split() if word.startswith("configs/"))
    assert (ROOT / config).is_file(), config
    assert subprocess.run(["bash", "-n", str(sbatch)]).returncode == 0


def saved_then_stepped(tmp_path) -> Trainer:
    """A trainer with its step-1 checkpoint written and one more step taken."""
    trainer = Trainer(config_from_dict(tiny_config_dict(train={"output_dir": str(tmp_path / "run")})))
    trainer.train_step()
    trainer.save()
    trainer.train_step()
    return trainer


def test_a_full_disk_during_a_checkpoint_names_the_cause_and_keeps_the_last_one(tmp_path, monkeypatch):
    trainer = saved_then_stepped(tmp_path)

    def full(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("torch.distributed.checkpoint.filesystem.os.fsync", full)
    with pytest.raises(OSError, match=r"no space left on the device while writing checkpoint .*train.output_dir"):
        trainer.save()
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "run/checkpoints").name == "step_00000001"
    assert Trainer(trainer.cfg).step == 1


@pytest.mark.parametrize("failing", ["rank state", "trainer.json"])
def test_a_full_disk_after_the_tensors_names_the_cause_too(tmp_path, monkeypatch, failing):
    trainer = saved_then_stepped(tmp_path)
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith("rank_" if failing == "rank state" else "trainer"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match=r"no space left on the device while writing checkpoint .*train.output_dir"):
        trainer.save()
    monkeypatch.undo()
    trainer.release()
    assert latest_checkpoint(tmp_path / "run/checkpoints").name == "step_00000001"


def test_sharded_engines_need_a_launcher(tmp_path):
    proc = train_cli(tmp_path, "--engine", "fsdp")
    assert proc.returncode == 2
    assert "engine.kind: 'fsdp' runs one process per device under a launcher" in proc.stderr
    assert "RANK" in proc.stderr and "torchrun" in proc.stderr
    with pytest.raises(ConfigError, match="engine.kind: 'deepspeed'"):
        check_launcher(config_from_dict(tiny_config_dict(engine={"kind": "deepspeed", "zero_stage": 0})))


def test_missing_encoder_weights_are_named(tmp_path):
    cfg = config_from_dict(tiny_config_dict(data={"source": "shards", "shards": str(tmp_path), "precomputed_text": False},
                                            text_encoder={"kind": "t5", "name_or_path": str(tmp_path / "flan-t5-xl")}))
    with pytest.raises(ConfigError, match=r"text_encoder.name_or_path: '.*flan-t5-xl' does not exist"):
        check_encoders(cfg)
    cfg = config_from_dict(tiny_config_dict(train={"sample_every": 10},
                                            autoencoder={"kind": "sdxl_vae", "name_or_path": "./weights/vae"}))
    with pytest.raises(ConfigError, match="autoencoder.name_or_path: './weights/vae' does not exist"):
        check_encoders(cfg)
    check_encoders(config_from_dict(tiny_config_dict()))  # hub ids and weightless encoders pass


def test_reward_keys_absent_from_the_data_are_named(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"reward_keys": ["clip_score", "aesthetic_score"]}))
    cfg = config_from_dict(tiny_config_dict(data={"source": "shards", "shards": str(tmp_path)}))
    with pytest.raises(ConfigError, match=r"model.reward_keys: \['image_reward_score'\] are not in the data"):
        check_reward_keys(cfg)


def test_reward_keys_are_read_from_a_sample_without_a_manifest(tmp_path):
    from miro_scale.data import ShardWriter

    with ShardWriter(str(tmp_path)) as writer:
        writer.write("a", {"txt": b"x", "json": json.dumps({"rewards": {"clip_score": 0.5}}).encode()})
    (tmp_path / "manifest.json").unlink(missing_ok=True)
    cfg = config_from_dict(tiny_config_dict(data={"source": "shards", "shards": str(tmp_path)}))
    with pytest.raises(ConfigError, match=r"\['aesthetic_score', 'image_reward_score'\] are not in the data"):
        check_reward_keys(cfg)
