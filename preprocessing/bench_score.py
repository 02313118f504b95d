#!/usr/bin/env python
"""Per reward: images/s, GPU memory and host RSS of the full-size architectures (random weights).

  python preprocessing/bench_score.py --rewards clip,aesthetic,hpsv2,pickscore,sciscore,image_reward,vqa \
      --batch-size 64 --steps 20 --precision auto --out benchmarks/results

Builds every reward in one process, as the scorer's default single pass holds them (--one-at-a-time
frees each before the next), each in its precision (--precision as in score.py: auto = the policy
file on a GPU), and records per reward: parameters, weight bytes, build seconds, GPU memory its
weights take and the peak while it runs, the process's host RSS after building it; then times the
image tower alone (images/s) and image + one caption (pairs/s) under its autocast, after warm-up,
with CUDA synchronisation; and the combined rate of all of them on the same images (1 / sum of
1/rate). Prints a table and writes bench_score.json. It needs a CUDA GPU and exits with status 2
without one (--allow-cpu runs anyway, e.g. with --variant tiny as a smoke test, or full size to
measure host memory: on a CPU the weights are in host memory, so the table also gives RSS minus
weights).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from miro_scale.rewards.precision import DTYPES, resolve  # noqa: E402
from miro_scale.rewards.registry import build_reward, canonical_key  # noqa: E402
from miro_scale.tools.bench_report import proc_memory_kib, run_facts, write_report  # noqa: E402

WORDS = ("a photo of red blue green small large dog cat car street tree house sky water person wooden "
         "table next to under above left right shiny vintage bright dark").split()
GIB = 2 ** 30


def captions(n, length, seed=0):
    import random
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(length)) for _ in range(n)]


def _rss_gib() -> float:
    return round(proc_memory_kib().get("VmRSS", 0) * 1024 / GIB, 2)


def build_one(key, args, device, precision):
    """Build a reward on ``device`` in ``precision``; its memory facts."""
    dtype = DTYPES[precision]
    gpu0 = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    t0 = time.perf_counter()
    # random weights are drawn on the device itself: an 11B model never passes through host memory
    with torch.device(device):
        r = build_reward(key, args.variant, device=device, dtype=dtype)
    if hasattr(r, "materialize"):  # rewards that defer random weights to first use
        r.materialize()
    if device.type == "cuda":
        torch.cuda.synchronize()
    params = [p for m in r.modules() for p in list(m.parameters()) + list(m.buffers())]
    facts = {"key": key, "precision": precision, "view": r.view.name,
             "parameters": sum(p.numel() for m in r.modules() for p in m.parameters()),
             "weights_gib": round(sum(p.numel() * p.element_size() for p in params) / GIB, 3),
             "build_seconds": round(time.perf_counter() - t0, 2), "host_rss_gib": _rss_gib()}
    if device.type == "cuda":
        facts["gpu_weights_gib"] = round((torch.cuda.memory_allocated() - gpu0) / GIB, 3)
    return r, facts


def bench_one(r, facts, args, device):
    bs = args.batch_size
    if r.view.mode == "pixels":
        import numpy as np
        imgs = [np.random.default_rng(i).integers(0, 255, (r.view.size, r.view.size, 3), dtype=np.uint8)
                for i in range(bs)]
    else:
        imgs = torch.randn(bs, 3, r.view.size, r.view.size, device=device)
    caps = captions(bs, args.caption_words)
    p = facts["precision"]
    ac = (lambda: torch.autocast(device.type, dtype=DTYPES[p])) if p != "fp32" else \
        (lambda: torch.autocast(device.type, enabled=False))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_image():
        with torch.no_grad(), ac():
            if r.needs_text and r.shares_image_features:
                return r.encode_images(imgs)
            return r.score(imgs, caps)

    def run_pair():
        with torch.no_grad(), ac():
            return r.score(imgs, caps)

    out = dict(facts, batch_size=bs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for name, fn in (("image", run_image), ("pair", run_pair)):
        for _ in range(args.warmup):
            fn()
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            fn()
        sync()
        out[f"{name}_per_s"] = round(bs * args.steps / (time.perf_counter() - t), 2)
    if device.type == "cuda":
        out["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    out["host_rss_gib_after_run"] = _rss_gib()
    return out


def bench_decode(n: int = 40, views=()):
    """Images/s of one core decoding a 512x384 JPEG and computing each view from it, and all of
    ``views`` (the benchmarked rewards' views, each distinct one once, as the scorer does)."""
    import io

    import numpy as np
    from PIL import Image

    from miro_scale.data.decode import decode_image
    from miro_scale.rewards.base import VIEWS, compute_views
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 512, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    out = {}
    t = time.perf_counter()
    for _ in range(n):
        decode_image(data, "bench")
    out["decode_jpeg_512x384"] = round(n / (time.perf_counter() - t), 1)
    im = decode_image(data, "bench")
    for name, v in VIEWS.items():
        t = time.perf_counter()
        for _ in range(n):
            v.one(im)
        out[f"view_{name}"] = round(n / (time.perf_counter() - t), 1)
    if views:
        t = time.perf_counter()
        for _ in range(n):
            compute_views(im, views)
        out["views_of_the_rewards"] = round(n / (time.perf_counter() - t), 1)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rewards", default="clip,aesthetic,hpsv2,pickscore,sciscore,image_reward,vqa")
    p.add_argument("--variant", default="random", choices=["random", "tiny"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--caption-words", type=int, default=20)
    p.add_argument("--precision", default="auto",
                   help="per reward, as preprocessing/score.py: auto, fp32, bf16, fp16 or key=dtype,...")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="free each reward before building the next (default: all in one process, as the scorer)")
    p.add_argument("--decode", action="store_true",
                   help="also time CPU decoding + preprocessing views per core (to size decode workers)")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (smoke test, host memory)")
    p.add_argument("--out", default=None, help="directory of bench_score.json")
    a = p.parse_args(argv)
    if not torch.cuda.is_available() and not a.allow_cpu:
        print("bench_score.py: no CUDA GPU is visible; the numbers it reports are GPU throughputs, so it does not "
              "run on CPU (use --allow-cpu --variant tiny for a smoke test).", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    keys = [canonical_key(x) for x in a.rewards.split(",") if x.strip()]
    precision = resolve(a.precision, keys, device)
    results, held = [], []
    for k in keys:
        try:
            torch.manual_seed(0)
            r, facts = build_one(k, a, device, precision[k])
            res = bench_one(r, facts, a, device)
            if not a.one_at_a_time:
                held.append(r)
            del r
        except Exception as e:  # reported, not fatal: the other rewards still run
            res = {"key": k, "precision": precision[k], "error": f"{type(e).__name__}: {e}"}
        if device.type == "cuda" and a.one_at_a_time:
            torch.cuda.empty_cache()
        results.append(res)
    ok = [r for r in results if "image_per_s" in r]
    together = {"rewards": len(held), "host_rss_gib": _rss_gib(),
                "host_peak_rss_gib": round(proc_memory_kib().get("VmHWM", 0) * 1024 / GIB, 2),
                "weights_gib": round(sum(r["weights_gib"] for r in ok), 2)}
    if device.type == "cuda":
        together["gpu_allocated_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)
        together["gpu_peak_gib"] = round(max((r["gpu_peak_gib"] for r in ok), default=0.0), 2)
    else:
        together["host_rss_minus_weights_gib"] = round(together["host_rss_gib"] - together["weights_gib"], 2)
    rates = [r["image_per_s"] for r in ok]
    summary = {**run_facts(device), "variant": a.variant, "one_at_a_time": a.one_at_a_time, "rewards": results,
               "together": together,
               "all_rewards_images_per_s": round(1.0 / sum(1.0 / x for x in rates), 2) if rates else None,
               "decode_per_core": bench_decode(views=[r.view for r in held]) if a.decode else None}
    cols = ("precision", "parameters", "weights_gib", "gpu_weights_gib", "gpu_peak_gib", "host_rss_gib",
            "build_seconds", "image_per_s", "pair_per_s")
    print(f"{'reward':<22}" + "".join(f"{c:>16}" for c in cols))
    for r in results:
        print(f"{r['key']:<22}" + ("".join(f"{str(r.get(c, '-')):>16}" for c in cols) if "error" not in r
                                   else f"  error: {r['error'][:120]}"))
    print("together:", together, "| all rewards images/s:", summary["all_rewards_images_per_s"])
    if a.out:
        print(f"wrote {write_report(summary, a.out, 'bench_score')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
