"""Checkpoint conversion: training checkpoints -> one deployable model file.

A model file is safetensors holding the MiroFlowModel state dict (fp32 unless asked otherwise),
with the training config in its metadata, so a sampler needs nothing else. Sources:
EMA weights (default) consolidated from every rank's shard, or the raw weights through each
engine's own consolidation tool (DCP's dcp_to_torch_save, DeepSpeed's zero_to_fp32).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional

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


def save_model_file(state: Dict[str, torch.Tensor], path: str | Path, config: Dict,
                    dtype: Optional[torch.dtype] = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"miro_config": json.dumps(config)})
    tmp.replace(path)
    return path


def load_model_file(path: str | Path) -> Dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def model_file_config(path: str | Path) -> MiroConfig:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "miro_config" not in metadata:
        raise KeyError(f"{path} has no 'miro_config' metadata; pass a config explicitly")
    return config_from_dict(json.loads(metadata["miro_config"]))
