"""The training loop: model, loss and data know nothing of how they are distributed.

Each optimizer step: `accumulation` micro-batches through the engine's backward, then the engine's
step (clip, skip if non-finite, LAMB, schedule), then the EMA. A step never waits for the device:
batches arrive prefetched (train/prefetch.py), loss, gradient norm and skips are summed on the device
and read at log steps only (train.log_every), where non-finite runs are also caught. Rank 0 reports through
train/metrics.py (a log line, JSONL, TensorBoard, W&B); preview samples go to callbacks (reward
curves); checkpoints (train/checkpoint.py) are atomic and resumable (model, optimizer, scheduler,
EMA, RNG states, data position, step), periodic and on SIGTERM/SIGUSR1 (SLURM preemption).
"""
from __future__ import annotations

import json
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from miro_scale.config import ConfigError, MiroConfig, config_to_dict
from miro_scale.flow import MiroFlowModel, flow_matching_loss
from miro_scale.train import checkpoint
from miro_scale.train.data import build_batch_stream
from miro_scale.models.flops import training_flops_per_sample
from miro_scale.train import previews
from miro_scale.models import parallelize
from miro_scale.train.engines import build_engine
from miro_scale.train.metrics import DeviceSums, Metrics, memory_gib
from miro_scale.train.optim import EMA
from miro_scale.train.ownership import RunOwner, die_if_orphaned
from miro_scale.train.prefetch import Prefetcher
from miro_scale.train.preflight import preflight

PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}
MAX_CONSECUTIVE_NONFINITE = 20


class NonFiniteLossError(RuntimeError):
    pass


def init_distributed(cfg: MiroConfig) -> tuple[int, int, torch.device]:
    """Join the process group torchrun / the deepspeed launcher describe in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if cfg.engine.kind == "local" and world > 1:
        raise ConfigError(f"engine.kind: 'local' runs one process, but WORLD_SIZE is {world}; "
                          f"use --engine fsdp or deepspeed")
    if cfg.engine.kind != "local" and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def accumulation_steps(cfg: MiroConfig, world: int) -> int:
    per_step = cfg.train.micro_batch_size * world
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size: {cfg.train.global_batch_size} is not a multiple of "
                          f"micro_batch_size x world size ({cfg.train.micro_batch_size} x {world})")
    return cfg.train.global_batch_size // per_step


def text_tokens(cfg: MiroConfig) -> int:
    """Text tokens per training sample (for FLOP counts)."""
    if cfg.data.source == "synthetic_tensors":
        return cfg.data.text_len
    return cfg.data.max_text_len  # precomputed or encoded on the fly, captions come padded to it


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Initial weights from a model bundle (a directory or hub id: an export of ours or the released
    weights). Post-training starts a reward-conditioned model from a baseline: only the reward
    embedders may be new; every other tensor must exist with the same shape."""
    from miro_scale import bundle

    _, state, _, _ = bundle.load(path)
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
                   if k in own and state[k].shape != own[k].shape)
    missing = sorted(k for k in own if k not in state and not parallelize.is_reward_only(k))
    if missing or unexpected or wrong:
        raise ConfigError(f"train.init_from {path}: does not fit model.*: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}, other shapes {wrong[:5]}")
    model.load_state_dict(state, strict=False)


