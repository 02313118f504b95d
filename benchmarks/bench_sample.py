"""Sampling throughput: images/s of `miro_scale.sampling.sample` for a config's model with random weights.

    python benchmarks/bench_sample.py                                   # miro_16m, 256 px, 50 Euler steps, CFG 7
    python benchmarks/bench_sample.py --batch-sizes 16 64 128 --variants reference triton --out-dir benchmarks/results
    python benchmarks/bench_sample.py --variants triton+compile --compile-mode reduce-overhead   # + CUDA graphs
    python benchmarks/bench_sample.py --config configs/tiny_cpu.json --device cpu --batch-sizes 2 --steps 2   # smoke run

What is timed is the flow model on the ODE, exactly as `MiroPipeline` runs it: the sampler of
miro_scale/sampling.py with multi-reward classifier-free guidance (both branches in one batched
forward: s+ = 1 and s- = 0 for every reward key, the negative branch on the empty-prompt
embedding), self-conditioning latents carried between steps, bf16 autocast on CUDA. Text
embeddings are random (prompt lengths drawn up to the sampling length, 77 tokens by default), so
the text encoder and the autoencoder's decode are not included. Every batch size gets a short
warm-up run first (2 steps: the first step has no self-conditioning latents, later ones do, so both
graphs are built), then --repeats full runs, synchronised. triton+compile compiles the flow model
(--compile-mode; reduce-overhead adds CUDA graphs, each step's outputs cloned out of the graph pool
because the next step reads them). Reports images/s, ms per image, network
forwards per second and TFLOP/s (FLOPs from miro_scale/models/flops.py, counted against
--peak-tflops), peak memory; prints a table and writes sample_<device>.json (and a PNG when
matplotlib is installed). Without a GPU (and without --device cpu) it says so and exits with status 2.
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
from miro_scale.flow import FlowOutput, MiroFlowModel  # noqa: E402
from miro_scale.models.flops import forward_flops  # noqa: E402
from miro_scale.sampling import reward_vector, sample  # noqa: E402

VARIANTS = ("reference", "triton", "triton+compile")
PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


class GraphStep(torch.nn.Module):
    """torch.compile's reduce-overhead mode replays CUDA graphs into the same output memory at every
    call, but the sampler carries one step's self-conditioning latents into the next: each call
    starts a new graph iteration and clones its outputs out of the graph's memory pool."""

    def __init__(self, compiled):
        super().__init__()
        self.compiled = compiled

    def forward(self, *args):
        torch.compiler.cudagraph_mark_step_begin()
        return FlowOutput(*(None if t is None else t.clone() for t in self.compiled(*args)))


def compiled(model, mode: str):
    if mode == "default":
        return torch.compile(model)
    if mode == "reduce-overhead":
        return GraphStep(torch.compile(model, mode=mode))
    return torch.compile(model, mode=mode)


def prompts(cfg, batch: int, text_len: int, device, seed: int = 0):
    """Random prompt embeddings with mixed lengths, and the empty prompt's (one visible token)."""
    g = torch.Generator(device).manual_seed(seed)
    text = torch.randn(batch, text_len, cfg.model.text_dim, device=device, generator=g)
    lengths = torch.randint(min(8, text_len), text_len + 1, (batch, 1), device=device, generator=g)
    mask = torch.arange(text_len, device=device)[None] < lengths
    empty = torch.randn(1, text_len, cfg.model.text_dim, device=device, generator=g)
    empty_mask = torch.zeros(1, text_len, dtype=torch.bool, device=device)
    empty_mask[:, 0] = True
    return text, mask, empty, empty_mask


