"""Reward evaluation of an exported model on a prompt set (PartiPrompts TSV, GenEval JSONL, or lines).

    python launchers/evaluate.py --model exports/miro_16m \
        --prompts ../shared/data/partiprompts/PartiPrompts.tsv --limit 200 \
        --rewards aesthetic_score,hpsv2_score,pick_a_score_score,image_reward_score \
        --reward-config weights.json --out eval/parti/

Writes eval/parti/report.json (mean and std per reward, overall and per category; every image's
scores) and the images; --units paper reports in the paper's Table 1 units. Reward targets and guidance as in launchers/sample.py.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from miro_scale.evaluation.prompts import read_prompts  # noqa: E402
from miro_scale.evaluation.rewards import RewardEvaluator, evaluate_rewards, write_report  # noqa: E402
from miro_scale.rewards.units import convert_evaluation  # noqa: E402
from miro_scale.sampling import MiroPipeline  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model bundle directory or hub id")
    p.add_argument("--model-variant", default=None, help="a bundle subfolder (e.g. of nicolas-dufour/miro-ablations)")
    p.add_argument("--prompts", required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--rewards", required=True, help="comma-separated reward keys or aliases")
    p.add_argument("--variant", default="pretrained", choices=["pretrained", "random", "tiny"])
    p.add_argument("--reward-config", default=None,
                   help="JSON file {reward_key: {builder kwargs}} (weights paths...), as for preprocessing/score.py")
    p.add_argument("--reward", action="append", default=[], metavar="KEY=VALUE", help="s+ for a reward (default 1)")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--units", default="raw", choices=["raw", "paper", "release"],
                   help="units of the report: raw model outputs, paper (Table 1: PickScore/100), or release "
                        "(what MIRO binned)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    targets = {}
    for item in a.reward:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--reward: expected key=value, got {item!r}")
        targets[key] = float(value)
    from miro_scale.rewards.registry import canonical_key

    keys = [canonical_key(k) for k in a.rewards.split(",") if k.strip()]
    prompts = read_prompts(a.prompts, a.limit)
    pipeline = MiroPipeline.from_pretrained(a.model, variant=a.model_variant, device=a.device)
    reward_kwargs = {}
    if a.reward_config:
        reward_kwargs = {canonical_key(k): v for k, v in json.loads(Path(a.reward_config).read_text()).items()}
    evaluator = RewardEvaluator(keys, a.variant, a.device, reward_kwargs)
    out = Path(a.out)
    result = evaluate_rewards(pipeline, prompts, evaluator, reward_targets=targets, batch_size=a.batch_size,
                              seed=a.seed, out_dir=out / "images", guidance_scale=a.guidance, num_inference_steps=a.steps)
    result = convert_evaluation(result, a.units)
    path = write_report(result, out / "report.json", model=a.model, prompts=a.prompts, reward_targets=targets,
                        guidance=a.guidance, steps=a.steps, seed=a.seed)
    for key, stats in result["summary"]["overall"].items():
        print(f"{key:<28} {stats['mean']:10.4f} +- {stats['std']:.4f} (n={stats['count']})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
