"""LAMB, its warmup-cosine schedule, and the EMA of the weights.

LAMB is the release's (timm's Lamb as configured there: bias-corrected moments, L2 weight decay
added to the Adam step before the trust ratio, no trust-ratio clipping, no optimizer-side global
clipping (the trainer clips), the trust ratio only where weight decay is on), written here on
torch's foreach ops because the trust ratio's norms must be reduced in one collective when the
parameters are sharded (FSDP2 DTensors, ZeRO partitions) and a non-finite step must be skipped on
the device; timm's Lamb is the reference it is tested against. The groups are the release's:
parameters of LayerNorm and RMSNorm modules and those named "bias" get neither decay nor trust
ratio; every other parameter of the network, the plain nn.Parameters included (learned latents,
positional embeddings, registers, layer scales), and the whole loss-weighting head get both. The schedule's first update uses the full rate, as the
release's did (Lightning steps its scheduler after the first optimizer step).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

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


# (index of the parameter in its group, start in the flat partition, length): one parameter's slice
Segment = Tuple[int, int, int]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class Lamb(torch.optim.Optimizer):
    """LAMB with each group's trust-ratio norms in one reduction, whatever holds the parameters.

    - whole tensors (one process, DeepSpeed ZeRO-0): per-parameter norms, no communication;
    - FSDP2 DTensor shards: each rank's squared norms of its shards, summed in one all-reduce per
      group over the mesh (per-tensor DTensor norms would be one all-reduce per parameter);
    - DeepSpeed ZeRO 1-3 flat partitions: `shard()` says which slices of which parameters a
      partition holds; each rank sums the squares of its slices per parameter and one all-reduce
      per group completes them (ColossalAI's distributed LAMB does the same for ZeRO-2).

    Every step is a fixed number of foreach ops, however many parameters (on ZeRO partitions, plus
    a loop over each partition's slices for the trust ratio). A non-finite step is
    skipped on the device as torch's fused optimizers do (`_step_supports_amp_scaling`: the caller
    sets `found_inf`, a 0-dim tensor; where it is 1, weights, moments and the step count stay as they
    were), so the host never waits. The state layout is timm's (group "step", exp_avg, exp_avg_sq).
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, bias_correction: bool = True, grad_averaging: bool = True):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction, grad_averaging=grad_averaging))
        self.found_inf: Optional[torch.Tensor] = None
        self.locate: Optional[Callable[[torch.Tensor], Tuple[int, List[Segment]]]] = None
        self.sizes: List[int] = []
        self.group: Optional[dist.ProcessGroup] = None

    def shard(self, locate: Callable[[torch.Tensor], Tuple[int, List[Segment]]], sizes: List[int],
              group: Optional[dist.ProcessGroup]) -> None:
        """For ZeRO's flat partitions. locate: a flat partition being stepped -> (its parameter
        group, the parameters' slices in it), looked up when stepping because ZeRO may replace its
        flat tensors after initialisation (and steps with param_groups cut to one partition);
        sizes: parameters per group; group: the data-parallel group."""
        self.locate, self.sizes, self.group = locate, sizes, group

    @torch.no_grad()
    def step(self, closure=None):
        keep = None if self.found_inf is None else 1.0 - self.found_inf.float()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:  # ZeRO-3 steps one group at a time, the others empty
                continue
            weights, grads = [_local(p) for p in params], [_local(p.grad) for p in params]
            device = weights[0].device
            if "step" not in group:
                group["step"] = torch.zeros((), dtype=torch.float32, device=device)
            step = group["step"] = group["step"].to(device)
            beta1, beta2 = group["betas"]
            beta3 = 1 - beta1 if group["grad_averaging"] else 1.0
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            exp_avg = [_local(self.state[p]["exp_avg"]) for p in params]
            exp_avg_sq = [_local(self.state[p]["exp_avg_sq"]) for p in params]
            if keep is None:
                step.add_(1)
                decay1, decay2 = beta1, beta2
            else:
                # g ** keep is g or 1 (NaN ** 0 == 1), then * keep: g, or 0 on a skipped step, so that
                # no NaN reaches the moments; the decays become 1 and the step count holds.
                # (a list exponent: a 0-dim tensor one would be read on the host as a Scalar)
                grads = torch._foreach_mul(torch._foreach_pow(grads, [keep.expand_as(g) for g in grads]), keep)
                step.add_(keep)
                decay1, decay2 = 1 - (1 - beta1) * keep, 1 - (1 - beta2) * keep
            torch._foreach_mul_(exp_avg, decay1)
            torch._foreach_add_(exp_avg, grads, alpha=beta3)
            torch._foreach_mul_(exp_avg_sq, decay2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
            if group["bias_correction"]:
                counted = step.clamp(min=1)  # a skipped first step: finite (then zeroed) updates, not 0/0
                bc1, bc2_sqrt = 1 - beta1 ** counted, (1 - beta2 ** counted).sqrt()
            else:
                bc1, bc2_sqrt = torch.ones((), device=device), torch.ones((), device=device)
            denom = torch._foreach_sqrt(exp_avg_sq)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, group["eps"])
            updates = torch._foreach_div(exp_avg, bc1)
            torch._foreach_div_(updates, denom)
            scale = -group["lr"] if keep is None else -group["lr"] * keep
            if group["weight_decay"] == 0:
                torch._foreach_mul_(updates, scale)
                torch._foreach_add_(weights, updates)
                continue
            torch._foreach_add_(updates, weights, alpha=group["weight_decay"])
            located = None if self.locate is None else [self.locate(w) for w in weights]
            step_sizes = self._trust_ratios(weights, updates, params, located) * scale
            if located is None:
                # per-tensor factors have no foreach fast path; addcmul is one op per tensor, as in timm
                torch._foreach_addcmul_(weights, updates, list(step_sizes.unbind()))
            else:
                for w, update, (_, segments) in zip(weights, updates, located):
                    for i, start, n in segments:
                        update.narrow(0, start, n).mul_(step_sizes[i])
                    w.add_(update)
        return None

    def _trust_ratios(self, weights: List[torch.Tensor], updates: List[torch.Tensor], params: List[torch.Tensor],
                      located: Optional[List[Tuple[int, List[Segment]]]]) -> torch.Tensor:
        """||w|| / ||update|| per parameter (1 where either is 0), from this rank's pieces."""
        if located is None:
            sums = torch.stack([torch.stack(torch._foreach_norm(weights)),
                                torch.stack(torch._foreach_norm(updates))]).double().square()
            if isinstance(params[0], DTensor):  # FSDP2: every parameter sharded over one mesh
                dist.all_reduce(sums, group=params[0].device_mesh.get_group())
        else:
            sums = torch.zeros(2, self.sizes[located[0][0]], dtype=torch.float64, device=weights[0].device)
            for w, update, (_, segments) in zip(weights, updates, located):
                for i, start, n in segments:
                    sums[0, i] += w.narrow(0, start, n).double().square().sum()
                    sums[1, i] += update.narrow(0, start, n).double().square().sum()
            dist.all_reduce(sums, group=self.group)
        w_norm, u_norm = sums.sqrt().float()
        return torch.where(w_norm > 0, torch.where(u_norm > 0, w_norm / u_norm, 1.0), 1.0)


