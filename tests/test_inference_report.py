"""The Table-1 report and figures from evaluation dirs (miro_scale/evaluation/report.py, launchers/report.py)
and launchers/evaluate.py comparing two tiny models with best-of-n."""
import json
import math

import pytest
import torch

from miro_scale.evaluation.report import build_report, named_paths
from tests.test_inference_grids import launcher, tiny_bundle


def stats(mean, std=0.1, count=4):
    return {"mean": mean, "std": std, "count": count}


def evaluation(tmp_path, name, means, categories, curves=None):
    doc = {"model": name, "scale": "raw", "summary": {
        "overall": {k: stats(v) for k, v in means.items()},
        "by_category": {c: {k: stats(v) for k, v in per.items()} for c, per in categories.items()}}, "rows": []}
    if curves:
        doc["best_of_n"] = {"select": "a_score", "ns": [1, 2, 4], "curves": curves}
    (tmp_path / name).mkdir()
    (tmp_path / name / "report.json").write_text(json.dumps(doc))
    return tmp_path / name


def test_report_table_and_figures_hold_the_evaluations_numbers(tmp_path):
    base = evaluation(tmp_path, "base", {"a_score": 0.25, "b_score": 1.5, "c_score": -2.0},
                      {"colors": {"a_score": 0.5}, "counting": {"a_score": 0.125}},
                      {"a_score": [0.25, 0.3, 0.35], "b_score": [1.5, 1.4, 1.3]})
    miro = evaluation(tmp_path, "miro", {"a_score": 0.75, "b_score": 1.25, "c_score": float("nan")},
                      {"colors": {"a_score": 0.875}, "counting": {"a_score": 0.625}},
                      {"a_score": [0.75, 0.8, 0.9], "b_score": [1.25, 1.2, 1.1]})
    log = tmp_path / "run" / "reward_eval.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps({"step": s, "high": {"a_score": v}, "low": {"a_score": 0.0}}) + "\n"
                           for s, v in [(10, 0.1), (20, 0.4)]))
    path = build_report({"base": base, "miro": miro / "report.json"}, tmp_path / "out", {"miro": log.parent})
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    assert table["models"] == ["base", "miro"] and table["keys"] == ["a_score", "b_score", "c_score"]
    assert table["table"]["base"]["b_score"] == stats(1.5) and table["table"]["miro"]["a_score"] == stats(0.75)
    assert table["table"]["miro"]["c_score"]["mean"] is None  # NaN -> null: strict JSON
    assert table["best_of_n"]["miro"]["curves"]["a_score"] == [0.75, 0.8, 0.9]
    assert table["categories"]["base"] == {"colors": {"a_score": 0.5}, "counting": {"a_score": 0.125}}
    assert table["training_curves"]["miro"] == {"step": [10, 20], "a_score": [0.1, 0.4]}
    md = path.read_text()
    assert "| base | 0.2500 ± 0.1000 | 1.5000 ± 0.1000 | -2.0000 ± 0.1000 |" in md
    assert "| miro | 0.7500 ± 0.1000 | 1.2500 ± 0.1000 | - |" in md
    assert "| miro (by a) | 0.7500 | 0.8000 | 0.9000 |" in md
    for figure in ("radar", "best_of_n_a_score", "best_of_n_b_score", "categories_a_score", "training_curves"):
        assert (tmp_path / "out" / "figures" / f"{figure}.png").stat().st_size > 1000, figure

    with pytest.raises(ValueError, match="nowhere.*report.json"):
        build_report({"x": tmp_path / "nowhere"}, tmp_path / "bad")
    assert named_paths(["a=x/y", "x/z/", "org/model"], "--eval") == {"a": "x/y", "z": "x/z/", "model": "org/model"}
    with pytest.raises(ValueError, match="given twice"):
        named_paths(["a/m", "b/m"], "--eval")
    assert launcher("report").main(["--eval", str(base), "--eval", f"m2={miro}", "--out", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "table.json").read_text())["models"] == ["base", "m2"]


def test_evaluate_compares_two_models_with_best_of_n(tmp_path):
    models = [f"{name}={tiny_bundle(tmp_path / name, seed)}" for seed, name in enumerate(["baseline", "miro"])]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle", "tag": "colors"}\n'
                       '{"prompt": "two blue squares", "tag": "counting"}\n'
                       '{"prompt": "a green star", "tag": "colors"}\n')
    out = tmp_path / "eval"
    evaluate = launcher("evaluate").main
    assert evaluate(["--model", models[0], "--model", models[1], "--prompts", str(prompts), "--rewards",
                     "contrast,sharpness", "--best-of", "4,1,2", "--select", "contrast", "--batch-size", "5",
                     "--solver", "heun", "--out", str(out)]) == 0
    for name in ("baseline", "miro"):
        report = json.loads((out / name / "report.json").read_text())
        best = report["best_of_n"]
        scores = torch.tensor(best["scores"]["contrast_score"])
        assert best["ns"] == [1, 2, 4] and scores.shape == (3, 4) and report["solver"] == "heun"
        assert best["chosen"] == scores.argmax(1).tolist()
        assert best["curves"]["contrast_score"][-1] == pytest.approx(float(scores.max(1).values.mean()))
        assert report["summary"]["overall"]["contrast_score"]["mean"] == pytest.approx(float(scores[:, 0].mean()))
        assert len(list((out / name / "images").glob("*_best_of_4.png"))) == 3
    table = json.loads((out / "table.json").read_text())
    assert table["models"] == ["baseline", "miro"] and (out / "figures" / "best_of_n_contrast_score.png").exists()
    assert table["table"]["miro"]["sharpness_score"] == report["summary"]["overall"]["sharpness_score"]

    # s- reaches the sampler: the images and scores change
    runs = []
    for extra in ([], ["--negative-reward", "contrast=1", "--negative-reward", "sharpness=1"]):
        d = tmp_path / f"neg{len(extra)}"
        assert evaluate(["--model", models[1], "--prompts", str(prompts), "--rewards", "contrast", "--out", str(d),
                         *extra]) == 0
        runs.append(json.loads((d / "report.json").read_text())["summary"]["overall"]["contrast_score"]["mean"])
    assert math.isfinite(runs[0]) and runs[0] != pytest.approx(runs[1], abs=1e-6)
    with pytest.raises(SystemExit, match="--select"):
        evaluate(["--model", models[1], "--prompts", str(prompts), "--rewards", "contrast", "--best-of", "2",
                  "--select", "sharpness", "--out", str(tmp_path / "bad")])
