"""The training loop: model, loss and data know nothing of how they are distributed.

One process here; distributed engines plug in as thin adapters around the same loop.
Each optimizer step: `accumulation` micro-batches -> grad clip -> skip if non-finite -> LAMB ->
schedule -> EMA. Logs go to JSONL and TensorBoard; checkpoints are atomic and resumable
(model, optimizer, scheduler, EMA, RNG states, data position, step).
"""
from __future__ import annotations

import json
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, Optional

import torch
from tqdm import tqdm

from miro_scale.config import MiroConfig, config_to_dict
from miro_scale.flow import MiroFlowModel, flow_matching_loss
from miro_scale.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from miro_scale.train.data import EpochBatchStream, build_dataset
from miro_scale.train.optim import EMA, build_optimizer, build_scheduler, clip_grad_norm

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
MAX_CONSECUTIVE_NONFINITE = 20


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: MiroConfig, device: Optional[str] = None, resume: bool = True):
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.out_dir = Path(cfg.train.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        torch.manual_seed(cfg.train.seed)
        self.model = MiroFlowModel(cfg.model, cfg.flow).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self.ema = EMA(self.model, cfg.optim.ema_decay, cfg.optim.ema_start_step)
        self.accumulation = cfg.train.global_batch_size // cfg.train.micro_batch_size
        self.data = EpochBatchStream(build_dataset(cfg), cfg.train.micro_batch_size, cfg.train.seed)
        self.generator = torch.Generator(self.device).manual_seed(cfg.train.seed + 1)
        self.step = 0
        self.nonfinite_steps = 0
        self.consecutive_nonfinite = 0
        self._stop_signal: Optional[int] = None
        self.forward_model = torch.compile(self.model) if cfg.train.compile else self.model
        if resume and (path := latest_checkpoint(self.ckpt_dir)) is not None:
            self.load(path)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict(),
            "data": self.data.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None},
            "nonfinite_steps": self.nonfinite_steps,
        }

    def load(self, path: Path) -> None:
        state = load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.ema.load_state_dict(state["ema"])
        self.data.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["generator"])
        if state["rng"]["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = state["step"]
        self.nonfinite_steps = state["nonfinite_steps"]

    def save(self) -> Path:
        return save_checkpoint(self.ckpt_dir, self.step, self.state_dict(), config_to_dict(self.cfg),
                               self.cfg.train.keep_checkpoints)

    # -- one optimizer step ------------------------------------------------------------------
    def train_step(self) -> Dict[str, float]:
        dtype = PRECISIONS[self.cfg.train.precision]
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()
        self.model.train()
        total_loss, raw_loss = 0.0, 0.0
        for _ in range(self.accumulation):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(self.data).items()}
            with autocast:
                loss, metrics = flow_matching_loss(self.forward_model, batch, self.cfg.flow,
                                                   self.cfg.model.self_conditioning, self.generator)
            (loss / self.accumulation).backward()
            total_loss += loss.item() / self.accumulation
            raw_loss += metrics["raw_loss"].item() / self.accumulation
        grad_norm = clip_grad_norm(self.model.parameters(), self.cfg.optim.grad_clip).item()
        skipped = not (math.isfinite(total_loss) and math.isfinite(grad_norm))
        if skipped:
            self.nonfinite_steps += 1
            self.consecutive_nonfinite += 1
            if self.consecutive_nonfinite >= MAX_CONSECUTIVE_NONFINITE:
                raise NonFiniteLossError(
                    f"{self.consecutive_nonfinite} consecutive steps had a non-finite loss or gradient "
                    f"(last at step {self.step}); lower optim.lr or check the data")
        else:
            self.consecutive_nonfinite = 0
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if not skipped:
            self.ema.update(self.model, self.step)
        return {"loss": total_loss, "raw_loss": raw_loss, "grad_norm": grad_norm,
                "lr": self.scheduler.get_last_lr()[0], "skipped": float(skipped)}

    # -- the loop -----------------------------------------------------------------------------
    def _request_stop(self, signum, _frame) -> None:
        self._stop_signal = signum

    def fit(self, max_steps: Optional[int] = None) -> Dict[str, float]:
        """Train until train.steps (or max_steps more steps); returns the last logged metrics."""
        from torch.utils.tensorboard import SummaryWriter

        end = self.cfg.train.steps if max_steps is None else min(self.cfg.train.steps, self.step + max_steps)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(json.dumps(config_to_dict(self.cfg), indent=2))
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
        writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.step)
        samples_per_step = self.cfg.train.global_batch_size
        last: Dict[str, float] = {}
        try:
            with open(self.out_dir / "metrics.jsonl", "a") as log, \
                    tqdm(total=end, initial=self.step, desc="train", unit="step", dynamic_ncols=True) as bar:
                tick = time.perf_counter()
                while self.step < end:
                    metrics = self.train_step()
                    bar.update(1)
                    if self.step % self.cfg.train.log_every == 0 or self.step == end:
                        elapsed = time.perf_counter() - tick
                        metrics["images_per_s"] = samples_per_step * self.cfg.train.log_every / max(elapsed, 1e-9)
                        metrics["nonfinite_steps"] = self.nonfinite_steps
                        tick = time.perf_counter()
                        log.write(json.dumps({"step": self.step, **metrics}) + "\n")
                        log.flush()
                        for key, value in metrics.items():
                            writer.add_scalar(f"train/{key}", value, self.step)
                        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                        last = metrics
                    if self.step % self.cfg.train.checkpoint_every == 0 or self.step == end:
                        self.save()
                    if self._stop_signal is not None:
                        self.save()
                        break
        finally:
            writer.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return last
