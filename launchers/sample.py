"""Generate images with reward controls from a model bundle (an export of ours, or the released weights).

    python launchers/sample.py --model exports/miro_16m --prompt "a tiger in a tuxedo" \\
        --reward aesthetic=1.0 --reward vqa=0.5 --guidance 7 --steps 50 --out samples/
    python launchers/sample.py --model M --prompts ../shared/data/partiprompts/PartiPrompts.tsv --limit 16 \\
        --seeds 4 --out D
    python launchers/sample.py --model M --prompt "..." --sweep aesthetic --out D   # s+_aesthetic 0 -> 1 (Fig. 12)
    python launchers/sample.py --model M --prompt "..." --isolation --out D         # a column per reward (Fig. 9)
    python launchers/sample.py --model M --prompt "..." --interpolate aesthetic,vqa --sweep-points 5 --out D
    python launchers/sample.py --model M --prompt "..." --best-of 64 --select aesthetic \\
        --rewards aesthetic,hpsv2 --reward-config weights.json --out D               # best of 64 by aesthetic

Grids (rows: prompts; one column per setting): --seeds N (seeds --seed .. --seed + N - 1),
--sweep KEY (s+_KEY from 0 to 1 in --sweep-points steps, the other s+ and s- as given), --isolation
(column j: s+ = 1, s- = 1 except s-_j = 0; then "all": s- = 0), --interpolate A,B (s+ = 1, s- = 1
except s-_A = t, s-_B = 1 - t). Column c of every prompt starts from the noise of seed --seed (or of
its own seed), so columns differ only in their setting. All prompt x column images run in batched
pipeline calls of --batch-size images. Writes {row:04d}_{column:02d}.png, grid.png (labelled) and
grid.json (prompts, every column's s+ and s- and seed).

Best-of-N (--best-of N): N candidates per prompt (candidate k from seed --seed + k; N = 1 is plain
sampling), scored by the rewards of --rewards (registry keys or aliases: the paper's seven need
their weights through --reward-config; the synthetic world's pixel rewards need none), the one that
--select scores highest kept. Writes {row:04d}_best.png, best_of_n.json (every candidate's scores,
the chosen index and its scores) and grid.png (the kept images).

Reward keys take the short names too (aesthetic, vqa, hps, pick, clip, ...; miro_scale/rewards/registry.py).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

from miro_scale.bundle import add_bundle_arguments  # noqa: E402
from miro_scale.evaluation import grids  # noqa: E402
from miro_scale.evaluation.prompts import read_prompts  # noqa: E402
from miro_scale.evaluation.rewards import (RewardEvaluator, load_reward_config, parse_reward_targets,  # noqa: E402
                                           reward_keys)
from miro_scale.sampling import MiroPipeline  # noqa: E402


def columns_from(a, keys, positive, negative):
    """The grid's columns for the chosen mode; ValueError/KeyError on a bad flag."""
    if a.isolation:
        return grids.isolation_columns(keys, a.seed)
    if a.interpolate:
        pair = reward_keys(a.interpolate, "--interpolate")
        if len(pair) != 2:
            raise ValueError(f"--interpolate: expected two reward keys A,B, got {a.interpolate!r}")
        return grids.interpolation_columns(keys, *pair, a.sweep_points, a.seed)
    if a.sweep:
        return grids.sweep_columns(reward_keys(a.sweep, "--sweep")[0], a.sweep_points, positive, negative, a.seed)
    return grids.seed_columns(range(a.seed, a.seed + a.seeds), positive, negative)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bundle_arguments(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="prompt file: PartiPrompts .tsv, GenEval .jsonl, or one per line")
    p.add_argument("--limit", type=int, default=None, help="the first N prompts of --prompts")
    p.add_argument("--reward", action="append", default=[], metavar="KEY=VALUE", help="s+ for a reward (default 1)")
    p.add_argument("--negative-reward", action="append", default=[], metavar="KEY=VALUE",
                   help="s- for a reward (default 0)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--seeds", type=int, default=1,
                      help="images per prompt, seeds --seed .. --seed + N - 1 (default 1)")
    mode.add_argument("--sweep", metavar="KEY", help="sweep s+ of this reward from 0 to 1 across the columns")
    mode.add_argument("--isolation", action="store_true",
                      help="one column per reward j (s- = 1 except s-_j = 0) and an 'all' column (s- = 0)")
    mode.add_argument("--interpolate", metavar="A,B", help="s-_A = t, s-_B = 1 - t across the columns, the rest at 1")
    mode.add_argument("--best-of", type=int, metavar="N", help="keep the best of N candidates per prompt (by --select)")
    p.add_argument("--sweep-points", type=int, default=5, help="columns of --sweep and --interpolate (default 5)")
    p.add_argument("--select", metavar="KEY", help="with --best-of: the reward that picks the kept candidate")
    p.add_argument("--rewards", metavar="KEYS",
                   help="with --best-of: comma-separated rewards to score (default: --select)")
    p.add_argument("--variant", default="pretrained", choices=["pretrained", "random", "tiny"],
                   help="with --best-of: reward weights: released (pretrained), random full-size, or tiny random")
    p.add_argument("--reward-config", default=None,
                   help="JSON file {reward_key: {builder kwargs}} (weights paths...), as for preprocessing/score.py")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale w (default: the bundle's)")
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the bundle's)")
    p.add_argument("--solver", choices=["euler", "heun"], default=None, help="default: the bundle's")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the first column / candidate")
    p.add_argument("--batch-size", type=int, default=16, help="images per pipeline call (default 16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="output directory")
    a = p.parse_args(argv)
    prompts = list(a.prompt) + ([x.text for x in read_prompts(a.prompts, a.limit)] if a.prompts else [])
    if not prompts:
        raise SystemExit("give --prompt or --prompts")
    if a.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.best_of is not None and not a.select:
        raise SystemExit("--best-of needs --select KEY (the reward that picks the kept candidate)")
    try:
        positive = parse_reward_targets(a.reward, "--reward")
        negative = parse_reward_targets(a.negative_reward, "--negative-reward")
        evaluator = select = None
        if a.best_of is not None:
            select = reward_keys(a.select, "--select")[0]
            scored = reward_keys(a.rewards or a.select)
            if select not in scored:
                raise ValueError(f"--select {a.select}: not among --rewards {a.rewards}")
            evaluator = RewardEvaluator(scored, a.variant, a.device, load_reward_config(a.reward_config))
    except ValueError as e:
        raise SystemExit(str(e))
    pipe = MiroPipeline.from_pretrained(a.model, variant=a.model_variant, device=a.device)
    sample_kwargs = dict(guidance_scale=a.guidance, num_inference_steps=a.steps, solver=a.solver)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if evaluator is not None:
        from miro_scale.evaluation.search import best_of_n_search

        result = best_of_n_search(pipe, prompts, evaluator, a.best_of, select, seed=a.seed, batch_size=a.batch_size,
                                  reward_targets=positive, negative_reward_targets=negative, progress=True,
                                  **sample_kwargs)
        for i, image in enumerate(result.images):
            save_image(image, out / f"{i:04d}_best.png")
        grids.labelled_grid(result.images[:, None], out / "grid.png", prompts, [f"best of {a.best_of} by {select}"])
        chosen = result.chosen_scores()
        (out / "best_of_n.json").write_text(json.dumps({
            "model": a.model, "n": a.best_of, "select": select, "seed": a.seed, "reward_targets": positive,
            "negative_reward_targets": negative, **sample_kwargs,
            "prompts": [{"prompt": text, "chosen": int(result.chosen[i]),
                         "chosen_scores": {k: chosen[k][i] for k in chosen},
                         "scores": {k: v[i].tolist() for k, v in result.scores.items()}}
                        for i, text in enumerate(prompts)]}, indent=2))
        for key, values in chosen.items():
            print(f"{key:<28} best of {a.best_of}: mean {sum(values) / len(values):.4f}")
        print(f"wrote {len(prompts)} images, {out / 'best_of_n.json'} and {out / 'grid.png'}")
        return 0
    keys = pipe.cfg.model.reward_keys
    try:
        columns = columns_from(a, keys, positive, negative)
        images = grids.generate_grid(pipe, prompts, columns, batch_size=a.batch_size, progress=True, **sample_kwargs)
    except (KeyError, ValueError) as e:  # a reward key the model lacks, a target outside [0, 1]
        raise SystemExit(f"{a.model}: {e.args[0]}")
    for i, row in enumerate(images):
        for j, image in enumerate(row):
            save_image(image, out / f"{i:04d}_{j:02d}.png")
    grids.labelled_grid(images, out / "grid.png", prompts, [c.label for c in columns])
    (out / "grid.json").write_text(json.dumps({
        "model": a.model, "prompts": prompts, **sample_kwargs,
        "columns": [{"label": c.label, "reward_targets": c.positive, "negative_reward_targets": c.negative,
                     "seed": c.seed} for c in columns]}, indent=2))
    print(f"wrote {images.shape[0] * images.shape[1]} images and {out / 'grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
