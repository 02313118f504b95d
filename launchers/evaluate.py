"""Reward evaluation of exported models on a prompt set (PartiPrompts TSV, GenEval JSONL, or lines).

    python launchers/evaluate.py --model exports/miro_16m \\
        --prompts ../shared/data/partiprompts/PartiPrompts.tsv --limit 200 \\
        --rewards aesthetic,hpsv2,pickscore,image_reward --reward-config weights.json --out eval/parti/
    python launchers/evaluate.py --model baseline=exports/baseline_16m --model miro=exports/miro_16m \\
        --prompts P.tsv --limit 100 --rewards aesthetic,hpsv2 --reward-config weights.json \\
        --best-of 1,2,4,8,16,32,64,128 --select aesthetic --out eval/tts/      # Fig. 8, baseline vs MIRO

One --model: eval/parti/report.json (mean and std per reward, overall and per category; every
image's scores), images/, and the report below. Several (--model NAME=PATH, repeatable): one such
directory per model, eval/NAME/, and one report comparing them. The report (as launchers/report.py
writes it from evaluation dirs): table.md and table.json (the Table-1 style table), figures/ (radar,
best-of-n curves, per-category bars).

--best-of N1,N2,...: max(N) candidates per prompt (candidate k from seed --seed + k), scored by
every --rewards; the report's rows and summary are candidate 0's (plain sampling), its "best_of_n"
section has every candidate's scores, the index --select keeps, and for each n the mean reward of
the kept image over --repeats random n-subsets (test-time scaling); images/ holds the kept images.

--units paper reports in the paper's Table 1 units. Reward targets (keys or aliases: aesthetic,
vqa, ...), guidance, steps and solver as in launchers/sample.py.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from miro_scale.evaluation.prompts import read_prompts  # noqa: E402
from miro_scale.evaluation.report import build_report, named_paths  # noqa: E402
from miro_scale.evaluation.rewards import (RewardEvaluator, evaluate_rewards, load_reward_config,  # noqa: E402
                                           parse_reward_targets, reward_keys, write_report)
from miro_scale.rewards.units import convert_evaluation  # noqa: E402
from miro_scale.sampling import MiroPipeline  # noqa: E402


def parse_sizes(text: str):
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise SystemExit(f"--best-of: expected comma-separated sizes >= 1 (1,2,4,8), got {text!r}")
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, action="append", metavar="[NAME=]PATH",
                   help="a model bundle directory or hub id; repeat (NAME=PATH) to compare models")
    p.add_argument("--model-variant", default=None, help="a bundle subfolder (e.g. of nicolas-dufour/miro-ablations)")
    p.add_argument("--prompts", required=True, help="prompt file: PartiPrompts .tsv, GenEval .jsonl, or one per line")
    p.add_argument("--limit", type=int, default=None, help="the first N prompts")
    p.add_argument("--rewards", required=True, help="comma-separated reward keys or aliases")
    p.add_argument("--variant", default="pretrained", choices=["pretrained", "random", "tiny"],
                   help="reward weights: released (pretrained), random full-size, or tiny random (tests)")
    p.add_argument("--reward-config", default=None,
                   help="JSON file {reward_key: {builder kwargs}} (weights paths...), as for preprocessing/score.py")
    p.add_argument("--reward", action="append", default=[], metavar="KEY=VALUE", help="s+ for a reward (default 1)")
    p.add_argument("--negative-reward", action="append", default=[], metavar="KEY=VALUE",
                   help="s- for a reward (default 0)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale w (default: the bundle's)")
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the bundle's)")
    p.add_argument("--solver", choices=["euler", "heun"], default=None, help="default: the bundle's")
    p.add_argument("--best-of", metavar="N1,N2,...", help="test-time scaling: best of n by --select for each n")
    p.add_argument("--select", metavar="KEY",
                   help="with --best-of: the reward that picks (default: the first of --rewards)")
    p.add_argument("--repeats", type=int, default=16, help="with --best-of: random n-subsets per n (default 16)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--units", default="raw", choices=["raw", "paper", "release"],
                   help="units of the report: raw model outputs, paper (Table 1: PickScore/100), or release "
                        "(what MIRO binned)")
    p.add_argument("--out", required=True, help="output directory")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {a.batch_size}")
    sizes = parse_sizes(a.best_of) if a.best_of else None
    try:
        models = named_paths(a.model, "--model")
        targets = parse_reward_targets(a.reward, "--reward")
        negative = parse_reward_targets(a.negative_reward, "--negative-reward")
        keys = reward_keys(a.rewards)
        select = reward_keys(a.select, "--select")[0] if a.select else keys[0]
        if select not in keys:
            raise ValueError(f"--select {a.select}: not among --rewards {a.rewards}")
        evaluator = RewardEvaluator(keys, a.variant, a.device, load_reward_config(a.reward_config))
    except ValueError as e:
        raise SystemExit(str(e))
    prompts = read_prompts(a.prompts, a.limit)
    sample_kwargs = dict(negative_reward_targets=negative, guidance_scale=a.guidance, num_inference_steps=a.steps,
                         solver=a.solver)
    out = Path(a.out)
    dirs = {}
    for name, model in models.items():
        model_dir = out if len(models) == 1 else out / name
        pipeline = MiroPipeline.from_pretrained(model, variant=a.model_variant, device=a.device)
        try:
            if sizes:
                from miro_scale.evaluation.search import search_evaluation

                result = search_evaluation(pipeline, prompts, evaluator, sizes, select, repeats=a.repeats,
                                           seed=a.seed, scale=a.units, out_dir=model_dir / "images",
                                           batch_size=a.batch_size, reward_targets=targets, progress=True,
                                           **sample_kwargs)
            else:
                result = convert_evaluation(evaluate_rewards(pipeline, prompts, evaluator, reward_targets=targets,
                                                             batch_size=a.batch_size, seed=a.seed,
                                                             out_dir=model_dir / "images", **sample_kwargs), a.units)
        except (KeyError, ValueError) as e:  # a reward key the model lacks, a target outside [0, 1]
            raise SystemExit(f"{model}: {e.args[0]}")
        path = write_report(result, model_dir / "report.json", model=model, prompts=a.prompts,
                            reward_targets=targets, negative_reward_targets=negative, guidance=a.guidance,
                            steps=a.steps, solver=a.solver, seed=a.seed)
        dirs[name] = model_dir
        print(f"{name}:")
        for key, stats in result["summary"]["overall"].items():
            print(f"  {key:<28} {stats['mean']:10.4f} +- {stats['std']:.4f} (n={stats['count']})")
        if sizes:
            curve = result["best_of_n"]["curves"][select]
            print(f"  best of n by {select}: " + ", ".join(f"{n}: {v:.4f}" for n, v in zip(sizes, curve)))
        print(f"  wrote {path}")
    print(f"wrote {build_report(dirs, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
