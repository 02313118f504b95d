"""Export a training checkpoint as one deployable model file (safetensors + config metadata).

    python checkpoints_tools/export.py --checkpoint runs/miro_16m/checkpoints/step_00500000 \
        --out exports/miro_16m_ema.safetensors [--weights ema|raw] [--dtype bf16]
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from miro_scale.convert import consolidate_ema, consolidate_raw, save_model_file  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a step_* directory of a training run")
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights", choices=["ema", "raw"], default="ema")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args()
    ckpt = Path(args.checkpoint)
    if not (ckpt / "trainer.json").exists():
        print(f"error: {ckpt} is not a training checkpoint (no trainer.json)", file=sys.stderr)
        return 2
    state = consolidate_ema(ckpt) if args.weights == "ema" else consolidate_raw(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    path = save_model_file(state, args.out, config, DTYPES[args.dtype])
    print(f"wrote {path}: {len(state)} tensors, {sum(t.numel() for t in state.values()):,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
