"""Engine adapters: the only code that knows how the model is distributed.

The trainer calls, per optimizer step: `backward(loss, last_micro_batch)` for each micro-batch,
then `step()`; `state_dict()` / `load_state_dict()` are collective. Model, loss and data are the same under
all three engines:

- LocalEngine: one process (CPU or one GPU).
- FSDP2Engine: torch.distributed.fsdp.fully_shard per unit of models/parallelize.py and at the
  root, bf16 parameters with fp32 gradient reduction, gradient sync only on the last micro-batch.
- DeepSpeedEngine: ZeRO stage from the config; DeepSpeed owns gradient reduction, accumulation
  and clipping. Stage 0 keeps fp32 parameters with the client optimizer untouched (bf16 comes
  from the trainer's autocast) and skips non-finite steps through the optimizer's .overflow;
  stages 1-3 use DeepSpeed's bf16 mode, whose overflow check skips them, and hand the optimizer
  flat partitions, whose slices of each parameter optim.Lamb is told (exact LAMB).

Every engine gives and takes its state (`state_dict` / `load_state_dict`) in one layout, that of
torch.distributed.checkpoint.state_dict: {"model": {name: tensor}, "optimizer": {"state": {name:
{...}}, "param_groups": [...]}, "scheduler": {...}}, tensors whole or DTensor shards, so that
train/checkpoint.py writes one format for all of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from miro_scale.config import MiroConfig
from miro_scale.models import parallelize
from miro_scale.models.parallelize import canonical_name
from miro_scale.train.optim import Lamb, build_optimizer, build_scheduler


def copy_loaded(targets: Dict[str, torch.Tensor], loaded: Dict[str, torch.Tensor]) -> None:
    """Loaded values into the live tensors (DCP usually loaded into them in place already)."""
    for name, value in loaded.items():
        if value is not targets[name]:
            targets[name].copy_(value)


@dataclass
class StepResult:
    """Device tensors: the trainer reads them at log steps only, so a step never waits on the GPU."""
    grad_norm: torch.Tensor  # 0-dim, before clipping
    skipped: torch.Tensor  # 0-dim bool: a non-finite gradient left weights and moments as they were


def torch_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> Dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    return {"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict()}


def load_torch_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer, scheduler, state: Dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])


def clip_gradients(module: nn.Module, max_norm: float) -> torch.Tensor:
    """The gradients' total norm, computed once, clipping them to max_norm with it (0: no clipping)."""
    params = [p for p in module.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


class LocalEngine:
    name = "local"

    def __init__(self, model: nn.Module, cfg: MiroConfig, accumulation: int):
        self.cfg = cfg
        self.accumulation = accumulation
        if cfg.engine.activation_checkpointing:
            parallelize.apply_activation_checkpointing(model)
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

    def step(self) -> StepResult:
        norm = clip_gradients(self.module, self.cfg.optim.grad_clip)  # the step's one norm pass
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        skipped = ~torch.isfinite(norm)
        # torch's convention for fused optimizers (GradScaler sets the same attribute), which LAMB and
        # fused AdamW follow: the step is a no-op on the device where found_inf is 1, and the host
        # never waits
        self.optimizer.found_inf = skipped.float()
        self.optimizer.step()
        # The schedule follows the step count, skipped steps included: knowing which were skipped
        # on the host would take a sync per step.
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm, skipped)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> Dict:
        return torch_state_dict(self.module, self.optimizer, self.scheduler)

    def load_state_dict(self, state: Dict) -> None:
        load_torch_state_dict(self.module, self.optimizer, self.scheduler, state)

    def ema_state(self, shadow: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The EMA as checkpointed: this rank's tensors (whole, or DTensor shards DCP reshards itself)."""
        return shadow

    def load_ema_state(self, shadow: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor]) -> None:
        copy_loaded(shadow, state)


class FSDP2Engine(LocalEngine):
    name = "fsdp"

    def _wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
        policy = MixedPrecisionPolicy(param_dtype=dtypes[self.cfg.engine.fsdp_param_dtype],
                                      reduce_dtype=dtypes[self.cfg.engine.fsdp_reduce_dtype])
        reshard = self.cfg.engine.fsdp_reshard_after_forward
        for unit in parallelize.fsdp_units(model):
            fully_shard(unit, mp_policy=policy, reshard_after_forward=reshard)
        fully_shard(model, mp_policy=policy, reshard_after_forward=reshard)
        return model

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        # Reduce-scatter gradients once per optimizer step, not once per micro-batch.
        self.module.set_requires_gradient_sync(last_micro_batch)
        super().backward(loss, last_micro_batch)



