"""A Table-1 style report and the paper's figures from evaluation dirs and training runs.

    python launchers/report.py --eval baseline=eval/baseline --eval miro=eval/miro \\
        --curves baseline=runs/baseline_16m --curves miro=runs/miro_16m --out report/

--eval [NAME=]DIR: a launchers/evaluate.py output dir (or its report.json), repeatable; --curves
[NAME=]PATH: a training run's output dir (or its reward_eval.jsonl), repeatable. Writes
report/table.md and table.json (every reward's mean +- std per model, best-of-n curves, per-category
means) and report/figures/: radar.png (Fig. 4, two or more models), best_of_n_<reward>.png (Fig. 8,
evaluations run with --best-of), categories_<reward>.png (GenEval-style categories),
training_curves.png (Fig. 5, reward at s+ = 1 against the step).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from miro_scale.evaluation.report import build_report, named_paths  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", action="append", default=[], metavar="[NAME=]DIR",
                   help="a launchers/evaluate.py output dir or its report.json (repeatable)")
    p.add_argument("--curves", action="append", default=[], metavar="[NAME=]PATH",
                   help="a training run's output dir or its reward_eval.jsonl (repeatable)")
    p.add_argument("--out", required=True, help="output directory")
    a = p.parse_args(argv)
    if not a.eval and not a.curves:
        raise SystemExit("give --eval and/or --curves")
    try:
        path = build_report(named_paths(a.eval, "--eval"), Path(a.out), named_paths(a.curves, "--curves"))
    except ValueError as e:
        raise SystemExit(str(e))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
