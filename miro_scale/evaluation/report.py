"""A Table-1 style comparison of models from their evaluations (launchers/evaluate.py output dirs).

build_report({name: eval dir or its report.json}, out, curves={name: reward_eval.jsonl or run dir})
writes, in ``out``:
- table.md and table.json: every reward's mean +- std per model (the units each evaluation was
  written in), the best-of-n curves of the evaluations run with --best-of, and per prompt category
  the mean of each reward
- figures/radar.png (Fig. 4): each reward min-max scaled over the models (two or more models,
  three or more rewards), figures/best_of_n_<reward>.png (Fig. 8: reward of the kept image against
  n on a log2 axis), figures/categories_<reward>.png (GenEval-style category bars) and
  figures/training_curves.png (Fig. 5: each reward at s+ = 1 against the training step, from the
  runs' reward_eval.jsonl)
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from miro_scale.evaluation import plots
from miro_scale.evaluation.metrics import nan_to_none, summary_table


def named_paths(items: Sequence[str], flag: str) -> Dict[str, str]:
    """Command-line [NAME=]PATH items -> {name: path}; a bare path (or hub id) is named after its last
    component (its directory's, for a report.json or reward_eval.jsonl)."""
    out: Dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or "/" in name:  # a hub id, or a path holding '=' further on
            path, name = item, Path(item.rstrip("/")).name
            if name in ("report.json", "reward_eval.jsonl"):
                name = Path(item).parent.name
        if not name or not path:
            raise ValueError(f"{flag}: expected [NAME=]PATH, got {item!r}")
        if name in out:
            raise ValueError(f"{flag}: the name {name!r} is given twice; name them NAME=PATH")
        out[name] = path
    return out


def load_evaluation(path: Path) -> Dict:
    """An evaluation's report.json (``path``: the file or its directory)."""
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    try:
        doc = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not an evaluation report (launchers/evaluate.py writes report.json): {e}") from None
    if not isinstance(doc, dict) or "overall" not in doc.get("summary", {}):
        raise ValueError(f"{file}: no summary.overall; not written by launchers/evaluate.py")
    return doc


def read_reward_log(path: Path) -> Dict[str, List[float]]:
    """A training run's reward_eval.jsonl (``path``: the file or the run's output dir) -> {"step": [...],
    key: [score of the s+ = 1 row at each step]}."""
    path = Path(path)
    file = path / "reward_eval.jsonl" if path.is_dir() else path
    try:
        records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a training reward log (reward_eval.jsonl): {e}") from None
    if not records or not all("step" in r and "high" in r for r in records):
        raise ValueError(f"{file}: expected JSON lines with 'step' and 'high' (the RewardCurves callback's log)")
    curve: Dict[str, List[float]] = {"step": [r["step"] for r in records]}
    for key in records[0]["high"]:
        curve[key] = [r["high"].get(key, math.nan) for r in records]
    return curve


def _finite(x):
    """JSON-safe: NaN and infinities as null (strict JSON readers reject them)."""
    if isinstance(x, float):
        return nan_to_none(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _fmt(stats: Optional[Mapping]) -> str:
    if not stats or stats.get("mean") is None or not math.isfinite(stats["mean"]):
        return "-"
    return f"{stats['mean']:.4f} ± {stats['std']:.4f}"


def build_report(evaluations: Mapping[str, Path], out: Path, curves: Optional[Mapping[str, Path]] = None) -> Path:
    """Writes table.md, table.json and figures/ into ``out``; returns table.md's path."""
    if not evaluations and not curves:
        raise ValueError("nothing to report: give evaluations and/or training curves")
    out = Path(out)
    figures = out / "figures"
    docs = {name: load_evaluation(path) for name, path in evaluations.items()}
    keys: List[str] = []
    for doc in docs.values():
        keys += [k for k in doc["summary"]["overall"] if k not in keys]
    table = {name: {k: doc["summary"]["overall"].get(k) for k in keys} for name, doc in docs.items()}
    result: Dict = {"models": list(docs), "keys": keys, "sources": {n: str(p) for n, p in evaluations.items()},
                    "units": {n: doc.get("scale", "raw") for n, doc in docs.items()}, "table": table,
                    "figures": {}}
    lines = ["# Evaluation report", ""]
    if docs:
        lines += ["Mean ± std over the prompts' images (units: "
                  + ", ".join(f"{n} {u}" for n, u in result["units"].items()) + ").", "",
                  summary_table({n: {k: _fmt(s) for k, s in row.items()} for n, row in table.items()}, keys,
                                fmt="{}"), ""]
    if len(docs) >= 2 and len(keys) >= 3:
        scaled = {}
        for k in keys:
            values = [table[n][k]["mean"] for n in docs if table[n][k] and math.isfinite(table[n][k]["mean"])]
            lo, hi = (min(values), max(values)) if values else (0.0, 0.0)
            for n in docs:
                stats = table[n][k]
                v = stats["mean"] if stats else math.nan
                scaled.setdefault(n, {})[k] = (v - lo) / (hi - lo) if hi > lo and math.isfinite(v) else math.nan
        result["figures"]["radar"] = str(plots.radar(scaled, keys, figures / "radar.png",
                                                     title="mean reward, min-max over the models"))
        lines += ["![radar](figures/radar.png)", ""]

    best = {n: doc["best_of_n"] for n, doc in docs.items() if "best_of_n" in doc}
    if best:
        result["best_of_n"] = {n: {"select": b["select"], "ns": b["ns"], "curves": b["curves"]}
                               for n, b in best.items()}
        lines += ["## Best-of-n (random search)", ""]
        for key in keys:
            have = {n: b["curves"] for n, b in best.items() if key in b["curves"]}
            if not have:
                continue
            path = plots.best_of_n_curves(have, {n: best[n]["ns"] for n in have}, key,
                                          figures / f"best_of_n_{key}.png")
            result["figures"][f"best_of_n_{key}"] = str(path)
            ns = sorted({x for n in have for x in best[n]["ns"]})
            rows = {f"{n} (by {best[n]['select'].removesuffix('_score')})":
                    dict(zip(map(str, best[n]["ns"]), best[n]["curves"][key])) for n in have}
            lines += [f"{key}, mean of the kept image:", "",
                      summary_table(rows, [str(x) for x in ns], fmt="{:.4f}", first="n ->"), "",
                      f"![best of n {key}](figures/best_of_n_{key}.png)", ""]

    categorised = {n: doc["summary"]["by_category"] for n, doc in docs.items() if "by_category" in doc["summary"]}
    if categorised:
        result["categories"] = {n: {c: {k: nan_to_none(s["mean"]) for k, s in per.items()} for c, per in cats.items()}
                                for n, cats in categorised.items()}
        lines += ["## Per category", ""]
        for key in keys:
            values = {n: {c: per[key]["mean"] for c, per in cats.items() if key in per}
                      for n, cats in categorised.items()}
            values = {n: v for n, v in values.items() if v}
            if not values:
                continue
            path = plots.category_bars(values, figures / f"categories_{key}.png", key, title=f"{key} per category")
            result["figures"][f"categories_{key}"] = str(path)
            categories = list(dict.fromkeys(c for v in values.values() for c in v))
            lines += [f"{key}:", "", summary_table(values, categories, fmt="{:.4f}"), "",
                      f"![{key} per category](figures/categories_{key}.png)", ""]

    if curves:
        logs = {n: read_reward_log(p) for n, p in curves.items()}
        curve_keys = list(dict.fromkeys(k for c in logs.values() for k in c if k != "step"))
        path = plots.training_curves(logs, curve_keys, figures / "training_curves.png",
                                     title="reward at s+ = 1 during training")
        result["figures"]["training_curves"] = str(path)
        result["training_curves"] = logs
        lines += ["## Reward during training", "", "![training curves](figures/training_curves.png)", ""]

    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps(_finite(result), indent=2, allow_nan=False))
    path = out / "table.md"
    path.write_text("\n".join(lines))
    return path
