"""How the MIRO model (flow.MiroFlowModel around TextRIN) is parallelised, beside the model.

Engines (train/engines.py) and the trainer ask this file which modules to shard, to recompute
and to treat as reward-only; they never name TextRIN's modules themselves (torchtitan's split).
"""
from __future__ import annotations

from typing import List

import torch.nn as nn

CHECKPOINT_WRAPPER_PREFIX = "_checkpoint_wrapped_module."
# Parameters that exist only to condition on rewards: new when post-training starts a
# reward-conditioned model from a baseline bundle (train.init_from).
REWARD_ONLY_PREFIXES = ("net.coherence_embedder.", "net.coherence_positional_embedding")


def canonical_name(name: str) -> str:
    """Parameter name without activation-checkpoint wrapper prefixes (the state-dict name)."""
    return name.replace(CHECKPOINT_WRAPPER_PREFIX, "")


def is_reward_only(name: str) -> bool:
    return canonical_name(name).startswith(REWARD_ONLY_PREFIXES)


def fsdp_units(model: nn.Module) -> List[nn.Module]:
    """Modules FSDP shards as their own units, in forward order (the root takes what is left:
    patch and text embedders, conditioning, output head). Each RIN block is ~1/num_blocks of the
    weights and runs once per forward, so one all-gather per block overlaps with the previous one."""
    return list(model.net.rin_blocks)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each RIN block in backward (torch's checkpoint wrapper, non-reentrant): the blocks
    hold nearly all activations, the cheap embedders and head are kept."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = model.net.rin_blocks
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block)