class SkipNonFinite:
    """Optimizer mixin for DeepSpeed ZeRO-0, which reads .overflow on the host to count a step as
    skipped and hold the schedule, as its own fp16/bf16 optimizers do: the engine sets `non_finite`
    (a 0-dim tensor) from the norm it clipped with, and step() does nothing and sets .overflow where
    it is true (one host sync per step, which DeepSpeed's host-side skip needs)."""

    overflow = False
    non_finite: Optional[torch.Tensor] = None

    @torch.no_grad()
    def step(self, closure=None):
        self.overflow = bool(self.non_finite)
        if self.overflow:
            return None
        return super().step(closure)


class GuardedLamb(SkipNonFinite, Lamb):
    pass


class GuardedAdamW(SkipNonFinite, torch.optim.AdamW):
    pass


def build_optimizer(model: nn.Module, cfg: OptimConfig, skip_non_finite: bool = False) -> torch.optim.Optimizer:
    """skip_non_finite: the optimizer skips non-finite steps itself and says so in .overflow
    (DeepSpeed ZeRO-0); otherwise callers skip on the device through `found_inf`."""
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.name == "lamb":
        return (GuardedLamb if skip_non_finite else Lamb)(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if skip_non_finite:
        return GuardedAdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)
    # fused: a single kernel per step that honours found_inf on the device (CPU and CUDA)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)


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


