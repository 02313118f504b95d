"""Checkpoint conversion: training checkpoints -> a deployable model bundle (miro_scale/bundle.py).

Every engine writes the same checkpoint (train/checkpoint.py: a DCP directory of named tensors),
so conversion reads whole tensors from it in one process, whatever engine and world size wrote
it: the EMA weights (default) or the raw ones, and the model's buffers. The bundle also holds the
empty-prompt embedding of the config's text encoder (the negative branch of guidance), computed
here once.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from miro_scale.config import MiroConfig, config_from_dict
from miro_scale.train.checkpoint import checkpoint_tensors, load_state, read_trainer_state


def checkpoint_config(path: Path) -> MiroConfig:
    return config_from_dict(json.loads((Path(path) / "config.json").read_text()))


def consolidate(path: str | Path, weights: str = "ema") -> Dict[str, torch.Tensor]:
    """Whole fp32 weights ("ema" or "raw") and the model's buffers from a checkpoint."""
    path = Path(path)
    stored = checkpoint_tensors(path)
    skeleton = read_trainer_state(path)["state"]
    wanted = {section: {name: torch.empty(tuple(md.size), dtype=md.properties.dtype)
                        for name in skeleton[section] if (md := stored.get(f"{section}.{name}")) is not None}
              for section in ("model", "ema")}
    state = load_state(path, wanted, {s: skeleton[s] for s in wanted})
    full = dict(state["model"])
    if weights == "ema":  # parameters from the EMA; buffers (not averaged) from the model
        full.update(state["ema"])
    return {name: tensor.float() for name, tensor in full.items()}


def empty_prompt_embedding(cfg: MiroConfig) -> np.ndarray:
    """The config's text encoder on "" at the sampling length, trimmed to its tokens: [L, D]
    (FLAN-T5-XL: the single </s> token, as the release's uncond_embedding.npy)."""
    from miro_scale.models.encoders import text_encoder_from_config

    encoder = text_encoder_from_config(cfg, "cpu", cfg.sampling.max_text_len)
    with torch.no_grad():
        embedding, mask = encoder.encode([""])
    return embedding[0, mask[0]].float().numpy()


def export_bundle(checkpoint: str | Path, out: str | Path, weights: str = "ema",
                  dtype: Optional[torch.dtype] = None, text_encoder: Optional[str] = None) -> Path:
    """``text_encoder``: where the config's text encoder is now (a local path or hub id), when it
    moved since training; the bundle records it."""
    from miro_scale import bundle

    checkpoint = Path(checkpoint)
    cfg = checkpoint_config(checkpoint)
    if text_encoder:
        cfg.text_encoder.name_or_path = text_encoder
    try:
        uncond = empty_prompt_embedding(cfg)
    except OSError as e:
        raise FileNotFoundError(f"the bundle needs the empty-prompt embedding of text_encoder.name_or_path="
                                f"{cfg.text_encoder.name_or_path!r}, which cannot be loaded ({str(e).splitlines()[0]}); "
                                "give its local path with --text-encoder") from None
    state = consolidate(checkpoint, weights)
    return bundle.save(out, cfg, state, uncond, dtype)
