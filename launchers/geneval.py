"""GenEval: generate 4 images per prompt from a model bundle (or take a folder of them), detect the
objects, check each prompt's clauses, and write the per-category table of the paper's Table 1.

    python launchers/geneval.py --model exports/miro_16m \\
        --prompts ../shared/data/geneval/evaluation_metadata.jsonl --guidance 7 --steps 50 --out eval/geneval/
    python launchers/geneval.py --images eval/geneval/images --out eval/geneval/      # score existing images
    python launchers/geneval.py --model demo/models/miro --world-prompts 120 --vocabulary simple \\
        --detector synthetic --out eval/world/                                       # the synthetic world, offline

Images go to <out>/images in GenEval's layout (<index:05d>/metadata.jsonl, <index:05d>/samples/<n:05d>.png;
a rerun keeps finished prompts); <out>/results.jsonl has one row per image (GenEval's fields),
<out>/table.md and <out>/table.json the accuracy per category and overall (mean of the categories).
--detector: a transformers COCO Mask2Former or DETR-style model (directory or hub id), or "synthetic"
for the synthetic world's pixel shape detector (then colours are the detector's, not CLIP's).
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from miro_scale.evaluation import geneval  # noqa: E402
from miro_scale.evaluation.rewards import parse_reward_targets  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model bundle directory or hub id to generate the images with")
    src.add_argument("--images", help="score this folder of images in GenEval's layout instead of generating")
    p.add_argument("--model-variant", default=None, help="a bundle subfolder (e.g. of nicolas-dufour/miro-ablations)")
    p.add_argument("--prompts", help="GenEval's evaluation_metadata.jsonl (with --model)")
    p.add_argument("--world-prompts", type=int, default=None, metavar="N",
                   help="instead of --prompts: N synthetic-world prompts in GenEval's categories (with --model)")
    p.add_argument("--vocabulary", default="full", help="the synthetic world's vocabulary for --world-prompts")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt (GenEval: 4)")
    p.add_argument("--seed", type=int, default=0, help="prompt i's noise comes from seed + i")
    p.add_argument("--reward", action="append", default=[], metavar="KEY=VALUE", help="s+ for a reward (default 1)")
    p.add_argument("--negative-reward", action="append", default=[], metavar="KEY=VALUE",
                   help="s- for a reward (default 0)")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--solver", choices=["euler", "heun"], default=None)
    p.add_argument("--batch-size", type=int, default=16, help="images per generation / detection batch")
    p.add_argument("--detector", default=geneval.DEFAULT_DETECTOR,
                   help="transformers COCO detector (directory or hub id), or 'synthetic'")
    p.add_argument("--clip", default=geneval.DEFAULT_CLIP, help="transformers CLIPModel for the colour check")
    defaults = geneval.Settings()
    p.add_argument("--threshold", type=float, default=defaults.threshold, help="detection score to keep an object")
    p.add_argument("--counting-threshold", type=float, default=defaults.counting_threshold,
                   help="the same for counting prompts")
    p.add_argument("--max-objects", type=int, default=defaults.max_objects, help="per class")
    p.add_argument("--max-overlap", type=float, default=defaults.max_overlap,
                   help="box IoU above which a lower-scored box of a class is dropped (1: none)")
    p.add_argument("--position-threshold", type=float, default=defaults.position_threshold,
                   help="share of the boxes' sides taken off a centre offset before its direction is read")
    p.add_argument("--name", default=None, help="the table's row name (default: the model or image folder)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="for generation, the detector and CLIP")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    settings = geneval.Settings(a.threshold, a.counting_threshold, a.max_objects, a.max_overlap, a.position_threshold)
    try:
        positive = parse_reward_targets(a.reward, "--reward")
        negative = parse_reward_targets(a.negative_reward, "--negative-reward")
    except ValueError as e:
        raise SystemExit(str(e))
    out = Path(a.out)
    images = Path(a.images) if a.images else out / "images"
    if a.model:
        if (a.prompts is None) == (a.world_prompts is None):
            raise SystemExit("--model needs exactly one of --prompts (GenEval's metadata) or --world-prompts N")
        if a.prompts:
            try:
                metadatas = geneval.read_metadata(a.prompts, a.limit)
            except (OSError, ValueError) as e:
                raise SystemExit(f"--prompts: {e}")
        else:
            from miro_scale.synthetic.world import evaluation_prompts
            metadatas = [geneval.synthetic_metadata(q.metadata["tag"], q.metadata["scene"], q.text)
                         for q in evaluation_prompts(a.world_prompts, a.seed, a.vocabulary)][:a.limit]
        from miro_scale.sampling import MiroPipeline
        pipeline = MiroPipeline.from_pretrained(a.model, variant=a.model_variant, device=a.device)
        try:
            geneval.generate_folder(pipeline, metadatas, images, images_per_prompt=a.seeds, batch_size=a.batch_size,
                                    seed=a.seed, reward_targets=positive, negative_reward_targets=negative,
                                    guidance_scale=a.guidance, num_inference_steps=a.steps, solver=a.solver)
        except (KeyError, ValueError) as e:  # a reward key the model lacks, a target outside [0, 1]
            raise SystemExit(f"{a.model}: {e.args[0]}")
        del pipeline
    if a.detector == "synthetic":
        detector, colours = geneval.SyntheticDetector(), geneval.DetectedColours()
    else:
        detector = geneval.TransformersDetector.from_pretrained(a.detector, a.device)
        colours = geneval.ClipColourClassifier.from_pretrained(a.clip, a.device, settings)
    try:
        rows = geneval.evaluate_folder(images, detector, colours, settings, batch_size=a.batch_size)
    except (FileNotFoundError, ValueError) as e:  # not GenEval's layout, a bad metadata.jsonl
        raise SystemExit(str(e))
    if not rows:
        raise SystemExit(f"{images}: no images in GenEval's layout (<index>/samples/<n>.png)")
    name = a.name or Path(a.model or a.images).name
    summary = geneval.write_results(rows, out, name, detector=a.detector,
                                    clip=None if a.detector == "synthetic" else a.clip,
                                    settings=dataclasses.asdict(settings), image_folder=str(images),
                                    generation=None if not a.model else {
                                        "model": a.model, "prompts": a.prompts, "world_prompts": a.world_prompts,
                                        "seeds": a.seeds, "seed": a.seed, "reward": positive,
                                        "negative_reward": negative,
                                        "guidance": a.guidance, "steps": a.steps})
    print((out / "table.md").read_text().rstrip())
    print(json.dumps({"overall": summary["overall"], "images": summary["num_images"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
