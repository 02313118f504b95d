#!/usr/bin/env python
r"""Host and GPU memory of loading each reward from a checkpoint in its released layout.

  python preprocessing/bench_load.py --work /scratch/bench_load --precision bf16 --out benchmarks/results

Writes, once, a full-size checkpoint with random fp32 weights in each reward's released layout
(open_clip files for aesthetic and HPSv2, a transformers CLIPModel directory for PickScore and
SciScore, ImageReward.pt, jina-clip-v2's model.safetensors with its unmerged LoRA, CLIP-FlanT5's
sharded safetensors + config.json), then loads each in a fresh process the way the scorer does
(build_reward(..., "pretrained") on --device in its precision) and records the process's peak
resident set (VmHWM), its resident set after loading (and its anonymous part: a memory-mapped .pt checkpoint counts in
the resident set as reclaimable page cache), the bytes of the loaded weights, the seconds
it took and, on a GPU, the memory the weights take there. A process that imports the same modules
and loads nothing gives the baseline. On a CPU the weights live in host memory, so the host
overhead of loading is peak - baseline - weights; on a GPU the peak is the host cost itself.
--vqa-layers shrinks CLIP-FlanT5's depth (its widths, vocabulary and largest tensors stay full
size) where the 11B model does not fit the host. Prints a table and writes bench_load.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from miro_scale.rewards.registry import canonical_key  # noqa: E402
from miro_scale.tools.bench_report import proc_memory_kib, run_facts, write_report  # noqa: E402

GIB = 2 ** 30
SHARD_BYTES = 2 * GIB


def _save_sharded(tensors, out: Path) -> None:
    """safetensors shards of <= SHARD_BYTES with a model.safetensors.index.json, written as generated."""
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    shard, size, weight_map, n = {}, 0, {}, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(out / name))
            weight_map.update(dict.fromkeys(shard, name))
            shard, size = {}, 0

    for key, t in tensors:
        if size + t.numel() * t.element_size() > SHARD_BYTES:
            flush()
        shard[key] = t
        size += t.numel() * t.element_size()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _random(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    for key, shape in shapes.items():
        yield key, torch.randn(shape, generator=g) * 0.02


def write_released(key: str, out: Path, vqa_layers: int) -> dict:
    """A random full-size checkpoint of `key` in its released layout under `out`; the builder kwargs
    that load it."""
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    if key in ("aesthetic_score", "hpsv2_score"):
        from miro_scale.rewards.heads import RewardMLP
        from miro_scale.rewards.openclip_models import build_open_clip
        arch = "ViT-L-14-quickgelu" if key == "aesthetic_score" else "ViT-H-14"
        save_file({k: v.contiguous() for k, v in build_open_clip(arch).state_dict().items()},
                  str(out / "clip.safetensors"))
        if key == "hpsv2_score":
            return {"weights": str(out / "clip.safetensors")}
        save_file(RewardMLP(768).state_dict(), str(out / "head.safetensors"))
        return {"clip_weights": str(out / "clip.safetensors"), "head_weights": str(out / "head.safetensors")}
    if key in ("pick_a_score_score", "sciscore_score"):
        from transformers import CLIPModel

        from miro_scale.rewards.hf_clip import pickscore_full_config
        CLIPModel(pickscore_full_config()).save_pretrained(out)
        return {"weights": str(out), "tokenizer": None}
    if key == "image_reward_score":
        from miro_scale.rewards.image_reward import ImageRewardModel
        torch.save(ImageRewardModel().state_dict(), out / "ImageReward.pt")
        return {"weights": str(out / "ImageReward.pt"), "filename": None}
    if key == "clip_score":
        from miro_scale.rewards import jina_clip
        save_file(dict(_random(jina_clip.manifest())), str(out / jina_clip.WEIGHTS_FILE))
        jina_clip.tiny_tokenizer().save_pretrained(out)
        return {"weights": str(out)}
    if key == "vqa_score":
        from miro_scale.rewards import vqascore
        t5 = vqascore.flan_t5_xxl_config()
        t5.num_layers = t5.num_decoder_layers = vqa_layers
        shapes = {k: s for k, s in vqascore.manifest(t5).items() if "position_ids" not in k
                  and "embed_tokens" not in k}
        _save_sharded(_random(shapes), out)
        cfg = {k: v for k, v in t5.to_dict().items() if k != "scale_decoder_outputs"}
        cfg.update(model_type="clip_t5", tie_word_embeddings=False, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                   mm_vision_tower="openai/clip-vit-large-patch14-336", mm_hidden_size=1024)
        (out / "config.json").write_text(json.dumps(cfg))
        return {"weights": str(out), "vision_weights": None}
    raise KeyError(f"bench_load: no released layout for {key}")


CHILD = r"""
import json, sys, time, torch
import open_clip, timm, transformers  # in the baseline too: the libraries are not the loader's cost
from miro_scale.rewards.registry import build_reward
from miro_scale.rewards.precision import DTYPES
from miro_scale.rewards.vqascore import WordTokenizer
from miro_scale.tools.bench_report import proc_memory_kib
key, kwargs, device, precision = sys.argv[1], json.loads(sys.argv[2]), torch.device(sys.argv[3]), sys.argv[4]
if key == "vqa_score":
    kwargs["tokenizer"] = WordTokenizer()
