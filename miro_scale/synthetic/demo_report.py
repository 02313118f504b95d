"""The evaluation and report of launchers/demo.py: three models on the synthetic world, measured
against the paper's four claims with the library's evaluation code (miro_scale/evaluation/).

evaluate() samples every model through MiroPipeline and scores with the world's rewards; each piece
(one checkpoint's curve point, one model's final samples, one sweep) is cached under
eval/cache_<settings fingerprint>/ as it finishes, so a killed evaluation resumes. write_report() turns the results into figures and
report.md (written last).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

import numpy as np
import torch

from miro_scale.evaluation import claims as claim_checks
from miro_scale.evaluation import plots
from miro_scale.evaluation.generation import ScoredSamples, category_of, generate_and_score
from miro_scale.evaluation.metrics import (best_of_n, category_summary, controllability, mean_finite,
                                           paired_difference, percentile, summary_table)
from miro_scale.evaluation.rewards import RewardEvaluator
from miro_scale.synthetic.world import evaluation_prompts, render_scene

AGGREGATE = "mean_percentile"
# signal levels at which the models redraw the true scenes of the prompts (section "Drawing")
DENOISE_GAMMAS = (0.2, 0.4, 0.6, 0.8)
TYPICAL_ROW = "miro, caption 1, image statistics 0.5"


def _cached(path: Path, make) -> ScoredSamples:
    """The ScoredSamples saved at path (tensors, strings and lists only: read with weights_only), else
    make()'s, saved there whole (by rename)."""
    if path.exists():
        return ScoredSamples(**torch.load(path, weights_only=True))
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(asdict(value), tmp)
    os.replace(tmp, path)
    return value


def training_scores(scores_dir: Path, keys: Sequence[str]) -> Dict[str, np.ndarray]:
    """Every training sample's raw score per reward (the score stage's parquet files): the reference
    distribution that puts rewards on a common percentile scale."""
    import pyarrow.parquet as pq

    values = {key: [] for key in keys}
    for path in sorted(scores_dir.glob("*.scores.parquet")):
        table = pq.read_table(path, columns=[k for k in keys])
        for key in keys:
            values[key].append(np.asarray(table.column(key).to_numpy(zero_copy_only=False), np.float64))
    return {key: np.concatenate(v) if v else np.zeros(0) for key, v in values.items()}


def _percentiles(samples: ScoredSamples, reference: Mapping[str, np.ndarray]) -> Dict[str, float]:
    """Mean over images of each image's percentile in the training data, per reward."""
    out = {}
    for key, values in samples.scores.items():
        v = values.float().ravel().numpy()
        v = v[np.isfinite(v)]
        out[key] = float(percentile(v, reference[key]).mean()) if len(v) else float("nan")
    return out


def _targets(name: str, specialist_reward: str) -> dict:
    """The reward dials each model samples with in the comparison: MIRO every reward at 1, the
    specialist its reward at 1, the baseline none."""
    return {"miro": {}, "specialist": {specialist_reward: 1.0}, "baseline": {}}.get(name, {})


