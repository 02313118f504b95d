"""Training-step throughput of TextRIN: reference layers vs Triton kernels vs torch.compile, side by side.

    python launchers/bench_train.py                               # miro_16m at 256 px on one GPU
    python launchers/bench_train.py --micro-batch 128 --steps 30 --out-dir benchmarks/results
    python launchers/bench_train.py --config configs/tiny_cpu.json --device cpu --steps 2   # smoke run

One full optimizer step per iteration, as the trainer runs it: self-conditioning pass, forward and
backward under bf16 autocast, grad clipping, LAMB. Synthetic latents, text embeddings (padded to
--text-len tokens, as the release trains) and rewards. Reports images/s, TFLOP/s and MFU
(counted against --peak-tflops, dense bf16) and peak memory; prints a table and writes JSON and a
PNG. Without a GPU (and without --device cpu) it says so and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import kernels  # noqa: E402
from miro_scale.config import load_config  # noqa: E402
from miro_scale.tools.bench_report import run_facts, write_report  # noqa: E402
from miro_scale.flow import MiroFlowModel, flow_matching_loss  # noqa: E402
from miro_scale.models.flops import training_flops_per_sample  # noqa: E402
from miro_scale.train.optim import build_optimizer  # noqa: E402

VARIANTS = ("reference", "triton", "triton+compile")


def synthetic_batch(cfg, batch: int, text_len: int, device) -> dict:
    m = cfg.model
    g = torch.Generator(device).manual_seed(0)
    mask = torch.ones(batch, text_len, dtype=torch.bool, device=device)
    mask[:, text_len // 3:] = torch.rand(batch, 1, device=device, generator=g) < 0.5  # mixed lengths
    return {
        "latents": torch.randn(batch, m.latent_channels, m.latent_size, m.latent_size, device=device, generator=g),
        "latents_std": torch.full((batch, m.latent_channels, m.latent_size, m.latent_size), 0.1, device=device),
        "text_embeddings": torch.randn(batch, text_len, m.text_dim, device=device, generator=g),
        "text_mask": mask,
        "rewards": torch.rand(batch, len(m.reward_keys), device=device, generator=g),
    }


def time_variant(cfg, variant: str, batch: dict, steps: int, warmup: int, device) -> dict:
    torch.manual_seed(0)
    model = MiroFlowModel(cfg.model, cfg.flow).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    forward = torch.compile(model) if variant == "triton+compile" else model
    switch = kernels.reference_only() if variant == "reference" else nullcontext()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    generator = torch.Generator(device).manual_seed(0)

    def step():
        with autocast:
            loss, _ = flow_matching_loss(forward, batch, cfg.flow, cfg.model.self_conditioning, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with switch:
        for _ in range(warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
    images_per_s = steps * batch["latents"].shape[0] / elapsed
    result = {"variant": variant, "images_per_s": images_per_s, "step_ms": 1000 * elapsed / steps}
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return result


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    names = [r["variant"] for r in results]
    ax.bar(names, [r["images_per_s"] for r in results], color=["#999", "#4a7", "#27a"][: len(names)])
    for i, r in enumerate(results):
        ax.text(i, r["images_per_s"], f"{r['images_per_s']:.0f} img/s\n{100 * r['mfu']:.1f}% MFU",
                ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("images / s")
    ax.set_title("TextRIN training step, one device", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/miro_16m.json")
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--device", default=None, help="default: cuda; cpu only for a smoke run")
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--text-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per device, dense bf16 (H100 SXM: 989)")
    p.add_argument("--out-dir", default="benchmarks/results")
    a = p.parse_args()
    if a.device is None and not torch.cuda.is_available():
        print("bench_train: no CUDA GPU here; this benchmark measures GPU throughput "
              "(use --device cpu --config configs/tiny_cpu.json for a smoke run)", file=sys.stderr)
        return 2
    device = torch.device(a.device or "cuda")
    cfg = load_config(a.config, a.set)
    batch = synthetic_batch(cfg, a.micro_batch, a.text_len, device)
    flops = training_flops_per_sample(cfg, a.text_len)
    results = []
    for variant in a.variants:
        r = time_variant(cfg, variant, batch, a.steps, a.warmup, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous variant's model and optimizer state are gone
        r["tflops"] = flops * r["images_per_s"] / 1e12
        r["mfu"] = r["tflops"] / a.peak_tflops
        results.append(r)
        print(f"{variant:<16} {r['images_per_s']:9.1f} img/s {r['step_ms']:9.1f} ms/step "
              f"{r['tflops']:8.1f} TFLOP/s {100 * r['mfu']:6.2f}% MFU "
              f"{r.get('max_memory_gib', float('nan')):6.1f} GiB", flush=True)
    base = results[0]["images_per_s"]
    for r in results:
        r["speedup_vs_first"] = r["images_per_s"] / base
    report = {
        "benchmark": "train_step", "config": a.config, "overrides": a.set, "micro_batch": a.micro_batch,
        "text_len": a.text_len, "steps": a.steps, "warmup": a.warmup, "training_flops_per_sample": flops,
        "peak_tflops": a.peak_tflops, "results": results,
        **run_facts(device),
    }
    out = Path(a.out_dir)
    stem = f"train_step_{device.type}"
    write_report(report, out, stem)
    plot(results, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
