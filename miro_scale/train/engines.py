"""Engine adapters: the only code that knows how the model is distributed.

The trainer calls, per optimizer step: `backward(loss, last_micro_batch)` for each micro-batch,
then `step()`; `save(dir)` / `load(dir)` are collective. Model, loss and data are the same under
all three engines:

- LocalEngine: one process (CPU or one GPU).
- FSDP2Engine: torch.distributed.fsdp.fully_shard per RIN block and at the root, bf16 parameters
  with fp32 gradient reduction, gradient sync only on the last micro-batch, DCP checkpoints.
- DeepSpeedEngine: ZeRO stage from the config; DeepSpeed owns gradient reduction, accumulation
  and clipping, and writes its own sharded checkpoints. Stage 0 keeps fp32 parameters with the
  client optimizer untouched (exact LAMB; bf16 comes from the trainer's autocast) and skips
  non-finite steps through the optimizer's .overflow; stages 1-3 (AdamW: ZeRO flattens parameters,
  which LAMB cannot take) use DeepSpeed's bf16 mode, whose overflow check skips them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import torch
import torch.distributed as dist
import torch.nn as nn

from miro_scale.config import MiroConfig
from miro_scale.train.optim import build_optimizer, build_scheduler

CHECKPOINT_WRAPPER_PREFIX = "_checkpoint_wrapped_module."
ENGINE_DIR = "engine"


@dataclass
class StepResult:
    grad_norm: float
    skipped: bool


def canonical_name(name: str) -> str:
    """Parameter name without activation-checkpoint wrapper prefixes (the state-dict name)."""
    return name.replace(CHECKPOINT_WRAPPER_PREFIX, "")


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each RIN block in backward (torch's checkpoint wrapper, non-reentrant)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = model.net.rin_blocks
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block)


class LocalEngine:
    name = "local"

    def __init__(self, model: nn.Module, cfg: MiroConfig, accumulation: int):
        self.cfg = cfg
        self.accumulation = accumulation
        if cfg.engine.activation_checkpointing:
            apply_activation_checkpointing(model)
        self.module = self._wrap(model)
        self.optimizer = build_optimizer(self.module, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)

    def _wrap(self, model: nn.Module) -> nn.Module:
        return model

    @property
    def forward_module(self) -> nn.Module:
        return self.module

    def local_parameters(self) -> Dict[str, torch.Tensor]:
        """This rank's view of every parameter (the whole tensor, or its shard), by canonical name."""
        return {canonical_name(n): p for n, p in self.module.named_parameters()}

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        (loss / self.accumulation).backward()

    def _grad_norm(self) -> torch.Tensor:
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.cfg.optim.grad_clip
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    def step(self) -> StepResult:
        norm = self._grad_norm()
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        skipped = not math.isfinite(norm)
        if not skipped:  # like DeepSpeed: a skipped step advances neither weights nor schedule
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm, skipped)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, path: Path) -> None:
        torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict()}, path / f"{ENGINE_DIR}.pt")

    def load(self, path: Path) -> None:
        state = torch.load(path / f"{ENGINE_DIR}.pt", map_location="cpu", weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class FSDP2Engine(LocalEngine):
    name = "fsdp"

    def _wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
        policy = MixedPrecisionPolicy(param_dtype=dtypes[self.cfg.engine.fsdp_param_dtype],
                                      reduce_dtype=dtypes[self.cfg.engine.fsdp_reduce_dtype])
        reshard = self.cfg.engine.fsdp_reshard_after_forward
        for block in model.net.rin_blocks:
            fully_shard(block, mp_policy=policy, reshard_after_forward=reshard)
        fully_shard(model, mp_policy=policy, reshard_after_forward=reshard)
        return model

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        # Reduce-scatter gradients once per optimizer step, not once per micro-batch.
        self.module.set_requires_gradient_sync(last_micro_batch)
        super().backward(loss, last_micro_batch)

    def _state(self) -> Dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        return {"model": model_state, "optimizer": optim_state}

    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(path / ENGINE_DIR))
        if dist.get_rank() == 0:
            torch.save(self.scheduler.state_dict(), path / "scheduler.pt")

    def load(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(path / ENGINE_DIR))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, model: nn.Module, cfg: MiroConfig, accumulation: int):
        import deepspeed

        self.cfg = cfg
        if cfg.engine.activation_checkpointing:
            apply_activation_checkpointing(model)
        zero = cfg.engine.zero_stage
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
            "gradient_accumulation_steps": accumulation,
            "train_batch_size": cfg.train.global_batch_size,
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": {"stage": zero},
            "bf16": {"enabled": zero >= 1 and cfg.train.precision == "bf16"},
            "steps_per_print": 10 ** 9,
        }
        optimizer = build_optimizer(model, cfg.optim, skip_non_finite=zero == 0)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: build_scheduler(opt, cfg.optim, cfg.train.steps))
        self.module = self.engine.module
        self._skipped_before = 0

    @property
    def forward_module(self) -> nn.Module:
        return self.engine

    def local_parameters(self) -> Dict[str, torch.Tensor]:
        # ZeRO-3 keeps only this rank's partition in ds_tensor; stages 0-2 keep whole parameters.
        return {canonical_name(n): getattr(p, "ds_tensor", p) for n, p in self.module.named_parameters()}

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        self.engine.backward(loss)  # DeepSpeed scales by 1/accumulation itself
        if not last_micro_batch:
            self.engine.step()  # only counts the micro-batch; the update happens at the boundary

    def step(self) -> StepResult:
        stage0_norm = None
        if self.cfg.engine.zero_stage == 0:  # whole, already averaged gradients: DeepSpeed reports no norm
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            stage0_norm = float(torch.nn.utils.get_total_norm(grads))
        self.engine.step()
        norm = stage0_norm if stage0_norm is not None else self.engine.get_global_grad_norm()
        skipped = self.engine.skipped_steps > self._skipped_before
        self._skipped_before = self.engine.skipped_steps
        return StepResult(float("nan") if norm is None else float(norm), skipped)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag=ENGINE_DIR, save_latest=False)

    def load(self, path: Path) -> None:
        load_path, _ = self.engine.load_checkpoint(str(path), tag=ENGINE_DIR)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path / ENGINE_DIR}")
        self._skipped_before = self.engine.skipped_steps


ENGINES = {"local": LocalEngine, "fsdp": FSDP2Engine, "deepspeed": DeepSpeedEngine}


def build_engine(model: nn.Module, cfg: MiroConfig, accumulation: int):
    return ENGINES[cfg.engine.kind](model, cfg, accumulation)
