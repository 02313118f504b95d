"""Serve a web page to sample a model bundle with its reward dials (Gradio): a prompt, a slider per
reward for s+ and for s-, guidance, steps, seed, best-of-N, Generate.

    python launchers/web_demo.py --model demo/models/miro --port 7860            # the synthetic world's MIRO
    python launchers/web_demo.py --model nicolas-dufour/miro --device cuda \\
        --rewards aesthetic,pickscore --reward-config weights.json --host 0.0.0.0

Best-of-N selects on the synthetic world's pixel rewards when the model is conditioned on them, else
on --rewards (registry keys or aliases; the paper's seven need their weights via --reward-config);
without either the page has no best-of-N. Needs the "web" extra (gradio).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from miro_scale.bundle import add_bundle_arguments  # noqa: E402
from miro_scale.evaluation.rewards import RewardEvaluator, load_reward_config, reward_keys  # noqa: E402
from miro_scale.sampling import MiroPipeline  # noqa: E402
from miro_scale.web_demo import DemoModel, build_app, default_select_rewards  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bundle_arguments(p)
    p.add_argument("--rewards", metavar="KEYS", default=None,
                   help="comma-separated rewards best-of-N may select on (default: the model's own pixel rewards "
                        "for a synthetic-world model, else none)")
    p.add_argument("--variant", default="pretrained", choices=["pretrained", "random", "tiny"],
                   help="with --rewards: reward weights: released (pretrained), random full-size, or tiny random")
    p.add_argument("--reward-config", default=None,
                   help="JSON file {reward_key: {builder kwargs}} (weights paths...), as for preprocessing/score.py")
    p.add_argument("--max-best-of", type=int, default=16, help="the best-of-N slider's maximum (default 16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="for the model and the best-of-N rewards")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="default 7860")
    a = p.parse_args(argv)
    if a.max_best_of < 1:
        raise SystemExit(f"--max-best-of must be >= 1, got {a.max_best_of}")
    pipe = MiroPipeline.from_pretrained(a.model, variant=a.model_variant, device=a.device)
    try:
        keys = reward_keys(a.rewards, "--rewards") if a.rewards else default_select_rewards(pipe.cfg.model.reward_keys)
        evaluator = RewardEvaluator(keys, a.variant, a.device, load_reward_config(a.reward_config)) if keys else None
    except ValueError as e:
        raise SystemExit(str(e))
    app = build_app(DemoModel(pipe, evaluator), title=f"MIRO: {a.model}", max_best_of=a.max_best_of)
    app.queue().launch(server_name=a.host, server_port=a.port, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
