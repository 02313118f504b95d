"""Training-step throughput of TextRIN: reference layers vs Triton kernels, each eager and under
torch.compile, side by side; or (--census) what one step asks of the device.

    python launchers/bench_train.py                               # miro_16m at 256 px on one GPU
    python launchers/bench_train.py --micro-batch 128 --steps 30 --out-dir benchmarks/results
    python launchers/bench_train.py --census                      # no GPU: counted on the meta device
    python launchers/bench_train.py --config configs/tiny_cpu.json --device cpu --steps 2   # smoke run

One full optimizer step per iteration, as the trainer runs it on the local engine: self-conditioning
pass, forward and backward under bf16 autocast, the engine's step (one gradient norm, clipping,
non-finite skip, LAMB, schedule), the EMA. Synthetic latents, text embeddings (padded to
--text-len tokens, default the length the config trains with: 256 for miro_16m) and rewards, made
on the device. Variants: `reference` (torch layers, kernels.reference_only()), `reference+compile`
(what the release runs: torch.compile(fullgraph=True) of the reference), `triton` (fused kernels),
`triton+compile`. Reports images/s, TFLOP/s and MFU (FLOPs at --text-len, counted against
--peak-tflops, dense bf16) and peak memory; prints a table and writes JSON and a PNG. A variant
that fails is recorded with its error. Without a GPU (and without --device cpu or --census) it says
so and exits with status 2.

--census runs one step per eager variant under miro_scale/train/census.py (default on the meta
device: the full model, no memory, no GPU) and reports kernel launches, bytes moved by non-matmul
ops and host syncs (with their call sites) per step; writes train_step_census.json.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import kernels  # noqa: E402
from miro_scale.config import MiroConfig, load_config  # noqa: E402
from miro_scale.flow import MiroFlowModel, flow_matching_loss  # noqa: E402
from miro_scale.models.flops import training_flops_per_sample  # noqa: E402
from miro_scale.tools.bench_report import run_facts, write_report  # noqa: E402
from miro_scale.train.census import Census, meta_as_cuda  # noqa: E402
from miro_scale.train.engines import LocalEngine  # noqa: E402
from miro_scale.train.optim import EMA  # noqa: E402
from miro_scale.train.trainer import text_tokens  # noqa: E402

VARIANTS = ("reference", "reference+compile", "triton", "triton+compile")
COLORS = dict(zip(VARIANTS, ("#999", "#bbb", "#4a7", "#27a")))


def synthetic_batch(cfg: MiroConfig, batch: int, text_len: int, device: torch.device) -> dict:
    m = cfg.model
    g = torch.Generator(device).manual_seed(0) if device.type != "meta" else None
    mask = torch.ones(batch, text_len, dtype=torch.bool, device=device)
    mask[:, text_len // 3:] = torch.rand(batch, 1, device=device, generator=g) < 0.5  # mixed lengths
    return {
        "latents": torch.randn(batch, m.latent_channels, m.latent_size, m.latent_size, device=device, generator=g),
        "latents_std": torch.full((batch, m.latent_channels, m.latent_size, m.latent_size), 0.1, device=device),
        "text_embeddings": torch.randn(batch, text_len, m.text_dim, device=device, generator=g),
        "text_mask": mask,
        "rewards": torch.rand(batch, len(m.reward_keys), device=device, generator=g),
    }


def variant_context(variant: str):
    return kernels.reference_only() if variant.startswith("reference") else nullcontext()


def build_step(cfg: MiroConfig, variant: str, batch: dict, device: torch.device) -> Callable[[], None]:
    """The trainer's optimizer step on the local engine, one micro-batch."""
    torch.manual_seed(0)
    with torch.device(device) if device.type == "meta" else nullcontext():
        model = MiroFlowModel(cfg.model, cfg.flow).to(device)
    engine = LocalEngine(model, cfg, accumulation=1)
    ema = EMA(engine.local_parameters(), cfg.optim.ema_decay, cfg.optim.ema_start_step)
    forward = engine.forward_module
    if variant.endswith("+compile"):
        forward = torch.compile(forward, fullgraph=True)
    # bf16 autocast as the trainer on a GPU; none on CPU (smoke runs) or meta (census: fp32 activations)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if device.type == "cuda" and cfg.train.precision == "bf16" else nullcontext())
    generator = torch.Generator(device).manual_seed(0) if device.type != "meta" else None
    steps = 0

    def step() -> None:
        nonlocal steps
        with autocast:
            loss, _ = flow_matching_loss(forward, batch, cfg.flow, cfg.model.self_conditioning, generator)
        engine.backward(loss, last_micro_batch=True)
        engine.step()
        steps += 1
        ema.update(engine.local_parameters(), steps)

    return step


def time_variant(cfg: MiroConfig, variant: str, batch: dict, steps: int, warmup: int, device: torch.device) -> dict:
    with variant_context(variant):
        step = build_step(cfg, variant, batch, device)
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


