"""Atomic checkpoints: write into a temporary directory, rename it into place, then point `latest`
at it (written last, itself atomically). A run killed at any moment leaves either the previous
checkpoint or the new one, never a half-written one that `latest` names."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch

STATE_FILE = "state.pt"
LATEST_FILE = "latest"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(root: str | Path, step: int, state: Dict[str, Any], config: Dict[str, Any],
                    keep: int) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / STATE_FILE)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text_atomic(root / LATEST_FILE, final.name)
    checkpoints = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in checkpoints[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    root = Path(root)
    pointer = root / LATEST_FILE
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which has no {STATE_FILE}")
    return path


def load_checkpoint(path: str | Path) -> Dict[str, Any]:
    file = Path(path) / STATE_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which one
        raise RuntimeError(f"cannot read checkpoint {file}: {err}") from err
