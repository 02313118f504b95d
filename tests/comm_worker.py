"""One training step's collectives under an engine, counted (tests/test_comm_volume.py).

Run under torchrun: builds the trainer from --config, takes one step to create lazy state, then
counts the collectives of --steps steps and writes, on rank 0, their calls and bytes per step with
the model's parameter count to --out.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tests.deepspeed_cpu  # noqa: E402,F401  (no shared-memory op build in tests)
import torch.distributed as dist  # noqa: E402

from miro_scale.config import load_config  # noqa: E402
from miro_scale.train.comm_count import count_collectives  # noqa: E402
from miro_scale.train.trainer import Trainer  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=2)
args = parser.parse_args()
with count_collectives() as counts:
    trainer = Trainer(load_config(args.config), resume=False)
    trainer.train_step()
    counts.reset()
    for _ in range(args.steps):
        trainer.train_step()
    result = counts.as_dict()
parameters = sum(p.numel() for p in trainer.model.parameters()) if hasattr(trainer, "model") else None
if dist.get_rank() == 0:
    per_step = {"calls": {k: v / args.steps for k, v in result["calls"].items()},
                "bytes": {k: v / args.steps for k, v in result["bytes"].items()},
                "total_bytes": result["total_bytes"] / args.steps,
                "bytes_in_backward": result["bytes_in_backward"] / args.steps,
                "wire_bytes": result["wire_bytes"] / args.steps}
    Path(args.out).write_text(json.dumps(per_step, indent=1))
trainer.close()
