"""Train a MIRO model: python launchers/train.py --config configs/tiny_cpu.json [--set key=value ...]"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from miro_scale.config import ConfigError, load_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="JSON config (see configs/)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. optim.lr=3e-4 model.latents_dim=512")
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints in the output dir")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from miro_scale.train.trainer import Trainer

    metrics = Trainer(cfg, resume=not args.no_resume).fit()
    print(f"done: step {cfg.train.steps}, loss {metrics.get('loss', float('nan')):.4f}, "
          f"checkpoints in {Path(cfg.train.output_dir) / 'checkpoints'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