before = proc_memory_kib()
out = {"baseline_rss_kib": before.get("VmRSS", 0)}
if key != "-":
    t0 = time.perf_counter()
    r = build_reward(key, "pretrained", device=device, dtype=DTYPES[precision], **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["gpu_allocated_bytes"] = torch.cuda.memory_allocated()
    out["load_seconds"] = time.perf_counter() - t0
    tensors = {id(t): t for m in r.modules() for t in list(m.parameters()) + list(m.buffers())}.values()
    out["weights_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
    out["parameters"] = sum(p.numel() for m in r.modules() for p in m.parameters())
mem = proc_memory_kib()
out.update(peak_rss_kib=mem.get("VmHWM", 0), rss_kib=mem.get("VmRSS", 0), anon_rss_kib=mem.get("RssAnon", 0))
print("RESULT " + json.dumps(out))
"""


def load_in_child(key: str, kwargs: dict, device: str, precision: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, key, json.dumps(kwargs), device, precision],
                       capture_output=True, text=True, env=env)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit {p.returncode}"]}
    res = json.loads(lines[-1][len("RESULT "):])
    res["process_seconds"] = round(time.perf_counter() - t0, 1)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rewards", default="aesthetic,hpsv2,pickscore,sciscore,image_reward,clip,vqa")
    p.add_argument("--work", required=True, help="where the random checkpoints are written (kept for reruns)")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vqa-layers", type=int, default=24, help="CLIP-FlanT5 encoder/decoder depth (24: full)")
    p.add_argument("--out", default=None, help="directory of bench_load.json")
    a = p.parse_args(argv)
    keys = [canonical_key(k) for k in a.rewards.split(",") if k.strip()]
    work = Path(a.work)
    base = load_in_child("-", {}, a.device, a.precision)
    rows = []
    for key in keys:
        # PickScore and SciScore share one architecture: one checkpoint serves both
        ck = work / ("pick_a_score_score" if key == "sciscore_score" else key)
        done = ck / "kwargs.json"
        if not done.exists():
            t0 = time.perf_counter()
            kwargs = write_released(key if key != "sciscore_score" else "pick_a_score_score", ck, a.vqa_layers)
            done.write_text(json.dumps(kwargs))
            print(f"wrote {ck} in {time.perf_counter() - t0:.0f} s", flush=True)
        kwargs = json.loads(done.read_text())
        res = load_in_child(key, kwargs, a.device, a.precision)
        row = {"key": key, "precision": a.precision, "checkpoint_gib": round(
            sum(f.stat().st_size for f in ck.rglob("*") if f.is_file()) / GIB, 2)}
        if "error" in res:
            row["error"] = res["error"]
        else:
            row.update(parameters=res["parameters"], weights_gib=round(res["weights_bytes"] / GIB, 2),
                       load_seconds=round(res["load_seconds"], 1),
                       peak_rss_gib=round(res["peak_rss_kib"] / 2 ** 20, 2), rss_gib=round(res["rss_kib"] / 2 ** 20, 2),
                       anon_rss_gib=round(res["anon_rss_kib"] / 2 ** 20, 2))
            over = res["peak_rss_kib"] * 1024 - base["peak_rss_kib"] * 1024
            if a.device == "cpu":
                over -= res["weights_bytes"]
            else:
                row["gpu_gib"] = round(res.get("gpu_allocated_bytes", 0) / GIB, 2)
            row["host_overhead_gib"] = round(over / GIB, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = ("parameters", "checkpoint_gib", "weights_gib", "gpu_gib", "load_seconds", "peak_rss_gib",
            "anon_rss_gib", "host_overhead_gib")
    print(f"\nbaseline process: peak RSS {base['peak_rss_kib'] / 2 ** 20:.2f} GiB")
    print(f"{'reward':<22}" + "".join(f"{c:>18}" for c in cols))
    for r in rows:
        print(f"{r['key']:<22}" + ("".join(f"{str(r.get(c, '-')):>18}" for c in cols) if "error" not in r
                                   else f"  error: {r['error']}"))
    report = {**run_facts(torch.device(a.device)), "precision": a.precision, "vqa_layers": a.vqa_layers,
              "baseline_peak_rss_gib": round(base["peak_rss_kib"] / 2 ** 20, 2), "rewards": rows,
              "note": "host_overhead_gib: peak RSS of the loading process minus the baseline process's"
                      + (" minus the loaded weights (on a CPU they are host memory)" if a.device == "cpu" else "")}
    if a.out:
        print(f"wrote {write_report(report, a.out, 'bench_load')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
