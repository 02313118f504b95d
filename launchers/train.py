"""Train a MIRO model.

    python launchers/train.py --config configs/tiny_cpu.json                      # one process
    torchrun --nnodes N --nproc_per_node G launchers/train.py --config C --engine fsdp
    deepspeed launchers/train.py --config configs/miro_16m.json                   # engine.kind deepspeed
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from miro_scale.config import ConfigError, load_config  # noqa: E402
from miro_scale.train.ownership import RunOwnedError, die_with_launcher  # noqa: E402


def main() -> int:
    if "LOCAL_RANK" in os.environ:  # a rank of torchrun / the deepspeed launcher: never outlive it
        die_with_launcher()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="JSON config (see configs/)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. optim.lr=3e-4 model.latents_dim=512")
    parser.add_argument("--engine", choices=["local", "fsdp", "deepspeed"],
                        help="shorthand for --set engine.kind=...")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many steps in this run (the schedule still spans train.steps)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start a new run; refused when the output dir holds an earlier run's checkpoints")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK is used
    args = parser.parse_args()
    overrides = list(args.set) + ([f"engine.kind={args.engine}"] if args.engine else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from miro_scale.train.callbacks import callbacks_from_config
    from miro_scale.train.trainer import Trainer

    try:
        trainer = Trainer(cfg, resume=not args.no_resume, callbacks=callbacks_from_config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except RunOwnedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    try:
        metrics = trainer.fit(args.max_steps)
    except BaseException:
        trainer.release()
        raise
    trainer.close()
    if trainer.rank == 0:
        print(f"done: step {trainer.step}, loss {metrics.get('loss', float('nan')):.4f}, "
              f"checkpoints in {Path(cfg.train.output_dir) / 'checkpoints'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
