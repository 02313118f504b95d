"""Micro-batches on the training device before the step asks for them.

On CUDA the next batch's host-to-device copy runs on a side stream from pinned memory while the
current batch trains, so the copy neither blocks the host (a pageable copy does) nor waits behind
the step's kernels. Elsewhere batches are only moved to the device. Checkpoints see the data
position of the batches handed out, not of the one in flight.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

Batch = Dict[str, torch.Tensor]


class Prefetcher:
    """Wraps a resumable batch stream (train/data.py: next(), state_dict(), load_state_dict(),
    preview_prompts()) and keeps one batch in flight on CUDA."""

    def __init__(self, source, device: torch.device):
        self.source = source
        self.device = device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # (the source's state before the batch, the batch on the device, its copy's end)
        self._pending: Optional[Tuple[Dict, Batch, torch.cuda.Event]] = None

    @property
    def num_samples(self) -> Optional[int]:
        return getattr(self.source, "num_samples", None)

    def preview_prompts(self, count: int) -> Batch:
        return self.source.preview_prompts(count)

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Batch:
        if self.copy_stream is None:
            return {k: v.to(self.device) for k, v in next(self.source).items()}
        if self._pending is None:
            self._pending = self._start_copy()
        _, batch, copied = self._pending
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(copied)
        for value in batch.values():
            value.record_stream(compute)  # the allocator must not reuse it before the step is done
        self._pending = self._start_copy()
        return batch

    def _start_copy(self) -> Tuple[Dict, Batch, torch.cuda.Event]:
        state = self.source.state_dict()
        with torch.cuda.stream(self.copy_stream):  # a source that moves or makes batches on the GPU does it here too
            batch = {k: self._pinned(v).to(self.device, non_blocking=True) for k, v in next(self.source).items()}
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        return state, batch, copied

    @staticmethod
    def _pinned(value: torch.Tensor) -> torch.Tensor:
        if value.device.type != "cpu" or value.is_pinned():
            return value
        return value.pin_memory()

    def state_dict(self) -> Dict:
        """Where the batches handed out end: the batch in flight is read again after a resume."""
        return self._pending[0] if self._pending is not None else self.source.state_dict()

    def load_state_dict(self, state: Dict) -> None:
        self._pending = None
        self.source.load_state_dict(state)
