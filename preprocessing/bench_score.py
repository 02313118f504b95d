#!/usr/bin/env python
"""Throughput of each reward model: full-size architectures with random weights, images/s per reward.

  python preprocessing/bench_score.py --rewards aesthetic,hpsv2,pickscore,sciscore,image_reward,vqa \
      --batch-size 64 --steps 20 --precision bf16 --out bench_score.json

Measures, per reward, the image tower alone (images/s) and image + one caption (pairs/s), under
autocast, after warm-up, with CUDA synchronisation; peak memory per reward; and the combined rate of
running all of them on the same images (1 / sum of 1/rate). It needs a CUDA GPU and exits with
status 2 without one (--allow-cpu runs anyway, e.g. with --variant tiny as a smoke test).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from miro_scale.rewards.registry import build_reward, canonical_key  # noqa: E402

WORDS = ("a photo of red blue green small large dog cat car street tree house sky water person wooden "
         "table next to under above left right shiny vintage bright dark").split()


def captions(n, length, seed=0):
    import random
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(length)) for _ in range(n)]


def bench_one(key, args, device, dtype):
    torch.manual_seed(0)
    t0 = time.perf_counter()
    try:  # allocate (and randomly initialise) the weights on the GPU directly: an 11B model builds in seconds
        with torch.device(device):
            r = build_reward(key, args.variant, device=device)
    except Exception:
        r = build_reward(key, args.variant, device=device)
    build_s = time.perf_counter() - t0
    wdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.weights_dtype]
    for m in r.modules():
        m.to(device=device, dtype=wdt)
    r.dtype = wdt
    bs = args.batch_size
    if r.view.mode == "pixels":
        import numpy as np
        imgs = [np.random.default_rng(i).integers(0, 255, (r.view.size, r.view.size, 3), dtype=np.uint8)
                for i in range(bs)]
    else:
        imgs = torch.randn(bs, 3, r.view.size, r.view.size, device=device)
    caps = captions(bs, args.caption_words)
    ac = torch.autocast(device.type, dtype=dtype) if (device.type == "cuda" and dtype != torch.float32) \
        else torch.autocast("cpu", enabled=False)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_image():
        with torch.no_grad(), ac:
            if r.needs_text and r.shares_image_features:
                return r.encode_images(imgs)
            return r.score(imgs, caps)

    def run_pair():
        with torch.no_grad(), ac:
            return r.score(imgs, caps)

    out = {"key": key, "view": r.view.name, "batch_size": bs, "build_seconds": round(build_s, 2),
           "parameters": sum(p.numel() for m in r.modules() for p in m.parameters())}
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
        dt = time.perf_counter() - t
        out[f"{name}_per_s"] = round(bs * args.steps / dt, 2)
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def bench_decode(n: int = 40):
    """Images/s of one core decoding a 512x384 JPEG and computing each view from it."""
    import io

    import numpy as np
    from PIL import Image

    from miro_scale.data.decode import decode_image
    from miro_scale.rewards.base import VIEWS
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
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rewards", default="aesthetic,hpsv2,pickscore,sciscore,image_reward,vqa")
    p.add_argument("--variant", default="random", choices=["random", "tiny"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--caption-words", type=int, default=20)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--weights-dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--decode", action="store_true",
                   help="also time CPU decoding + preprocessing views per core (to size decode workers)")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (smoke test)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available() and not a.allow_cpu:
        print("bench_score.py: no CUDA GPU is visible; the numbers it reports are GPU throughputs, so it does not "
              "run on CPU (use --allow-cpu --variant tiny for a smoke test).", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.precision]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results = []
    for k in [canonical_key(x) for x in a.rewards.split(",") if x.strip()]:
        try:
            res = bench_one(k, a, device, dtype)
        except Exception as e:  # e.g. clip_score without its remote code: reported, not fatal
            res = {"key": k, "error": f"{type(e).__name__}: {e}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous reward model is gone
        results.append(res)
        print(json.dumps(res), flush=True)
    rates = [r["image_per_s"] for r in results if "image_per_s" in r]
    decode = bench_decode() if a.decode else None
    summary = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "precision": a.precision, "variant": a.variant, "rewards": results,
               "all_rewards_images_per_s": round(1.0 / sum(1.0 / x for x in rates), 2) if rates else None,
               "decode_per_core": decode}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps({k: summary[k] for k in ("device", "all_rewards_images_per_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
