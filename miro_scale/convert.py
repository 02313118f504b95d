"""Checkpoint conversion: training checkpoints -> a deployable model bundle (miro_scale/bundle.py).

Sources: EMA weights (default) consolidated from every rank's shard, or the raw weights through
each engine's own consolidation tool (DCP's dcp_to_torch_save, DeepSpeed's zero_to_fp32). The
bundle also holds the empty-prompt embedding of the config's text encoder (the negative branch of
guidance), computed here once.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from miro_scale.config import MiroConfig, config_from_dict
from miro_scale.train.checkpoint import load_rank_state, read_trainer_state
from miro_scale.train.engines import ENGINE_DIR


def checkpoint_config(path: Path) -> MiroConfig:
    return config_from_dict(json.loads((Path(path) / "config.json").read_text()))


def _meta_shapes(cfg: MiroConfig) -> Dict[str, torch.Size]:
    from miro_scale.models.flops import build_meta_model

    return {n: p.shape for n, p in build_meta_model(cfg).named_parameters()}


def consolidate_ema(path: str | Path) -> Dict[str, torch.Tensor]:
    """Full EMA parameters (and the model's buffers) from a checkpoint of any engine and world size."""
    path = Path(path)
    cfg, world = checkpoint_config(path), read_trainer_state(path)["world_size"]
    states = [load_rank_state(path, r) for r in range(world)]
    shards = [state["ema"] for state in states]
    shapes = _meta_shapes(cfg)
    full = {}
    for name, shape in shapes.items():
        parts = [s[name] for s in shards]
        if cfg.engine.kind == "fsdp":  # dim-0 chunks in rank order
            tensor = torch.cat(parts, dim=0)
        elif cfg.engine.kind == "deepspeed" and cfg.engine.zero_stage == 3:  # flat, padded partitions
            tensor = torch.cat([p.reshape(-1) for p in parts])[: math.prod(shape)]
        else:  # whole tensors on every rank
            tensor = parts[0]
        full[name] = tensor.reshape(shape).float().clone()
    full.update(states[0]["buffers"])
    return full


def consolidate_raw(path: str | Path) -> Dict[str, torch.Tensor]:
    """The trained (non-EMA) weights, through each engine's own consolidation."""
    path = Path(path)
    cfg = checkpoint_config(path)
    if cfg.engine.kind == "local":
        return torch.load(path / f"{ENGINE_DIR}.pt", map_location="cpu", weights_only=False)["model"]
    if cfg.engine.kind == "fsdp":
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(path / ENGINE_DIR, Path(tmp) / "full.pt")
            return torch.load(Path(tmp) / "full.pt", weights_only=False)["model"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=ENGINE_DIR)


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
    state = consolidate_ema(checkpoint) if weights == "ema" else consolidate_raw(checkpoint)
    return bundle.save(out, cfg, state, uncond, dtype)
