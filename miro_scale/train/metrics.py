"""What a run reports, on rank 0: startup facts, one human-readable line per log step, and the same
numbers to metrics.jsonl, TensorBoard and (with train.wandb_project) Weights & Biases, all behind
one interface: `Metrics.log(step, values, section)`, `Metrics.image(tag, step, chw)`.

Other ranks get a Metrics that does nothing, so the trainer never asks which rank it is to log.
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from miro_scale.config import MiroConfig, config_to_dict

STARTUP_FILE = "startup.json"


class JsonlSink:
    """metrics.jsonl: one object per training log step ({"step", ...}); callbacks keep their own files."""

    def __init__(self, out_dir: Path):
        self.file = open(out_dir / "metrics.jsonl", "a")

    def log(self, step: int, values: Dict[str, float], section: str) -> None:
        if section == "train":
            self.file.write(json.dumps({"step": step, **values}) + "\n")
            self.file.flush()

    def image(self, tag: str, step: int, chw: torch.Tensor) -> None:
        pass  # the grids are PNG files already

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    def __init__(self, out_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops events logged after its checkpoint by the previous attempt
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step)

    def log(self, step: int, values: Dict[str, float], section: str) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{section}/{key}", value, step)

    def image(self, tag: str, step: int, chw: torch.Tensor) -> None:
        self.writer.add_image(tag, chw, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, cfg: MiroConfig, out_dir: Path):
        try:
            import wandb
        except ImportError:
            raise ImportError("train.wandb_project is set but wandb is not installed (pip install wandb)") from None
        self.wandb = wandb
        # resume="allow" with the directory's name as id: a resumed run continues the same W&B run
        self.run = wandb.init(project=cfg.train.wandb_project, dir=str(out_dir), id=out_dir.resolve().name,
                              resume="allow", config=config_to_dict(cfg))

    def log(self, step: int, values: Dict[str, float], section: str) -> None:
        self.run.log({f"{section}/{k}": v for k, v in values.items()}, step=step)

    def image(self, tag: str, step: int, chw: torch.Tensor) -> None:
        self.run.log({tag: self.wandb.Image(chw.permute(1, 2, 0).float().numpy())}, step=step)

    def close(self) -> None:
        self.run.finish()


class DeviceSums:
    """Named scalars summed on the device between log steps: add() only queues a few tiny kernels and
    never waits for the GPU; read() is the one host sync (and, across ranks, the one all-reduce)."""

    def __init__(self, names: Sequence[str], device: torch.device):
        self.names = tuple(names)
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=device)

    def add(self, values: Dict[str, torch.Tensor]) -> None:
        self.sums += torch.stack([values[n].detach().reshape(()).to(torch.float64) for n in self.names])

    def peek(self, mean_over_ranks: bool = False) -> Dict[str, float]:
        sums = self.sums
        if mean_over_ranks and dist.is_initialized():
            sums = sums.clone()
            dist.all_reduce(sums)
            sums /= dist.get_world_size()
        return dict(zip(self.names, sums.tolist()))

    def read(self, mean_over_ranks: bool = False) -> Dict[str, float]:
        """The sums since the last read (averaged over ranks), then zero; collective when averaging."""
        values = self.peek(mean_over_ranks)
        self.sums.zero_()
        return values


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, else the resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def log_line(step: int, end: int, m: Dict[str, float]) -> str:
    return (f"step {step}/{end} | loss {m['loss']:.4f} | lr {m['lr']:.3e} | grad norm {m['grad_norm']:.3f} | "
            f"{m['images_per_s']:.1f} img/s | MFU {m['mfu']:.1%} | mem {m['memory_gib']:.2f} GiB | "
            f"data wait {m['data_wait']:.0%}" + (f" | skipped {int(m['nonfinite_steps'])}" if m["nonfinite_steps"] else ""))


class Metrics:
    def __init__(self, sinks: List[Any], stream=sys.stdout):
        self.sinks = sinks
        self.stream = stream

    @classmethod
    def for_rank(cls, cfg: MiroConfig, rank: int, start_step: int) -> "Metrics":
        if rank != 0:
            return cls([], stream=None)
        out_dir = Path(cfg.train.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        sinks: List[Any] = [JsonlSink(out_dir), TensorBoardSink(out_dir, start_step)]
        if cfg.train.wandb_project:
            sinks.append(WandbSink(cfg, out_dir))
        return cls(sinks)

    def print(self, text: str) -> None:
        if self.stream is not None:
            print(text, file=self.stream, flush=True)

    def startup(self, out_dir: Path, facts: Dict[str, Any]) -> None:
        if self.stream is None:
            return
        (out_dir / STARTUP_FILE).write_text(json.dumps(facts, indent=2))
        self.print("start: " + ", ".join(f"{k} {v}" for k, v in facts.items()))

    def log(self, step: int, values: Dict[str, float], section: str = "train", end: Optional[int] = None) -> None:
        for sink in self.sinks:
            sink.log(step, values, section)
        if section == "train" and end is not None:
            self.print(log_line(step, end, values))

    def image(self, tag: str, step: int, chw: torch.Tensor) -> None:
        for sink in self.sinks:
            sink.image(tag, step, chw)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
