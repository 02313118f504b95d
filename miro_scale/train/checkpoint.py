"""Atomic checkpoints, written by every rank together.

Layout of one checkpoint, root/step_{N:08d}/:
    engine*            the engine's model + optimizer (+ scheduler) state, possibly sharded
    rank_{r:05d}.pt    each rank's own state: EMA (its shard), RNG states, data position
    trainer.json       step and counters (rank 0)
    config.json        the config that produced it
Everything is written into root/.tmp_step_N first; rank 0 renames it into place once all ranks
are done, then points root/latest at it (written last, atomically). A run killed at any moment
leaves either the previous checkpoint or the new one, never a half-written one that `latest` names.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from miro_scale.atomic import write_text_atomic

LATEST_FILE = "latest"
TRAINER_FILE = "trainer.json"


def staging_dir(root: Path, step: int) -> Path:
    return root / f".tmp_step_{step:08d}"


def rank_file(path: Path, rank: int) -> Path:
    return path / f"rank_{rank:05d}.pt"


def prepare_staging(root: Path, step: int) -> Path:
    """Rank 0 only: an empty staging directory for this step."""
    tmp = staging_dir(root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(root: Path, step: int, trainer_state: Dict[str, Any], config: Dict[str, Any], keep: int) -> Path:
    """Rank 0 only, after every rank has written into the staging directory."""
    tmp, final = staging_dir(root, step), root / f"step_{step:08d}"
    (tmp / TRAINER_FILE).write_text(json.dumps(trainer_state))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if final.exists():  # the same step saved again (a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / LATEST_FILE, final.name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    root = Path(root)
    pointer = root / LATEST_FILE
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / TRAINER_FILE).exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which has no {TRAINER_FILE}")
    return path


def read_trainer_state(path: Path) -> Dict[str, Any]:
    return json.loads((path / TRAINER_FILE).read_text())


def load_rank_state(path: Path, rank: int) -> Dict[str, Any]:
    file = rank_file(path, rank)
    if not file.exists():
        raise FileNotFoundError(f"{file} is missing: this checkpoint was written by fewer ranks; resume with "
                                f"the world size it was saved with")
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which one
        raise RuntimeError(f"cannot read checkpoint file {file}: {err}") from err
