"""Export a training checkpoint as a model bundle (the released layout: config.json,
model.safetensors, uncond_embedding.npy; see miro_scale/bundle.py).

    python checkpoints_tools/export.py --checkpoint runs/miro_16m/checkpoints/step_00500000 \
        --out exports/miro_16m [--weights ema|raw] [--dtype fp32|bf16|fp16]

The bundle loads with MiroPipeline.from_pretrained(out) (and, for models the release can express,
with the authors' own miro.MiroPipeline), trains on with train.init_from=out, and is inspected with
python -m checkpoints_tools.inspect out.
"""
import argparse
import sys
from pathlib import Path

# the checkout instead of this script's folder, whose inspect.py would shadow the standard library's
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from miro_scale.convert import export_bundle  # noqa: E402
from miro_scale.train.checkpoint import CheckpointError  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a step_* directory of a training run")
    parser.add_argument("--out", required=True, help="the bundle directory to write")
    parser.add_argument("--weights", choices=["ema", "raw"], default="ema")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--text-encoder", default=None,
                        help="the text encoder's local path or hub id, if not the config's (it gives the bundle's "
                             "empty-prompt embedding)")
    args = parser.parse_args()
    ckpt = Path(args.checkpoint)
    if not (ckpt / "trainer.json").exists():
        print(f"error: {ckpt} is not a training checkpoint (no trainer.json)", file=sys.stderr)
        return 2
    try:
        path = export_bundle(ckpt, args.out, args.weights, DTYPES[args.dtype], args.text_encoder)
    except (FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({args.weights} weights, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