class Trainer:
    def __init__(self, cfg: MiroConfig, resume: bool = True, callbacks: Optional[Callable] = None):
        """callbacks(cfg, rank, device) -> objects with on_samples(step, images, prompts, metrics),
        given each preview grid (train/callbacks.py: callbacks_from_config)."""
        self.cfg = cfg
        # Every config check runs before a process group starts.
        self.accumulation = accumulation_steps(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        preflight(cfg, resume)
        # Rank 0 claims the output directory for this run (the other ranks write only where it says).
        self.owner = RunOwner(cfg.train.output_dir) if int(os.environ.get("RANK", "0")) == 0 else None
        self.rank, self.world, self.device = init_distributed(cfg)
        self.callbacks = callbacks(cfg, self.rank, self.device) if callbacks is not None else []
        # Where small collectives (loss mean, stop flag) live: NCCL needs CUDA tensors, gloo CPU ones.
        self.comm_device = self.device if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"
        self.out_dir = Path(cfg.train.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = MiroFlowModel(cfg.model, cfg.flow)
        if cfg.train.init_from:
            load_weights(model, cfg.train.init_from)
        model = model.to(self.device)
        self.num_parameters = sum(p.numel() for p in model.parameters())
        self.flops_per_sample = training_flops_per_sample(cfg, text_tokens(cfg))
        self.engine = build_engine(model, cfg, self.accumulation)
        self.ema = EMA(self.engine.local_parameters(), cfg.optim.ema_decay, cfg.optim.ema_start_step)
        self.data = Prefetcher(build_batch_stream(cfg, self.rank, self.world, self.device), self.device)
        self.preview_prompts = self.decode = None
        if cfg.train.sample_every:
            self.preview_prompts = self.data.preview_prompts(cfg.train.sample_count)
            self.decode = previews.build_decoder(cfg, self.device)
        torch.manual_seed(cfg.train.seed + 1000 * self.rank)  # per-rank streams from here on
        # Noise, gamma and self-conditioning draws are seeded per data chunk (see train_step).
        self.generator = torch.Generator(self.device)
        self.step = 0
        self.nonfinite_steps = 0  # as of the last read; the device holds the steps since
        self.window = DeviceSums(("loss", "raw_loss", "grad_norm", "applied", "skipped"), self.device)
        # consecutive skipped steps: [the run ending at the last step, the longest run since the last read]
        self._runs = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.data_wait = 0.0  # seconds spent waiting for batches, since the last log step
        self._stop_signal: Optional[int] = None
        forward = self.engine.forward_module
        self.forward_model = torch.compile(forward) if cfg.train.compile else forward
        if resume and (path := checkpoint.latest_checkpoint(self.ckpt_dir)) is not None:
            self.load(path)

    def release(self) -> None:
        """Give up the output directory (also after a failure: no collective here)."""
        if self.owner is not None:
            self.owner.release()

    def close(self) -> None:
        """End of a finished run: release, and leave the process group together (a rank exiting
        while gloo still talks to it can abort another at teardown)."""
        self.release()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    # -- state -----------------------------------------------------------------------------
    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _state(self) -> Dict:
        """What the checkpoint holds as tensors (with their non-tensor companions)."""
        return {**self.engine.state_dict(), "ema": self.engine.ema_state(self.ema.state_dict())}

    def _rng_state(self) -> Dict[str, Optional[torch.Tensor]]:
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    def save(self) -> Path:
        root = self.ckpt_dir
        if self.rank == 0:
            checkpoint.prepare_staging(root, self.step)
        self._barrier()
        staging = checkpoint.staging_dir(root, self.step)
        skeleton = checkpoint.save_state(self._state(), staging)
        checkpoint.write_rank_state(staging, self.rank, self.data.state_dict(), self._rng_state())
        self._barrier()
        if self.rank == 0:
            die_if_orphaned()  # the launcher-watch thread may not have run yet: commit nothing after it
            nonfinite = self.nonfinite_steps + round(self.window.peek()["skipped"])
            checkpoint.commit(root, self.step, {"step": self.step, "nonfinite_steps": nonfinite,
                                                "world_size": self.world, "state": skeleton},
                              config_to_dict(self.cfg), self.cfg.train.keep_checkpoints)
        self._barrier()
        return root / f"step_{self.step:08d}"

    def load(self, path: Path) -> None:
        trainer_state = checkpoint.read_trainer_state(path)
        state = checkpoint.load_state(path, self._state(), trainer_state["state"])
        self.engine.load_state_dict(state)
        self.engine.load_ema_state(self.ema.shadow, state["ema"])
        # Data positions are global at step boundaries (ranks move in lockstep), so on another world
        # size every rank takes rank 0's and the stream converts it; per-rank RNG streams only resume
        # on the same world size, else they start afresh (training draws are seeded per data chunk).
        same_world = trainer_state["world_size"] == self.world
        data, rng = checkpoint.read_rank_state(path, self.rank if same_world else 0)
        self.data.load_state_dict(data)
        if same_world:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.step = trainer_state["step"]
        self.nonfinite_steps = trainer_state["nonfinite_steps"]

    # -- one optimizer step ------------------------------------------------------------------
    def train_step(self) -> Optional[Dict[str, float]]:
        """One optimizer step, queued without waiting for the device. On log steps (train.log_every)
        the means since the last read are returned (read_metrics), else None."""
        dtype = PRECISIONS[self.cfg.train.precision]
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()
        self.forward_model.train()
        loss_sum = raw_sum = torch.zeros((), device=self.device)
        for micro in range(self.accumulation):
            waited = time.perf_counter()
            batch = next(self.data)  # on the device already
            self.data_wait += time.perf_counter() - waited
            # Randomness tied to the data chunk (rank r serves chunks r, r + world, ...): the same
            # run gives the same draws on any number of ranks, and resuming needs no generator state.
            chunk = (self.step * self.accumulation + micro) * self.world + self.rank
            self.generator.manual_seed(self.cfg.train.seed * 1_000_003 + chunk)
            with autocast:
                loss, metrics = flow_matching_loss(self.forward_model, batch, self.cfg.flow,
                                                   self.cfg.model.self_conditioning, self.generator)
            self.engine.backward(loss, last_micro_batch=micro == self.accumulation - 1)
            loss_sum = loss_sum + loss.detach().float()
            raw_sum = raw_sum + metrics["raw_loss"].float()
        result = self.engine.step()
        self.step += 1
        skipped = result.skipped
        # A skipped step's loss and norm are non-finite: the logged means are over applied steps.
        self.window.add({"loss": torch.where(skipped, 0.0, loss_sum / self.accumulation),
                         "raw_loss": torch.where(skipped, 0.0, raw_sum / self.accumulation),
                         "grad_norm": torch.where(skipped, 0.0, result.grad_norm.float()),
                         "applied": ~skipped, "skipped": skipped})
        run = (self._runs[0] + 1) * skipped
        self._runs = torch.stack([run, torch.maximum(self._runs[1], run)])
        # A skipped step left the weights as they were, so the EMA moves toward the same weights.
        self.ema.update(self.engine.local_parameters(), self.step)
        return self.read_metrics() if self.step % self.cfg.train.log_every == 0 else None

    def read_metrics(self) -> Dict[str, float]:
        """The means since the last read, on the host: a log step's sync (every rank calls it: the
        loss is averaged over ranks). Raises after MAX_CONSECUTIVE_NONFINITE skipped steps in a row."""
        sums = self.window.read(mean_over_ranks=True)
        run, longest = self._runs.tolist()
        self._runs[1] = run
        self.nonfinite_steps += round(sums["skipped"])
        if longest >= MAX_CONSECUTIVE_NONFINITE:
            raise NonFiniteLossError(
                f"{int(longest)} consecutive steps had a non-finite loss or gradient (seen at step "
                f"{self.step}); lower optim.lr or check the data")
        applied = sums["applied"]
        means = {k: sums[k] / applied if applied else float("nan") for k in ("loss", "raw_loss", "grad_norm")}
        return {**means, "lr": self.engine.lr(), "skipped": sums["skipped"]}

    def throughput_metrics(self, steps: int, elapsed: float) -> Dict[str, float]:
        images_per_s = self.cfg.train.global_batch_size * steps / max(elapsed, 1e-9)
        tflops = self.flops_per_sample * images_per_s / self.world / 1e12
        return {"images_per_s": images_per_s, "tflops_per_device": tflops, "mfu": tflops / self.cfg.train.peak_tflops,
                "memory_gib": memory_gib(self.device), "data_wait": self.data_wait / max(elapsed, 1e-9)}

    def startup_facts(self) -> Dict:
        return {"world_size": self.world, "engine": self.cfg.engine.kind, "accumulation": self.accumulation,
                "global_batch": self.cfg.train.global_batch_size, "parameters": self.num_parameters,
                "resumed_step": self.step, "steps": self.cfg.train.steps,
                "dataset_samples": getattr(self.data, "num_samples", None), "device": str(self.device)}

    def write_samples(self, metrics: Metrics) -> None:
        """Every rank samples (sharded engines need all of them); rank 0 writes the grid and hands
        the images to the callbacks."""
        model = self.engine.forward_module
        model.eval()
        with previews.ema_weights(self.engine.local_parameters(), self.ema):
            images = previews.render_samples(model, self.cfg, self.preview_prompts, self.decode, self.device)
        if self.rank != 0:
            return
        count = self.preview_prompts["text_mask"].shape[0]
        grid = previews.to_grid(images, count)
        previews.save_grid(grid, self.out_dir / "samples", self.step)
        metrics.image("samples", self.step, grid)
        for callback in self.callbacks:
            callback.on_samples(self.step, images, self.preview_prompts, metrics)

    # -- the loop -----------------------------------------------------------------------------
    def _request_stop(self, signum, _frame) -> None:
        self._stop_signal = signum

    def _stop_requested(self, log_step: bool) -> bool:
        """Any rank's signal stops every rank at the same step: one process stops at once; ranks agree
        at log steps (a collective and a host sync)."""
        if not dist.is_initialized():
            return self._stop_signal is not None
        if not log_step:
            return False
        flag = torch.tensor([self._stop_signal is not None], dtype=torch.int32, device=self.comm_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def fit(self, max_steps: Optional[int] = None) -> Dict[str, float]:
        """Train until train.steps (or max_steps more steps); returns the last logged metrics."""
        end = self.cfg.train.steps if max_steps is None else min(self.cfg.train.steps, self.step + max_steps)
        metrics = Metrics.for_rank(self.cfg, self.rank, self.step)
        if self.rank == 0:
            (self.out_dir / "config.json").write_text(json.dumps(config_to_dict(self.cfg), indent=2))
            metrics.startup(self.out_dir, self.startup_facts())
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
        last: Dict[str, float] = {}
        try:
            tick, ticked_at, self.data_wait = time.perf_counter(), self.step, 0.0
            while self.step < end:
                values = self.train_step()
                if values is None and self.step == end:
                    values = self.read_metrics()
                if values is not None:
                    values.update(self.throughput_metrics(self.step - ticked_at, time.perf_counter() - tick))
                    values["nonfinite_steps"] = self.nonfinite_steps
                    metrics.log(self.step, values, end=end)
                    tick, ticked_at, self.data_wait = time.perf_counter(), self.step, 0.0
                    last = values
                if self.cfg.train.sample_every and self.step % self.cfg.train.sample_every == 0:
                    self.write_samples(metrics)
                periodic = self.step % self.cfg.train.checkpoint_every == 0 or self.step == end
                if periodic:
                    self.save()
                if self._stop_requested(log_step=values is not None):
                    if not periodic:
                        self.save()
                    metrics.print(f"stopped by signal {self._stop_signal or 'on another rank'} at step {self.step}, "
                                  f"checkpoint written")
                    break
        finally:
            metrics.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return last
