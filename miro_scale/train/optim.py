"""LAMB, its warmup-cosine schedule, and the EMA of the weights.

LAMB comes from timm (maintained, multi-tensor). Configured as released: bias-corrected moments,
L2 weight decay added to the Adam step before the trust ratio (timm's default, non-decoupled),
no trust-ratio clipping, no optimizer-side global clipping (the trainer clips), and the trust ratio
applied only where weight decay is on. The groups are the release's: parameters of LayerNorm and
RMSNorm modules and those named "bias" get neither; every other parameter of the network, the
plain nn.Parameters included (learned latents, positional embeddings, registers, layer scales),
and the whole loss-weighting head get both. The schedule's first update uses the full rate, as the
release's did (Lightning steps its scheduler after the first optimizer step).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.optim import Lamb

from miro_scale.config import OptimConfig
from miro_scale.models.textrin import RMSNorm


NO_DECAY_MODULES = (nn.LayerNorm, nn.Embedding, RMSNorm)


def parameter_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """The release's two groups: decayed (and trust-ratio scaled), and neither: parameters of norm
    and embedding modules and any name containing "bias", except in the loss-weighting head
    (``logvar_proj``, the release's preconditioning module), which is decayed whole."""
    decay, no_decay = [], []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            excluded = isinstance(module, NO_DECAY_MODULES) or "bias" in name
            (no_decay if excluded and not name.startswith("logvar_proj.") else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class SkipNonFinite:
    """Optimizer mixin: step() does nothing and sets .overflow when a gradient is non-finite.

    DeepSpeed (ZeRO stage 0, no DeepSpeed mixed precision) reads .overflow to count the step as
    skipped and hold the schedule, as its own fp16/bf16 optimizers do.
    """

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.overflow = bool(grads) and not torch.isfinite(torch.nn.utils.get_total_norm(grads)).item()
        if self.overflow:
            return None
        return super().step(closure)


class GuardedLamb(SkipNonFinite, Lamb):
    pass


class GuardedAdamW(SkipNonFinite, torch.optim.AdamW):
    pass


# (index of the parameter in its group, start in the flat partition, length): one parameter's slice
Segment = Tuple[int, int, int]


class ShardedLamb(Lamb):
    """LAMB on ZeRO's flat fp32 partitions, exactly as on whole parameters.

    DeepSpeed ZeRO 1-3 hand the optimizer one flat partition per group per rank. The Adam part is
    elementwise and runs on it as it is; the trust ratio ||w|| / ||update|| is per parameter, so
    each rank sums the squares of its slices of each parameter, the partial sums are all-reduced
    over the data-parallel group (one all-reduce per group and step), and every slice is scaled by
    its parameter's ratio (ColossalAI's distributed LAMB does the same for ZeRO-2). `shard()` gives
    the slices once DeepSpeed has built its partitions. Same hyperparameters as timm's Lamb, whose
    state layout (group "step", exp_avg, exp_avg_sq) it keeps; the options the recipe leaves off
    (max_grad_norm, trust_clip, caution, decoupled decay) are refused.
    """

    def shard(self, partitions: Dict[int, Tuple[int, List[Segment]]], sizes: List[int],
              group: Optional[dist.ProcessGroup]) -> None:
        """partitions: id(flat partition) -> (its parameter group, the parameters' slices in it);
        sizes: parameters per group."""
        for g in self.param_groups:
            if g["max_grad_norm"] is not None or g["trust_clip"] or g["caution"] or g.get("decoupled_decay"):
                raise ValueError("ShardedLamb supports the release's LAMB only (no max_grad_norm, trust_clip, "
                                 "caution or decoupled decay)")
        self.partitions, self.sizes, self.group = partitions, sizes, group

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            flats = [p for p in group["params"] if p.grad is not None]
            if not flats:  # ZeRO-3 steps one group at a time, the others empty
                continue
            group.setdefault("step", torch.tensor(0.0))
            group["step"].add_(1)
            step = group["step"].item()
            beta1, beta2 = group["betas"]
            bc1, bc2 = (1 - beta1 ** step, 1 - beta2 ** step) if group["bias_correction"] else (1.0, 1.0)
            beta3 = 1 - beta1 if group["grad_averaging"] else 1.0
            wd, adapt = group["weight_decay"], group["weight_decay"] != 0 or group["always_adapt"]
            updates = []
            for p in flats:
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if beta3 == 1 - beta1:
                    m.lerp_(p.grad, beta3)
                else:
                    m.mul_(beta1).add_(p.grad, alpha=beta3)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (m / bc1).div_((v.sqrt() / bc2 ** 0.5).add_(group["eps"]))
                if wd != 0:
                    update.add_(p, alpha=wd)
                updates.append(update)
            if adapt:
                # ZeRO 1/2 step with param_groups cut to the group being stepped: its flats say which.
                size = self.sizes[self.partitions[id(flats[0])][0]]
                sums = torch.zeros(2, size, dtype=torch.float64, device=flats[0].device)
                for p, update in zip(flats, updates):
                    for i, start, n in self.partitions[id(p)][1]:
                        sums[0, i] += p.narrow(0, start, n).double().square().sum()
                        sums[1, i] += update.narrow(0, start, n).double().square().sum()
                dist.all_reduce(sums, group=self.group)
                w_norm, u_norm = sums.sqrt().float()
                ratio = torch.where(w_norm > 0, torch.where(u_norm > 0, w_norm / u_norm, 1.0), 1.0)
                for p, update in zip(flats, updates):
                    for i, start, n in self.partitions[id(p)][1]:
                        update.narrow(0, start, n).mul_(ratio[i])
            for p, update in zip(flats, updates):
                p.add_(update, alpha=-group["lr"])
        return None


def build_optimizer(model: nn.Module, cfg: OptimConfig, skip_non_finite: bool = False,
                    partitioned: bool = False) -> torch.optim.Optimizer:
    """partitioned: the optimizer will see DeepSpeed ZeRO's flat partitions (LAMB then needs shard())."""
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.name == "lamb":
        cls = ShardedLamb if partitioned else GuardedLamb if skip_non_finite else Lamb
        return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, max_grad_norm=None,
                   trust_clip=False, always_adapt=False)
    cls = GuardedAdamW if skip_non_finite else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, cosine_rate: float) -> float:
    """The full rate at step 0 (as released), linear warmup from step 1, then
    0.5 * (1 + cos(rate * pi * progress)) (rate 0.8 ends at ~0.095)."""
    if step == 0:
        return 1.0
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(cosine_rate * math.pi * min(progress, 1.0)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg.warmup_steps, total_steps, cfg.cosine_rate))


class EMA:
    """Exponential moving average of parameters, kept in fp32, keyed by parameter name.

    It is given each rank's local view of the parameters (whole tensors, DTensor shards under
    FSDP2, ZeRO-3 partitions) and only does elementwise work, so every engine can use it and
    each rank averages exactly what it holds.
    """

    def __init__(self, params: Dict[str, torch.Tensor], decay: float, start_step: int = 0):
        self.decay = decay
        self.start_step = start_step
        self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, params: Dict[str, torch.Tensor], step: int) -> None:
        decay = 0.0 if step < self.start_step else self.decay
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach().float() for n in names],
                             1.0 - decay)

    @torch.no_grad()
    def copy_to(self, params: Dict[str, torch.Tensor]) -> None:
        for name, param in params.items():
            param.copy_(self.shadow[name].to(param.dtype))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        differing = set(self.shadow) ^ set(state)
        if differing:
            raise KeyError(f"EMA state does not match the model; differing keys: {sorted(differing)[:5]}")
        for name, value in state.items():
            self.shadow[name].copy_(value)