def time_batch(model, cfg, batch: int, a, device, autocast_dtype) -> dict:
    m, s = cfg.model, cfg.sampling
    keys = m.reward_keys
    guided = a.guidance > 0
    text, mask, empty, empty_mask = prompts(cfg, batch, a.text_len, device)
    rewards = reward_vector(keys, s.reward_targets, 1.0) if keys else None
    negative = reward_vector(keys, s.negative_reward_targets, 0.0) if keys and guided else None
    use_empty = guided and s.empty_prompt_negative
    g = torch.Generator(device).manual_seed(0)
    noise = torch.randn(batch, m.latent_channels, m.latent_size, m.latent_size, device=device, generator=g)

    def run(num_steps: int) -> torch.Tensor:
        return sample(model, noise, text, mask, rewards, num_steps=num_steps, solver=a.solver,
                      guidance_scale=a.guidance, negative_rewards=negative,
                      negative_text=empty if use_empty else None,
                      negative_text_mask=empty_mask if use_empty else None, autocast_dtype=autocast_dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(a.warmup):
        run(min(2, a.steps))
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(a.repeats):
        out = run(a.steps)
    sync()
    elapsed = time.perf_counter() - start
    if not torch.isfinite(out).all():
        raise RuntimeError(f"batch {batch}: the sampled latents are not all finite")
    images = batch * a.repeats
    forwards_per_image = a.steps * (2 if a.solver == "heun" else 1) * (2 if guided else 1)
    result = {"batch_size": batch, "images_per_s": images / elapsed, "ms_per_image": 1000 * elapsed / images,
              "seconds_per_batch": elapsed / a.repeats, "forwards_per_image": forwards_per_image,
              "network_forwards_per_s": images * forwards_per_image / elapsed}
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return result


def plot(results, path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    labels = [f"{r['variant']}\nB={r['batch_size']}" for r in results]
    ax.bar(range(len(results)), [r["images_per_s"] for r in results], color="#27a")
    for i, r in enumerate(results):
        ax.text(i, r["images_per_s"], f"{r['images_per_s']:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(results)), labels, fontsize=7)
    ax.set_ylabel("images / s")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/miro_16m.json")
    p.add_argument("--set", nargs="*", default=[], help="dotted config overrides")
    p.add_argument("--device", default=None, help="default: cuda; cpu only for a smoke run")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 64])
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: sampling.num_steps, 50)")
    p.add_argument("--solver", choices=["euler", "heun"], default=None, help="default: sampling.solver")
    p.add_argument("--guidance", type=float, default=None,
                   help="multi-reward CFG scale w (default: sampling.guidance_scale; 0: no guidance)")
    p.add_argument("--text-len", type=int, default=None, help="prompt tokens (default: sampling.max_text_len)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default=None,
                   help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--variants", nargs="+", default=["triton"], choices=VARIANTS)
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode of triton+compile; reduce-overhead replays CUDA graphs")
    p.add_argument("--warmup", type=int, default=1, help="2-step warm-up runs per batch size")
    p.add_argument("--repeats", type=int, default=2, help="timed full runs per batch size")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per device, dense bf16 (H100 SXM: 989)")
    p.add_argument("--out-dir", default="benchmarks/results")
    a = p.parse_args(argv)
    if a.device is None and not torch.cuda.is_available():
        print("bench_sample: no CUDA GPU here; this benchmark measures GPU throughput "
              "(use --device cpu --config configs/tiny_cpu.json for a smoke run)", file=sys.stderr)
        return 2
    device = torch.device(a.device or "cuda")
    cfg = load_config(a.config, a.set)
    s = cfg.sampling
    a.steps = a.steps or s.num_steps
    a.solver = a.solver or s.solver
    a.guidance = s.guidance_scale if a.guidance is None else a.guidance
    a.text_len = a.text_len or s.max_text_len
    a.precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")
    autocast_dtype = PRECISIONS[a.precision]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    fwd_flops = forward_flops(cfg, cfg.model.latent_size, a.text_len)

    results = []
    print(f"{'variant':<32}{'batch':>6}{'img/s':>10}{'ms/img':>10}{'fwd/s':>10}{'TFLOP/s':>9}{'MFU':>8}{'GiB':>7}",
          flush=True)
    for variant in a.variants:
        torch.manual_seed(0)
        model = MiroFlowModel(cfg.model, cfg.flow).to(device).eval()
        forward = compiled(model, a.compile_mode) if variant == "triton+compile" else model
        if variant == "triton+compile" and a.compile_mode != "default":
            variant = f"{variant}({a.compile_mode})"
        switch = kernels.reference_only() if variant == "reference" else nullcontext()
        with switch:
            for batch in a.batch_sizes:
                r = {"variant": variant, **time_batch(forward, cfg, batch, a, device, autocast_dtype)}
                r["tflops"] = fwd_flops * r["network_forwards_per_s"] / 1e12
                r["mfu"] = r["tflops"] / a.peak_tflops
                results.append(r)
                print(f"{variant:<32}{batch:>6}{r['images_per_s']:>10.2f}{r['ms_per_image']:>10.1f}"
                      f"{r['network_forwards_per_s']:>10.1f}{r['tflops']:>9.1f}{100 * r['mfu']:>7.2f}%"
                      f"{r.get('max_memory_gib', float('nan')):>7.1f}", flush=True)
        del model, forward
        if device.type == "cuda":
            torch.cuda.empty_cache()

    m = cfg.model
    report = {
        "benchmark": "sampling", "config": a.config, "overrides": a.set,
        "image_size": cfg.autoencoder.image_size, "latent_size": m.latent_size, "patch_size": m.patch_size, "steps": a.steps, "solver": a.solver,
        "guidance_scale": a.guidance, "text_len": a.text_len, "precision": a.precision, "compile_mode": a.compile_mode,
        "warmup": a.warmup, "repeats": a.repeats, "forward_flops_per_image": fwd_flops,
        "peak_tflops": a.peak_tflops, "includes": "flow model on the ODE only (no text encoder, no VAE decode)",
        "results": results,
        **run_facts(device),
    }
    out = Path(a.out_dir)
    stem = f"sample_{device.type}"
    write_report(report, out, stem)
    plot(results, out / f"{stem}.png",
         f"sampling: {a.steps} {a.solver} steps, CFG {a.guidance:g}, {cfg.autoencoder.image_size} px, {report['device']}")
    print(f"wrote {out / stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
