"""Measure what each difference from the released recipe changes (the numbers in docs/fidelity.md).

    python -m miro_scale.tools.fidelity [--config configs/tiny_cpu.json] [--out fidelity.json]

Each row compares the release's behaviour (this project's default) with the alternative, on the
same model, batch and seed:
  lamb_groups         first LAMB update of the plain parameters (latents, positional embeddings,
                      registers, layer scales, the loss-weighting head) with the release's groups vs
                      with them excluded from decay and trust ratio (this project's former default)
  first_step_lr       the first update's size with the release's full rate vs a warmup from 0
  nan_reward          network output in training for NaN rewards: value 0 (release) vs zero token
  binning             share of samples whose bin equals the release's (quantiles of unique values,
                      bucketize) on fp16-rounded, saturating scores: unique (default) vs population
  release_top_bin     share of samples the release's binning put in bin 64 (value 64/63 > 1) for a
                      reward whose scores exceed 1; 0 here
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from miro_scale.config import load_config
from miro_scale.flow import MiroFlowModel, flow_matching_loss
from miro_scale.rewards.binning import fit_bins
from miro_scale.train.optim import build_optimizer, parameter_groups


def _batch(cfg, b: int = 4, nan_rewards: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    m = cfg.model
    rewards = torch.rand(b, len(m.reward_keys), generator=g)
    if nan_rewards:
        rewards[:] = float("nan")
    return {"latents": torch.randn(b, m.latent_channels, m.latent_size, m.latent_size, generator=g),
            "text_embeddings": torch.randn(b, 8, m.text_dim, generator=g),
            "text_mask": torch.ones(b, 8, dtype=torch.bool), "rewards": rewards}


def _model(cfg) -> MiroFlowModel:
    torch.manual_seed(0)
    return MiroFlowModel(cfg.model, cfg.flow)


def _first_update(cfg, groups_fn=None, lr_scale: float = 1.0) -> dict:
    model = _model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, cfg.optim)
    if groups_fn is not None:
        opt.param_groups.clear()
        for group in groups_fn(model):
            opt.add_param_group({**opt.defaults, **group})
    for group in opt.param_groups:
        group["lr"] = cfg.optim.lr * lr_scale
    loss, _ = flow_matching_loss(model, _batch(cfg), cfg.flow, False, torch.Generator().manual_seed(1))
    loss.backward()
    opt.step()
    return {n: (p.detach() - before[n]) for n, p in model.named_parameters()}


def _former_groups(model) -> list:
    """The project's earlier groups: norms, biases (ndim < 2) and plain parameters undecayed."""
    plain = {n for n, p in model.named_parameters() if "." not in n.replace("net.", "", 1) or "layer_scale" in n}
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n not in plain]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or n in plain]
    return [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]


def measure(cfg) -> dict:
    out = {}
    model = _model(cfg)
    plain = [n for n, p in model.named_parameters()
             if n.startswith("logvar_proj.") or "layer_scale" in n or "." not in n.replace("net.", "", 1)]
    release, former = _first_update(cfg), _first_update(cfg, _former_groups)
    rel = [float((release[n] - former[n]).norm() / release[n].norm().clamp_min(1e-30)) for n in plain]
    changed = sum(int((~torch.isclose(release[n], former[n], rtol=1e-3, atol=0)).sum()) for n in plain)
    total = sum(release[n].numel() for n in plain)
    out["lamb_groups"] = {"parameters": plain, "values": total, "values_changed_share": changed / total,
                          "relative_update_difference_median": float(np.median(rel))}
    decay, no_decay = parameter_groups(model, 0.01)
    out["lamb_groups"]["release_groups_sizes"] = [sum(p.numel() for p in decay["params"]),
                                                  sum(p.numel() for p in no_decay["params"])]
    full = _first_update(cfg)
    out["first_step_lr"] = {"update_norm_release": float(sum(v.norm() ** 2 for v in full.values()) ** 0.5),
                            "update_norm_warmup_from_0": 0.0}
    outputs = {}
    for policy in ("value0", "zero_token"):
        cfg.model.nan_reward_in_training = policy
        model = _model(cfg).train()
        b = _batch(cfg, nan_rewards=True)
        y = torch.randn_like(b["latents"], generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            outputs[policy] = model(y, torch.full((y.shape[0],), 0.5), b["text_embeddings"], b["text_mask"],
                                    b["rewards"]).velocity
    cfg.model.nan_reward_in_training = "value0"
    out["nan_reward"] = {"relative_output_difference": float((outputs["value0"] - outputs["zero_token"]).norm()
                                                             / outputs["value0"].norm())}
    rng = np.random.default_rng(7)
    scores = np.concatenate([rng.beta(5, 1.4, 20000), np.ones(3000)]).astype(np.float16).astype(np.float64)
    uniq = np.unique(scores)
    edges = np.quantile(uniq, np.linspace(0, 1, 65))
    release = np.clip(np.searchsorted(edges, scores, side="left") - 1, 0, None)  # torch.bucketize - 1
    inside = scores < edges[-1]
    import pyarrow as pa
    table = pa.table({"key": [str(i) for i in range(scores.size)], "r": pa.array(scores.astype(np.float32))})
    for name, unique in (("unique_values_default", True), ("population_quantiles", False)):
        bins = fit_bins(table, 64, calibration_size=scores.size, unique_values=unique)["r"].assign(scores)
        out.setdefault("binning", {})[name] = float((bins[inside] == release[inside]).mean())
        out["binning"][name + "_mean_bin_distance"] = float(np.abs(bins[inside] - release[inside]).mean())
    aesthetic = rng.normal(5.4, 0.8, 20000)
    e = np.sort(np.unique(np.concatenate([[0.0, 1.0], np.quantile(np.unique(aesthetic), np.linspace(0, 1, 65))[1:-1]])))
    top = np.searchsorted(e, aesthetic, side="left") - 1
    out["release_top_bin"] = {"share_of_samples_at_value_64_63": float((top >= 64).mean()), "here": 0.0}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny_cpu.json")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    a = p.parse_args()
    result = measure(load_config(a.config))
    text = json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "parameters"} for k, v in result.items()}, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
