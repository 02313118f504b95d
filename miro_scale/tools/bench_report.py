"""What every benchmark records beside its numbers, and where it writes them."""
from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

import torch


def run_facts(device: torch.device) -> dict:
    """Device, library versions, date and command of this run."""
    facts = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
             "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
             "command": " ".join(sys.argv)}
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        pass
    return facts


def proc_memory_kib(pid: int | str = "self") -> dict:
    """VmRSS (resident now), VmHWM (high-water mark of the resident set since exec), RssAnon (private
    memory: heap, arrays) and RssFile (mapped files: shared libraries) of a live process, KiB (Linux;
    empty elsewhere)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                    out[line.split(":")[0]] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return out


def write_report(report: dict, out_dir: str | Path, stem: str) -> Path:
    """``{out_dir}/{stem}.json``; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(report, indent=2))
    return path