def census_variant(cfg: MiroConfig, variant: str, batch: dict, device: torch.device) -> dict:
    """One step counted after a first one (which creates the optimizer state)."""
    as_cuda = meta_as_cuda() if device.type == "meta" else nullcontext()
    with variant_context(variant), kernels_on(device, variant), as_cuda:
        step = build_step(cfg, variant, batch, device)
        with Census(device):  # on meta a census also answers the syncs
            step()
        with Census(device) as census:
            step()
    return {"variant": variant, **census.summary()}


def kernels_on(device: torch.device, variant: str):
    """On meta, the triton variant routes to the miro_kernels ops (their fake impls give the shapes),
    as CUDA tensors would."""
    if device.type != "meta" or variant.startswith("reference"):
        return nullcontext()
    from unittest import mock

    from kernels import _triton_support

    routed = lambda t: t.is_meta or _triton_support.runs_triton(t)  # noqa: E731
    return mock.patch.object(kernels, "runs_triton", routed)


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    names = [r["variant"] for r in results]
    ax.bar(names, [r["images_per_s"] for r in results], color=[COLORS[n] for n in names])
    for i, r in enumerate(results):
        ax.text(i, r["images_per_s"], f"{r['images_per_s']:.0f} img/s\n{100 * r['mfu']:.1f}% MFU",
                ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("images / s")
    ax.set_title("TextRIN training step, one device", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_census(a, cfg: MiroConfig, text_len: int, device: torch.device) -> int:
    batch = synthetic_batch(cfg, a.micro_batch, text_len, device)
    results = []
    for variant in [v for v in a.variants if not v.endswith("+compile")]:
        r = census_variant(cfg, variant, batch, device)
        results.append(r)
        print(f"{variant:<16} {r['kernel_launches']:7d} launches ({r['matmul_launches']} matmul) "
              f"{r['non_matmul_bytes'] / 1e9:9.2f} GB non-matmul {r['host_syncs']:4d} host syncs", flush=True)
        for site, count in r["sync_sites"].items():
            print(f"{'':<16} sync x{count}: {site}")
    print("(torch.compile variants are not counted: Inductor's CUDA kernels exist only on a GPU)")
    report = {"benchmark": "train_step_census", "config": a.config, "overrides": a.set,
              "micro_batch": a.micro_batch, "text_len": text_len, "census_device": device.type,
              "activations": "fp32 (no autocast off CUDA)",
              "results": results, **run_facts(device)}
    path = write_report(report, a.out_dir, "train_step_census")
    print(f"wrote {path}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/miro_16m.json")
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--device", default=None, help="default: cuda (--census: meta); cpu for a smoke run")
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--text-len", type=int, default=None, help="default: the text tokens the config trains with")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per device, dense bf16 (H100 SXM: 989)")
    p.add_argument("--census", action="store_true", help="count launches, non-matmul bytes, host syncs per step")
    p.add_argument("--out-dir", default="benchmarks/results")
    a = p.parse_args()
    cfg = load_config(a.config, a.set)
    text_len = a.text_len or text_tokens(cfg)
    if a.census:
        return run_census(a, cfg, text_len, torch.device(a.device or "meta"))
    if a.device is None and not torch.cuda.is_available():
        print("bench_train: no CUDA GPU here; this benchmark measures GPU throughput "
              "(use --device cpu --config configs/tiny_cpu.json for a smoke run, or --census)", file=sys.stderr)
        return 2
    device = torch.device(a.device or "cuda")
    batch = synthetic_batch(cfg, a.micro_batch, text_len, device)
    flops = training_flops_per_sample(cfg, text_len)
    results, errors = [], []
    for variant in a.variants:
        try:
            r = time_variant(cfg, variant, batch, a.steps, a.warmup, device)
        except Exception as e:  # a variant that cannot run (e.g. a graph break under fullgraph) is recorded
            errors.append({"variant": variant, "error": f"{type(e).__name__}: {e}"[:2000]})
            print(f"{variant:<16} failed: {errors[-1]['error'][:300]}", flush=True)
            continue
        finally:  # free the variant's model, optimizer state and compiled graphs before the next
            torch._dynamo.reset()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        r["tflops"] = flops * r["images_per_s"] / 1e12
        r["mfu"] = r["tflops"] / a.peak_tflops
        results.append(r)
        print(f"{variant:<18} {r['images_per_s']:9.1f} img/s {r['step_ms']:9.1f} ms/step "
              f"{r['tflops']:8.1f} TFLOP/s {100 * r['mfu']:6.2f}% MFU "
              f"{r.get('max_memory_gib', float('nan')):6.1f} GiB", flush=True)
    for r in results:
        r["speedup_vs_first"] = r["images_per_s"] / results[0]["images_per_s"]
    report = {
        "benchmark": "train_step", "config": a.config, "overrides": a.set, "micro_batch": a.micro_batch,
        "text_len": text_len, "steps": a.steps, "warmup": a.warmup, "training_flops_per_sample": flops,
        "peak_tflops": a.peak_tflops, "results": results, "errors": errors,
        **run_facts(device),
    }
    out = Path(a.out_dir)
    stem = f"train_step_{device.type}"
    write_report(report, out, stem)
    if results:
        plot(results, out / f"{stem}.png")
    print(f"wrote {out / stem}.json" + (" and .png" if results else ""))
    return 0 if results and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
