"""Generate images with reward controls from a model bundle (an export of ours, or the released weights).

    python launchers/sample.py --model exports/miro_16m --prompt "a tiger in a tuxedo" \
        --reward aesthetic_score=1.0 --reward vqa_score=0.5 --guidance 7 --steps 50 --out samples/
    python launchers/sample.py --model M --prompts ../shared/data/partiprompts/PartiPrompts.tsv --limit 16 --out D
    python launchers/sample.py --model M --prompt "..." --sweep aesthetic_score --out D   # 0 -> 1 columns

Writes one PNG per image and grid.png (rows: prompts; columns: seeds or sweep values).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402

from miro_scale.evaluation.prompts import read_prompts  # noqa: E402
from miro_scale.sampling import MiroPipeline  # noqa: E402


def parse_targets(items):
    targets = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--reward/--negative-reward: expected key=value, got {item!r}")
        targets[key] = float(value)
    return targets


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a model bundle: a directory from checkpoints_tools/export.py, or a hub id (nicolas-dufour/miro)")
    p.add_argument("--model-variant", default=None, help="a bundle subfolder (e.g. of nicolas-dufour/miro-ablations)")
    p.add_argument("--prompt", action="append", default=[])
    p.add_argument("--prompts", help="prompt file: PartiPrompts .tsv, GenEval .jsonl, or one per line")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--reward", action="append", default=[], metavar="KEY=VALUE", help="s+ for a reward (default 1)")
    p.add_argument("--negative-reward", action="append", default=[], metavar="KEY=VALUE",
                   help="s- for a reward (default 0)")
    p.add_argument("--sweep", help="a reward key to sweep from 0 to 1 across the grid's columns")
    p.add_argument("--sweep-points", type=int, default=5)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--solver", choices=["euler", "heun"], default=None)
    p.add_argument("--seeds", type=int, default=1, help="images per prompt (seeds 0..N-1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    prompts = list(a.prompt) + ([x.text for x in read_prompts(a.prompts, a.limit)] if a.prompts else [])
    if not prompts:
        raise SystemExit("give --prompt or --prompts")
    pipe = MiroPipeline.from_pretrained(a.model, variant=a.model_variant, device=a.device)
    positive, negative = parse_targets(a.reward), parse_targets(a.negative_reward)
    if a.sweep:
        columns = [{**positive, a.sweep: i / (a.sweep_points - 1)} for i in range(a.sweep_points)]
        runs = [(col, 0) for col in columns]
    else:
        runs = [(positive, seed) for seed in range(a.seeds)]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    images = torch.stack([pipe(prompts, reward_targets=targets, negative_reward_targets=negative,
                               guidance_scale=a.guidance, num_inference_steps=a.steps, solver=a.solver,
                               generator=torch.Generator(pipe.device).manual_seed(seed), output_type="pt")
                          for targets, seed in runs], dim=1)  # [prompts, columns, 3, H, W] in [0, 1]
    for i, row in enumerate(images):
        for j, image in enumerate(row):
            save_image(image, out / f"{i:04d}_{j:02d}.png")
    save_image(make_grid(images.flatten(0, 1), nrow=len(runs), padding=2), out / "grid.png")
    (out / "prompts.json").write_text(json.dumps({"prompts": prompts, "columns": [
        {"reward_targets": t, "seed": s} for t, s in runs], "negative_reward_targets": negative}, indent=2))
    print(f"wrote {images.shape[0] * images.shape[1]} images and {out / 'grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