@torch.no_grad()
def evaluate(work: Path, preset, models: Mapping[str, str], keys: Sequence[str], specialist_reward: str,
             vocabulary: str, alignment_ok: float, seed: int = 0) -> Dict:
    from miro_scale.sampling import MiroPipeline

    torch.set_grad_enabled(False)
    # cached pieces are valid for these settings only: another preset, seed or step count gets its own
    fingerprint = hashlib.sha256(json.dumps([asdict(preset), list(keys), vocabulary, seed, alignment_ok],
                                            sort_keys=True, default=str).encode()).hexdigest()[:12]
    cache = work / "eval" / f"cache_{fingerprint}"
    evaluator = RewardEvaluator(keys)
    reference = training_scores(work / "scores", keys)
    prompts = evaluation_prompts(preset.eval_prompts, seed=seed + 1, vocab=vocabulary, resolution=preset.resolution)
    gen = dict(batch_size=preset.batch_size, seed=seed + 12345, num_inference_steps=preset.sampling_steps,
               guidance_scale=preset.guidance)

    # 1. reward curves over training: every kept checkpoint, one image per prompt, the same noise
    curves: Dict[str, Dict[str, List[float]]] = {}
    for name in models:
        ckpts = sorted((work / "runs" / name / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
        curve = {"step": []}
        for ckpt in ckpts:
            step = int(ckpt.name[5:])

            def make(ckpt=ckpt, step=step):
                pipe = MiroPipeline.from_checkpoint(ckpt, device=preset.device)
                return generate_and_score(pipe, prompts, evaluator, reward_targets=_targets(name, specialist_reward),
                                          desc=f"curve {name} step {step}", **gen)

            s = _cached(cache / f"curve_{name}_{step:08d}.pt", make)
            pct = _percentiles(s, reference)
            curve["step"].append(step)
            for key in keys:
                curve.setdefault(key, []).append(s.mean(key))
                curve.setdefault(f"{key}_pct", []).append(pct[key])
            curve.setdefault(AGGREGATE, []).append(mean_finite([pct[k] for k in keys]))
        curves[name] = curve

    # 2. the exported models: several images per prompt (means, categories, best-of-n, grids)
    final: Dict[str, ScoredSamples] = {}
    pipes = {}
    for name in models:
        pipes[name] = MiroPipeline.from_pretrained(str(work / "models" / name), device=preset.device)
        final[name] = _cached(cache / f"final_{name}.pt", lambda name=name: generate_and_score(
            pipes[name], prompts, evaluator, images_per_prompt=preset.images_per_prompt,
            reward_targets=_targets(name, specialist_reward), desc=f"final {name}", **gen))
    means = {name: s.means() for name, s in final.items()}
    means_pct = {name: _percentiles(s, reference) for name, s in final.items()}
    for name in means_pct:
        means_pct[name][AGGREGATE] = mean_finite([means_pct[name][k] for k in keys])
    # MIRO with reward CFG at its config's weight, the same prompts and noise: what guidance trades
    cfg_weight = pipes["miro"].cfg.sampling.guidance_scale
    with_cfg = _cached(cache / "final_miro_cfg.pt", lambda: generate_and_score(
        pipes["miro"], prompts, evaluator, images_per_prompt=preset.images_per_prompt,
        reward_targets=_targets("miro", specialist_reward), desc="final miro with reward CFG",
        **dict(gen, guidance_scale=cfg_weight)))
    miro_cfg = {"guidance": cfg_weight, "means": with_cfg.means(), "means_pct": _percentiles(with_cfg, reference)}
    miro_cfg["means_pct"][AGGREGATE] = mean_finite([miro_cfg["means_pct"][k] for k in keys])
    # MIRO asked for its caption at typical image statistics: caption dial 1, the pixel dials at the
    # training median (0.5). Their top bins are this world's extremes, which no caption asks for (the
    # CPU preset's top sharpness bin: 254 noise-degraded images of 257), so "every dial at 1" trades
    # the caption for them; a user who wants the caption sets this. Same prompts and noise as the others.
    typical_targets = {k: 1.0 if k == keys[0] else 0.5 for k in keys}
    typical = _cached(cache / "final_miro_typical.pt", lambda: generate_and_score(
        pipes["miro"], prompts, evaluator, images_per_prompt=preset.images_per_prompt,
        reward_targets=typical_targets, desc="final miro, image statistics at 0.5", **gen))
    # the verdict on fresh prompts, more of them than above: the prompt is the unit that varies
    caption_prompts = evaluation_prompts(preset.caption_prompts, seed=seed + 2, vocab=vocabulary,
                                         resolution=preset.resolution)

    def follow(name: str, model: str, targets: Mapping[str, float]) -> ScoredSamples:
        return _cached(cache / f"caption_{name}.pt", lambda: generate_and_score(
            pipes[model], caption_prompts, evaluator, images_per_prompt=preset.caption_images,
            reward_targets=targets, desc=f"caption following: {name}", **gen))

    followed = {"baseline": follow("baseline", "baseline", {}), "typical": follow("typical", "miro", typical_targets),
                "all_dials": follow("all_dials", "miro", _targets("miro", specialist_reward))}
    alignment = {name: s.scores[keys[0]] for name, s in followed.items()}
    caption_following = {
        "targets": typical_targets, "typical": {"means": typical.means(), "means_pct": _percentiles(typical, reference)},
        "prompts": len(caption_prompts), "images_per_prompt": preset.caption_images,
        "alignment": {name: float(a.nanmean()) for name, a in alignment.items()},
        "vs_baseline": paired_difference(alignment["typical"], alignment["baseline"]),
        "all_dials_vs_baseline": paired_difference(alignment["all_dials"], alignment["baseline"]),
    }
    caption_following["typical"]["means_pct"][AGGREGATE] = mean_finite(
        [caption_following["typical"]["means_pct"][k] for k in keys])
    gap = caption_following["vs_baseline"]
    caption_following["clearly_above_baseline"] = bool(gap["difference"] > 2 * gap["stderr"])
    categories = {name: category_summary(s.scores, s.categories, keys[0], alignment_ok) for name, s in final.items()}
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= preset.images_per_prompt]

    def pct_scores(s: ScoredSamples) -> Dict[str, torch.Tensor]:
        out = {k: torch.from_numpy(percentile(v.ravel().numpy(), reference[k]).reshape(v.shape)).float()
               for k, v in s.scores.items()}
        out[AGGREGATE] = torch.stack([out[k] for k in keys]).mean(0)
        return out

    bon = {}
    for name, s in final.items():
        pct = pct_scores(s)
        bon[name] = {key: best_of_n(s.scores, key, ns, seed=seed)[key] for key in keys}
        bon[name][AGGREGATE] = best_of_n(pct, AGGREGATE, ns, seed=seed)[AGGREGATE]

    # 2b. drawing: each model's clean estimate of the prompts' true scenes noised to a signal level,
    # scored against the prompts; separates "cannot draw the shapes" from "cannot choose a layout"
    truth = torch.stack([torch.from_numpy(np.array(render_scene(p.metadata["scene"], np.random.default_rng(seed))))
                         for p in prompts]).permute(0, 3, 1, 2).float() / 255
    texts = [p.text for p in prompts]
    truth_scores = evaluator.score_images(truth * 2 - 1, texts)
    drawing = {"gammas": list(DENOISE_GAMMAS), "true scene": float(truth_scores[keys[0]].nanmean())}
    estimates = {}
    for name in models:
        drawing[name] = []
        for gamma in DENOISE_GAMMAS:
            def make(name=name, gamma=gamma):
                generator = torch.Generator(pipes[name].device).manual_seed(seed + 777)
                images = pipes[name].denoise(texts, truth, gamma,
                                             reward_targets=_targets(name, specialist_reward), generator=generator)
                scores = evaluator.score_images(images * 2 - 1, texts)
                return ScoredSamples(texts, [category_of(p) for p in prompts],
                                     images[:, None], {k: v.view(-1, 1) for k, v in scores.items()})
            redrawn = _cached(cache / f"denoise_{name}_{gamma:.2f}.pt", make)
            drawing[name].append(redrawn.mean(keys[0]))
            estimates[(name, gamma)] = redrawn.images[:8, 0]

    # 3. controllability: MIRO's dials one at a time (the others at 1) and all together; the
    # specialist's one dial
    sweep_prompts = prompts[:preset.sweep_prompts]
    sweep_gen = dict(gen, images_per_prompt=preset.sweep_images)

    def sweep(name: str, targets_at) -> Dict:
        per_level = []
        for level in preset.levels:
            s = _cached(cache / f"sweep_{name}_{level:.3f}.pt", lambda level=level: generate_and_score(
                pipes[model_of[name]], sweep_prompts, evaluator, reward_targets=targets_at(level),
                desc=f"sweep {name} {level:.2f}", **sweep_gen))
            per_level.append(s)
        result = controllability(preset.levels, [s.scores for s in per_level])
        for key in result:
            result[key]["means_pct"] = [_percentiles(s, reference)[key] for s in per_level]
        return {"result": result, "images": [s.images[:8, 0] for s in per_level]}

    model_of = {}
    isolated, sweep_images = {}, {}
    for key in keys:
        model_of[f"miro_{key}"] = "miro"
        out = sweep(f"miro_{key}", lambda level, key=key: {k: (level if k == key else 1.0) for k in keys})
        isolated[key] = out["result"]
    model_of["miro_all"] = "miro"
    joint = sweep("miro_all", lambda level: {k: level for k in keys})
    sweep_images["miro_all"] = joint["images"]
    model_of["specialist_dial"] = "specialist"
    special = sweep("specialist_dial", lambda level: {specialist_reward: level})
    sweep_images["specialist_dial"] = special["images"]

    results = {
        "keys": list(keys), "models": list(models), "specialist_reward": specialist_reward,
        "vocabulary": vocabulary, "alignment_ok": alignment_ok, "levels": list(preset.levels), "ns": ns,
        "prompts": [p.text for p in prompts], "curves": curves, "means": means, "means_pct": means_pct,
        "categories": categories, "best_of_n": bon, "isolated": isolated, "joint": joint["result"],
        "specialist_dial": special["result"], "guidance": preset.guidance, "miro_cfg": miro_cfg,
        "caption_following": caption_following,
        "reference_means": {k: float(np.nanmean(v)) for k, v in reference.items()}, "drawing": drawing,
    }
    results["claims"] = {
        "convergence": claim_checks.convergence(curves, keys, aggregate=AGGREGATE),
        "specialist": claim_checks.specialist(means_pct, keys, specialist_reward),
        "controllability": claim_checks.controllability(isolated, keys, joint["result"]),
        "test_time_scaling": claim_checks.sample_scaling(bon, ns, list(keys) + [AGGREGATE]),
    }
    figures = work / "figures"
    results["figures"] = {
        "curves": plots.training_curves(curves, list(keys) + [AGGREGATE], figures / "reward_curves.png"),
        "radar": plots.radar(means_pct, keys, figures / "radar.png"),
        "controllability": plots.controllability_curves(
            {k: {m: {"means": v["means_pct"], "spearman": v["spearman"]} for m, v in isolated[k].items()} for k in keys},
            preset.levels, figures / "controllability.png",
            title="MIRO: one dial moved (others at 1); change in each reward's percentile"),
        "best_of_n": _best_of_n_figure(bon, ns, list(keys) + [AGGREGATE], figures / "best_of_n.png"),
        "samples": plots.image_grid({**{f"{n}": final[n].images[:8, 0] for n in models},
                                     TYPICAL_ROW: typical.images[:8, 0]}, figures / "samples.png",
                                    column_labels=[_short(p.text) for p in prompts[:8]], scale=3),
        "miro_dials": plots.image_grid({f"all dials {lv:g}": im for lv, im in zip(preset.levels, sweep_images["miro_all"])},
                                       figures / "miro_dials.png",
                                       column_labels=[_short(p.text) for p in sweep_prompts[:8]], scale=3),
        "drawing": plots.image_grid(
            {"true scene": truth[:8], **{f"{name} from {g:g}": estimates[(name, g)]
                                         for g in DENOISE_GAMMAS for name in ("miro", "baseline")}},
            figures / "drawing.png", column_labels=[_short(p.text) for p in prompts[:8]], scale=3),
        "specialist_dial": plots.image_grid(
            {f"{specialist_reward.replace('_score', '')} {lv:g}": im
             for lv, im in zip(preset.levels, sweep_images["specialist_dial"])},
            figures / "specialist_dial.png", column_labels=[_short(p.text) for p in sweep_prompts[:8]], scale=3),
    }
    results["figures"] = {k: str(Path(v).relative_to(work)) for k, v in results["figures"].items()}
    return results


def _short(text: str) -> str:
    text = text.replace("a photo of ", "")
    return text if len(text) <= 22 else text[:21] + "…"


def _best_of_n_figure(bon, ns, keys, path: Path) -> Path:
    plt = plots._plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.3 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, curve in bon.items():
            ax.plot(ns, curve[key], marker="o", markersize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.set_title(key.replace("_score", ""), fontsize=9)
        ax.set_xlabel("samples per prompt (best kept)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return plots._save(fig, path)


def _caption_following_text(results: Dict) -> str:
    """The synthetic world's own question beside the paper's claims: does MIRO draw what the caption
    says better than the baseline? Paired over prompts (the same noise), "clearly" = more than two
    standard errors."""
    cf, key = results["caption_following"], results["keys"][0]
    gap, all_dials = cf["vs_baseline"], cf["all_dials_vs_baseline"]
    z = gap["difference"] / gap["stderr"] if gap["stderr"] > 0 else float("nan")
    verdict = (f"**above it by {z:.1f} standard errors**" if cf["clearly_above_baseline"]
               else f"**not clearly** ({_num(z, 1)} standard errors)")
    return (f"Does MIRO draw what the caption says better than the baseline? {verdict}. Caption alignment on "
            f"{cf['prompts']} fresh prompts x {cf['images_per_prompt']} images, the same noise for every model: "
            f"{TYPICAL_ROW.replace('miro, ', 'MIRO with ')} (a typical-looking image of the caption) "
            f"{cf['alignment']['typical']:.3f} against the baseline's {cf['alignment']['baseline']:.3f}, a difference "
            f"of {gap['difference']:+.3f} +- {gap['stderr']:.3f} (standard error over prompts); with every dial at 1 "
            f"{cf['alignment']['all_dials']:.3f}, {all_dials['difference']:+.3f} +- {all_dials['stderr']:.3f}. The "
            "pixel dials' top bins are this world's extremes, which no caption asks for; the caption dial's own "
            f"Spearman rho: {_num(results['isolated'][key][key]['spearman'], 2)} (section 3). Whether the shapes "
            "are recognisable: the sample grid below.")


def _verdict(claim: Dict) -> str:
    return "**reproduces**" if claim["reproduces"] else "**does not reproduce**"


def _num(x, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def write_report(work: Path, results: Dict, cost: Dict) -> Path:
    """results.json, then report.md (last: a report that exists is complete)."""
    keys, c = results["keys"], results["claims"]
    (work / "results.json").write_text(json.dumps({**results, "cost": cost}, indent=2, default=float))
    short = [k.replace("_score", "") for k in keys]
    s = cost["settings"]
    cfg_row = f"miro, reward CFG w={results['miro_cfg']['guidance']:g}"
    lines = [
        "# MIRO on the synthetic world: do the paper's claims reproduce?", "",
        f"Three models trained with the same seed, data and {s['steps']} steps on {s['samples']} synthetic "
        f"images ({s['resolution']} px, vocabulary '{results['vocabulary']}'): an unconditioned **baseline**, "
        f"**miro** conditioned on all four pixel rewards, and a **specialist** conditioned on "
        f"{results['specialist_reward']} alone. Evaluation: {len(results['prompts'])} GenEval-like prompts "
        f"(fresh scenes), {s['images_per_prompt']} images each, scored by the world's rewards; MIRO samples "
        f"with every dial at 1, the specialist with its dial at 1, reward CFG weight {results['guidance']:g} "
        "(section 2 shows MIRO with CFG too). Percentiles are of the training data's "
        "scores (0.5 = a typical training image).", "",
        "## The claims", "",
        "| claim | paper | here | verdict |", "|---|---|---|---|",
        f"| 1. faster convergence | MIRO reaches the baseline's final reward 3.3x-19x sooner (Fig. 5) | "
        f"{c['convergence']['summary']} | {_verdict(c['convergence'])} |",
        f"| 2. specialists hack, MIRO balances | Fig. 4, Table 1 | {c['specialist']['summary']} | "
        f"{_verdict(c['specialist'])} |",
        f"| 3. controllability | measured reward rises with the requested level, one dial moves mostly its "
        f"reward (Fig. 9) | {c['controllability']['summary']} | {_verdict(c['controllability'])} |",
        f"| 4. test-time scaling | MIRO with 1-8 samples matches the baseline with many (Fig. 8) | "
        f"{c['test_time_scaling']['summary']} | {_verdict(c['test_time_scaling'])} |", "",
        _caption_following_text(results), "",
        "## 1. Convergence", "",
        f"![reward curves]({results['figures']['curves']})", "",
        "Speed-up (baseline's last step / MIRO's first step at the baseline's final value; '-': never reached; "
        "'>=': reached at MIRO's first evaluated checkpoint, so at least that):", "",
        summary_table({"speed-up": {k: None if v is None else
                                    f"{'>=' if c['convergence']['lower_bound'][k] else ''}{v:.2f}x"
                                    for k, v in c["convergence"]["speedup"].items()}},
                      list(keys) + [AGGREGATE], first=""), "",
        "## 2. Rewards of the final models", "",
        f"![radar]({results['figures']['radar']})", "",
        "Mean raw reward:", "",
        summary_table({**results["means"], cfg_row: results["miro_cfg"]["means"],
                       TYPICAL_ROW: results["caption_following"]["typical"]["means"]}, keys), "",
        "Mean percentile in the training data:", "",
        summary_table({**results["means_pct"], cfg_row: results["miro_cfg"]["means_pct"],
                       TYPICAL_ROW: results["caption_following"]["typical"]["means_pct"]}, list(keys) + [AGGREGATE]),
        "", f"What reward CFG (`{cfg_row}`) changes in MIRO's percentiles: " + ", ".join(
            f"{n} {results['miro_cfg']['means_pct'][k] - results['means_pct']['miro'][k]:+.2f}"
            for n, k in zip(short, keys)) + ".", "",
        f"GenEval-like accuracy (share of images with caption alignment >= {results['alignment_ok']}) per category:", "",
    ]
    cats = sorted({cat for v in results["categories"].values() for cat in v} - {"overall"}) + ["overall"]
    lines += [summary_table({name: {cat: v[cat]["accuracy"] for cat in v} for name, v in results["categories"].items()},
                            cats, fmt="{:.2f}"), ""]
    lines += ["## 3. Controllability", "",
              f"![controllability]({results['figures']['controllability']})", "",
              "Spearman correlation between the requested level and each image's measured reward; rows: the "
              "dial moved (the others at 1), columns: the measured reward (the diagonal should be the largest):", "",
              summary_table({k.replace("_score", ""): {m: results["isolated"][k][m]["spearman"] for m in keys}
                             for k in keys}, keys, fmt="{:+.2f}", first="dial"), "",
              "MIRO with every dial at the same level (mean raw reward; the baseline's for comparison):", "",
              summary_table({**{f"miro, dials at {lv:g}": {k: results["joint"][k]["means"][i] for k in keys}
                                for i, lv in enumerate(results["levels"])},
                             "baseline": results["means"]["baseline"]}, keys, first="setting"), "",
              "All dials together: " + ", ".join(f"{n} rho {_num(results['joint'][k]['spearman'], 2)}"
                                                 for n, k in zip(short, keys)) + "; the specialist's dial: "
              + ", ".join(f"{n} rho {_num(results['specialist_dial'][k]['spearman'], 2)}" for n, k in zip(short, keys)),
              "", f"![all dials]({results['figures']['miro_dials']})", "",
              f"![specialist dial]({results['figures']['specialist_dial']})", "",
              "## 4. Test-time scaling", "",
              f"![best of n]({results['figures']['best_of_n']})", "",
              "Best-of-n (the image the reward itself ranks first among n), mean reward at n = "
              + ", ".join(str(n) for n in results["ns"]) + ":", ""]
    rows = {}
    for name, curve in results["best_of_n"].items():
        for key in list(keys) + [AGGREGATE]:
            rows.setdefault(key.replace("_score", ""), {})[name] = " / ".join(_num(v, 3) for v in curve[key])
    lines += [summary_table(rows, results["models"], fmt="{}", first="reward"), ""]
    d = results["drawing"]
    lines += ["## Samples", "", "First image of the first prompts, one row per model:", "",
              f"![samples]({results['figures']['samples']})", "",
              "## Drawing: from a noised true scene", "",
              "Each prompt's true scene (rendered by the world), noised to signal level g "
              "(x = g x0 + (1 - g) noise, the same noise for every model), and each model's clean estimate "
              "x - (1 - g) v in one step: at high g the layout is given and the model only has to draw, at "
              "low g it has to choose most of it, as when sampling from pure noise. Mean caption alignment "
              f"(the true scenes themselves: {d['true scene']:.3f}):", "",
              summary_table({name: {f"g = {g:g}": v for g, v in zip(d["gammas"], d[name])} for name in results["models"]},
                            [f"g = {g:g}" for g in d["gammas"]], first="model"), "",
              f"![drawing]({results['figures']['drawing']})", "",
              "## Cost", "",
              f"Preset `{cost['preset']}`: wall {cost['wall_s']:.0f} s, CPU {cost['cpu_s']:.0f} s on "
              f"{cost['cores']} cores ({cost['cpu_s'] / max(1, cost['cores']):.0f} s per core: the wall time "
              f"on an otherwise idle machine when both cores are kept busy). Per stage (wall, s): "
              + ", ".join(f"{k} {v:.0f}" for k, v in cost["stages_s"].items())
              + f". {cost['note']}.", "",
              "Numbers: results.json. Reproduce: `python launchers/demo.py"
              + ("" if cost["preset"] == "cpu" else f" --preset {cost['preset']}") + "`.", ""]
    path = work / "report.md"
    tmp = path.with_name(f".report.md.tmp{os.getpid()}")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path
