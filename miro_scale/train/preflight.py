"""Checks that fail a training run before it starts a process group or builds a model, each with a
message that names the cause and the config key to change."""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import List, Optional

from miro_scale.config import ConfigError, MiroConfig
from miro_scale.train import checkpoint

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def check_launcher(cfg: MiroConfig) -> None:
    missing = [v for v in LAUNCHER_VARIABLES if v not in os.environ]
    if cfg.engine.kind != "local" and missing:
        raise ConfigError(
            f"engine.kind: {cfg.engine.kind!r} runs one process per device under a launcher, which sets "
            f"{', '.join(missing)}; start it with `torchrun --nproc_per_node N launchers/train.py ...` or "
            f"`deepspeed launchers/train.py ...`, or train in one process with --engine local")


def check_fresh_start(cfg: MiroConfig, resume: bool) -> None:
    """--no-resume into a directory with an earlier run's checkpoints would interleave two runs
    (and prune the old ones); refuse instead of deleting anything."""
    ckpts = Path(cfg.train.output_dir) / "checkpoints"
    found = sorted(p.name for p in ckpts.glob("step_*")) if ckpts.is_dir() else []
    if not resume and (found or (ckpts / checkpoint.LATEST_FILE).exists()):
        raise ConfigError(
            f"train.output_dir: {cfg.train.output_dir} already holds checkpoints of an earlier run "
            f"({', '.join(found[-3:]) or checkpoint.LATEST_FILE}); --no-resume starts a new run, which needs "
            f"its own directory: set train.output_dir to a new path (or drop --no-resume to continue that run)")


def _looks_local(name_or_path: str) -> bool:
    """A path, not a hub id ("org/name")."""
    return name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1


def check_encoders(cfg: MiroConfig) -> None:
    """Encoders the run loads weights for must exist where the config says."""
    needs: List[tuple] = []
    if cfg.data.source == "shards" and not cfg.data.precomputed_text and cfg.text_encoder.kind != "small":
        needs.append(("text_encoder.name_or_path", cfg.text_encoder.name_or_path,
                      "data.precomputed_text is false: captions are encoded while training"))
    if cfg.autoencoder.kind == "sdxl_vae" and ((cfg.data.source == "shards" and cfg.data.mode == "image")
                                               or cfg.train.sample_every):
        needs.append(("autoencoder.name_or_path", cfg.autoencoder.name_or_path,
                      "data.mode is 'image' or train.sample_every decodes previews"))
    for key, value, why in needs:
        if not value or (_looks_local(value) and not Path(value).expanduser().exists()):
            raise ConfigError(f"{key}: {value!r} does not exist ({why}); give the local path of the weights")


def shard_reward_keys(shards: str) -> Optional[List[str]]:
    """Reward keys the data carries: the shard stage's manifest, else the first sample's json."""
    spec = Path(shards)
    manifest = spec / "manifest.json" if spec.is_dir() else None
    if manifest is not None and manifest.exists():
        keys = json.loads(manifest.read_text()).get("reward_keys")
        if keys:
            return list(keys)
    from miro_scale.data import resolve_shards

    for path in resolve_shards(shards)[:1]:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.load(tar.extractfile(member))
                    by_caption = meta.get("rewards_by_caption") or {}
                    return sorted(set(meta.get("rewards") or {}).union(*map(set, by_caption.values())))
    return None


def check_reward_keys(cfg: MiroConfig) -> None:
    """A reward key the data lacks makes every sample fail its reward lookup: the loader would skip
    them all and never yield a batch."""
    if cfg.data.source != "shards" or not cfg.model.reward_keys:
        return
    present = shard_reward_keys(cfg.data.shards)
    absent = [k for k in cfg.model.reward_keys if present is not None and k not in present]
    if absent:
        raise ConfigError(f"model.reward_keys: {absent} are not in the data (data.shards={cfg.data.shards!r} carries "
                          f"{present}); drop them from model.reward_keys or re-run the score/bin/shard stages with them")


def preflight(cfg: MiroConfig, resume: bool) -> None:
    check_launcher(cfg)
    check_fresh_start(cfg, resume)
    check_encoders(cfg)
    check_reward_keys(cfg)