class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, model: nn.Module, cfg: MiroConfig, accumulation: int):
        import deepspeed

        self.cfg = cfg
        if cfg.engine.activation_checkpointing:
            parallelize.apply_activation_checkpointing(model)
        zero = cfg.engine.zero_stage
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
            "gradient_accumulation_steps": accumulation,
            "train_batch_size": cfg.train.global_batch_size,
            # ZeRO-0: the engine clips with the norm it computes anyway (one norm pass per step)
            "gradient_clipping": cfg.optim.grad_clip if zero >= 1 else 0.0,
            "zero_optimization": {
                "stage": zero, "overlap_comm": cfg.engine.zero_overlap_comm,
                "reduce_bucket_size": cfg.engine.zero_bucket_elements,
                # each rank's slice of a bucket reduced to that rank (a reduce-scatter's volume), not
                # the whole bucket all-reduced (twice that): buckets of 25M elements are large enough
                "use_multi_rank_bucket_allreduce": False,
                # LAMB's per-group step counter needs each group stepped once (one ZeRO-3 sub-group)
                "sub_group_size": 10 ** 12},
            "communication_data_type": cfg.engine.zero_reduce_dtype,
            "bf16": {"enabled": zero >= 1 and cfg.train.precision == "bf16"},
            "steps_per_print": 10 ** 9,
            # DeepSpeed vouches for its own optimizers only; our LAMB's parity with one-process
            # LAMB on partitions is tested in tests/test_distributed.py
            "zero_allow_untested_optimizer": True,
        }
        optimizer = build_optimizer(model, cfg.optim, skip_non_finite=zero == 0)
        names = {id(p): canonical_name(n) for n, p in model.named_parameters()}
        # ZeRO 1-3 hand the optimizer flat partitions: the checkpoint layout and LAMB's trust ratio
        # need the parameters per group.
        self._group_params = [list(group["params"]) for group in optimizer.param_groups]
        self._group_names = [[names[id(p)] for p in group] for group in self._group_params]
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: build_scheduler(opt, cfg.optim, cfg.train.steps))
        self.module = self.engine.module
        self._skipped_before = 0
        if zero >= 1 and isinstance(optimizer, Lamb):
            optimizer.shard(self._partition_locator(), [len(g) for g in self._group_params],
                            self.optimizer.dp_process_group)

    def _partition_locator(self) -> Callable[[torch.Tensor], Tuple[int, List[Tuple[int, int, int]]]]:
        """For LAMB's trust ratio: a flat fp32 partition of this rank -> (its parameter group,
        [(parameter index in the group, start in the partition, length)]). Flats are matched by
        identity when stepped, as DeepSpeed may rebuild them after initialisation."""
        zero = self.optimizer
        index = {id(p): i for params in self._group_params for i, p in enumerate(params)}
        if self.cfg.engine.zero_stage < 3:
            slices = [(g, [(index[id(p)], p._hp_mapping.hp_fragment_address.start,
                            p._hp_mapping.hp_fragment_address.numel)
                           for p in zero.bit16_groups[g] if p._hp_mapping is not None])
                      for g in range(len(zero.single_partition_of_fp32_groups))]
            return lambda flat: slices[_position(flat, zero.single_partition_of_fp32_groups)]
        # ZeRO-3 partitions every parameter on its own: rank r holds elements [r*n, (r+1)*n) of each
        # (n = partition_numel(), the last rank's padded), and a sub-group's flat concatenates them.
        if len(zero.fp16_groups) != len(self._group_params):  # sub_group_size is set above the model's size
            raise RuntimeError("LAMB under ZeRO-3 needs one sub-group per parameter group (the group step "
                               "counter and the trust ratios are per group)")
        slices = []
        for sub_group, params in enumerate(zero.fp16_groups):
            rank = dist.get_rank(group=zero.sub_group_process_groups[sub_group])
            segments, offset = [], 0
            for p in params:
                n = p.partition_numel()
                valid = min(n, p.ds_numel - rank * n)
                if valid > 0:
                    segments.append((index[id(p)], offset, valid))
                offset += n
            slices.append((zero.sub_group_to_group_id[sub_group], segments))
        return lambda flat: slices[_position(flat, zero.fp32_partitioned_groups_flat)]

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
        device = next(self.module.parameters()).device
        norm = None
        if self.cfg.engine.zero_stage == 0:  # whole, already averaged gradients: DeepSpeed reports no norm
            norm = clip_gradients(self.module, self.cfg.optim.grad_clip)
            self.optimizer.non_finite = ~torch.isfinite(norm)  # SkipNonFinite: DeepSpeed's overflow flag
        self.engine.step()
        if norm is None:  # ZeRO 1-3: the norm DeepSpeed clipped with
            norm = self.engine.get_global_grad_norm()
            norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32, device=device)
        # DeepSpeed decides a skip on the host (its overflow flag) and has synced for it already.
        skipped = self.engine.skipped_steps > self._skipped_before
        self._skipped_before = self.engine.skipped_steps
        return StepResult(norm, torch.full((), skipped, dtype=torch.bool, device=device))

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # ZeRO 1-3: whole fp32 master weights and optimizer moments gathered from the partitions
    # (collective), and scattered back into them on load; stage 0 holds torch's own optimizer.
    def _partitioned(self) -> bool:
        return self.cfg.engine.zero_stage >= 1

    def _named_parameters(self) -> Dict[str, nn.Parameter]:
        return {canonical_name(n): p for n, p in self.module.named_parameters()}

    def _full_optimizer_state(self, param: nn.Parameter, key: str) -> torch.Tensor:
        if self.cfg.engine.zero_stage == 3:
            from deepspeed.utils import safe_get_full_optimizer_state

            return safe_get_full_optimizer_state(param, key)
        # ZeRO 1/2: DeepSpeed links moments to parameters after the first group's first step only
        # (deepspeed 0.19: later groups' moments are never linked), so slice the flat state here.
        full = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
        mapping = param._hp_mapping
        if mapping is not None:
            flat = self.optimizer.single_partition_of_fp32_groups[mapping.param_group_index]
            hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
            full.narrow(0, lp.start, lp.numel).copy_(self.optimizer.optimizer.state[flat][key].narrow(0, hp.start, hp.numel))
        dist.all_reduce(full)
        return full.view_as(param)

    def _set_full(self, param: nn.Parameter, key: Optional[str], value: torch.Tensor) -> None:
        """This rank's share of a whole tensor into the fp32 master weights (key None) or a moment."""
        if self.cfg.engine.zero_stage == 3:
            # deepspeed 0.19's set_full_hp_param slices past the end when a parameter's partitions
            # are padded, so the padded slice is cut here.
            part, _ = self.optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False,
                                                                    optim_state_key=key)
            n, rank = part.numel(), self.optimizer._get_param_partition_rank(param)
            piece = value.reshape(-1)[rank * n:(rank + 1) * n]
            part.zero_()
            part[: piece.numel()].copy_(piece)
            return
        if key is None:
            from deepspeed.utils import safe_set_full_fp32_param

            return safe_set_full_fp32_param(param, value)
        mapping = param._hp_mapping
        if mapping is not None:
            flat = self.optimizer.single_partition_of_fp32_groups[mapping.param_group_index]
            hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
            self.optimizer.optimizer.state[flat][key].narrow(0, hp.start, hp.numel).copy_(
                value.reshape(-1).narrow(0, lp.start, lp.numel))

    @torch.no_grad()
    def _init_optimizer_state(self) -> None:
        """Moments exist after the first step; a fresh engine about to load needs them as targets:
        one step at lr 0 on zero gradients creates them (as torch's state_dict helpers do)."""
        inner, partitions = self.optimizer.optimizer, self._flat_partitions()
        flats = [p for group in partitions for p in group]
        if all(inner.state.get(p) for p in flats):
            return
        saved = [(group["lr"], group["params"]) for group in inner.param_groups]
        for group, params in zip(inner.param_groups, partitions):
            group["lr"], group["params"] = 0.0, params
        for p in flats:
            p.grad = torch.zeros_like(p)
        inner.step()
        for group, (lr, params) in zip(inner.param_groups, saved):
            group["lr"], group["params"] = lr, params
        for p in flats:
            p.grad = None

    def _flat_partitions(self) -> List[List[torch.Tensor]]:
        """This rank's fp32 flat partitions per parameter group (what the inner optimizer steps)."""
        zero = self.optimizer
        if self.cfg.engine.zero_stage < 3:
            return [[flat] for flat in zero.single_partition_of_fp32_groups]
        groups = [[] for _ in zero.optimizer.param_groups]
        for sub_group, flat in enumerate(zero.fp32_partitioned_groups_flat):
            groups[zero.sub_group_to_group_id[sub_group]].append(flat)
        return groups

    def state_dict(self) -> Dict:
        if not self._partitioned():
            return torch_state_dict(self.module, self.optimizer, self.scheduler)
        from deepspeed.utils import safe_get_full_fp32_param

        self._init_optimizer_state()
        params = self._named_parameters()
        model = {name: safe_get_full_fp32_param(p).cpu() for name, p in params.items()}
        model.update({canonical_name(n): b for n, b in self.module.named_buffers()})
        inner = self.optimizer.optimizer
        state, groups = {}, []
        for group, names, flats in zip(inner.param_groups, self._group_names, self._flat_partitions()):
            flat_state = inner.state[flats[0]]
            for name in names:
                state[name] = {key: (self._full_optimizer_state(params[name], key).cpu() if value.dim()
                                     else value.clone()) for key, value in flat_state.items()}
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": names})
        return {"model": model, "optimizer": {"state": state, "param_groups": groups},
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        if not self._partitioned():
            load_torch_state_dict(self.module, self.optimizer, self.scheduler, state)
        else:
            self._load_partitioned(state)
        self.scheduler.load_state_dict(state["scheduler"])
        self._skipped_before = self.engine.skipped_steps

    @torch.no_grad()
    def _load_partitioned(self, state: Dict) -> None:
        import deepspeed
        params, optim = self._named_parameters(), state["optimizer"]
        for name, p in params.items():
            self._set_full(p, None, state["model"][name].to(p.device))
            for key, value in optim["state"][name].items():
                if value.dim():
                    self._set_full(p, key, value.to(p.device))
        inner = self.optimizer.optimizer
        for group, saved, flats in zip(inner.param_groups, optim["param_groups"], self._flat_partitions()):
            group.update({k: v for k, v in saved.items() if k != "params"})
            first = optim["state"][saved["params"][0]]
            for flat in flats:  # per-partition scalars (AdamW's step)
                for key, value in first.items():
                    if not value.dim():
                        inner.state[flat][key].copy_(value)
        # The low-precision module parameters the forward uses, from the restored masters.
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0,
                                               enabled=self.cfg.engine.zero_stage == 3):
            for name, p in params.items():
                p.copy_(state["model"][name].to(p.device, p.dtype))
        for name, buffer in self.module.named_buffers():
            buffer.copy_(state["model"][canonical_name(name)])

    def ema_state(self, shadow: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if self.cfg.engine.zero_stage < 3:
            return shadow
        params = self._named_parameters()  # ZeRO-3: the EMA of flat, padded partitions -> whole tensors
        world = dist.get_world_size()
        full = {}
        for name, part in shadow.items():
            parts = [torch.empty_like(part) for _ in range(world)]
            dist.all_gather(parts, part)
            full[name] = torch.cat(parts)[: params[name].ds_numel].view(params[name].ds_shape)
        return full

    def load_ema_state(self, shadow: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor]) -> None:
        if self.cfg.engine.zero_stage < 3:
            return copy_loaded(shadow, state)
        rank = dist.get_rank()
        for name, part in shadow.items():
            flat = state[name].reshape(-1)
            n = part.numel()
            chunk = torch.zeros(n, dtype=part.dtype, device=part.device)
            piece = flat[rank * n:(rank + 1) * n]
            chunk[: piece.numel()] = piece
            part.copy_(chunk)


def _position(tensor: torch.Tensor, candidates: List[torch.Tensor]) -> int:
    return next(i for i, candidate in enumerate(candidates) if candidate is tensor)


ENGINES = {"local": LocalEngine, "fsdp": FSDP2Engine, "deepspeed": DeepSpeedEngine}


def build_engine(model: nn.Module, cfg: MiroConfig, accumulation: int):
    return ENGINES[cfg.engine.kind](model, cfg, accumulation)
