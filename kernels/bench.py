"""Throughput of the fused kernels against torch eager, torch.compile and Liger-Kernel.

    python -m kernels.bench [--suite textrin large] [--dtype bf16] [--out-dir benchmarks/results]

For each op, shape and mode (forward, backward, forward+backward) it reports the median time
(triton.testing.do_bench), the achieved GB/s over the minimum bytes the op must move, that as a
percentage of a device-to-device copy of the same bytes measured in the same run, and the speed-up
against each baseline. It prints a table, and writes JSON (device, versions, date, command, all
numbers, the issue's targets) and a PNG plot into --out-dir. It needs a CUDA GPU: without one it
says so and exits with status 2.
"""
import argparse
import datetime
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch._functorch import config as functorch_config

import kernels

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd+bwd")
# Minimum traffic in units of one activation tensor [rows, N] (weights and dW are negligible).
TENSOR_PASSES = {
    "rms_norm": {"fwd": 2, "bwd": 3},  # x -> y; x, dy -> dx
    "qk_norm": {"fwd": 2, "bwd": 3},  # per tensor, for q and k each
    "swiglu": {"fwd": 3, "bwd": 5},  # gate, up -> out; dout, gate, up -> dgate, dup
}
TARGETS = {"fwd_pct_copy": 90.0, "bwd_pct_copy": 70.0, "x_eager": 1.3, "x_liger": 1.0, "qk_x_unfused_eager": 2.0}


@dataclass
class Case:
    op: str  # rms_norm | qk_norm | swiglu | swiglu_packed
    label: str
    shape: str
    tensor_bytes: int  # bytes of one activation tensor (for qk_norm: q plus k)
    make_inputs: Callable[[], Sequence[torch.Tensor]]
    impls: Dict[str, Callable]  # "triton" first, then the baselines
    results: dict = field(default_factory=dict)

    def bytes_moved(self, mode: str) -> int:
        passes = TENSOR_PASSES["swiglu" if self.op.startswith("swiglu") else self.op]
        total = sum(passes[m] for m in ("fwd", "bwd") if m in mode)
        return total * self.tensor_bytes


def _liger():
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return None, None
    return LigerRMSNormFunction, LigerSiLUMulFunction


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.requires_grad_()


def build_cases(suites: Sequence[str], dtype: torch.dtype, device: str, baselines: Sequence[str],
                scale: int = 1, eps: float = 1e-6) -> List[Case]:
    """The issue's shapes (divided by `scale` along rows, for smoke runs), with the chosen baselines."""
    liger_rms, liger_swiglu = _liger() if "liger" in baselines else (None, None)
    size = torch.tensor([], dtype=dtype).element_size()
    cases = []

    def rms_case(label, rows, hidden):
        rows //= scale

        def make():
            return (_leaf(torch.randn(rows, hidden, device=device, dtype=dtype)),
                    _leaf(1 + 0.1 * torch.randn(hidden, device=device, dtype=dtype)))

        impls = {"triton": lambda x, w: kernels.rms_norm_op(x, w, eps),
                 "eager": lambda x, w: kernels.rms_norm_reference(x, w, eps)}
        if liger_rms is not None:  # offset 0, llama casting, not in place (backward runs repeatedly)
            impls["liger"] = lambda x, w: liger_rms.apply(x, w, eps, 0.0, "llama", False)
        cases.append(Case("rms_norm", label, f"{rows}x{hidden}", rows * hidden * size, make, impls))

    def qk_case(label, batch, tokens, heads, head_dim, kind):
        batch, tokens = max(1, batch // scale), max(1, batch * tokens // scale // max(1, batch // scale))

        def make():  # q and k as views of the packed projection output, as the model has them
            qkv = torch.randn(batch, tokens, 3, heads, head_dim, device=device, dtype=dtype)
            params = [1 + 0.1 * torch.randn(head_dim, device=device, dtype=dtype) for _ in range(4)]
            biases = params[2:] if kind == "layer" else [None, None]
            return (_leaf(qkv[:, :, 0]), _leaf(qkv[:, :, 1]), *map(_leaf, params[:2]),
                    *[b if b is None else _leaf(b) for b in biases])

        def native_pair(q, k, qw, kw, qb, kb):  # one aten norm kernel per tensor
            if kind == "layer":
                return F.layer_norm(q, (head_dim,), qw, qb, eps), F.layer_norm(k, (head_dim,), kw, kb, eps)
            return F.rms_norm(q, (head_dim,), qw, eps), F.rms_norm(k, (head_dim,), kw, eps)

        impls = {
            "triton": lambda q, k, qw, kw, qb, kb: kernels.qk_norm_op(q, k, qw, kw, eps, qb, kb, kind),
            "eager": lambda q, k, qw, kw, qb, kb: kernels.qk_norm_reference(q, k, qw, kw, eps, qb, kb, kind),
            "torch_pair": native_pair,
        }
        shape = f"2x[{batch},{tokens},{heads},{head_dim}] {kind}"
        cases.append(Case("qk_norm", label, shape, 2 * batch * tokens * heads * head_dim * size, make, impls))

    def swiglu_cases(label, rows, hidden):
        rows //= scale

        def make_pair():
            return tuple(_leaf(torch.randn(rows, hidden, device=device, dtype=dtype)) for _ in range(2))

        def make_packed():
            return (_leaf(torch.randn(rows, 2 * hidden, device=device, dtype=dtype)),)

        pair = {"triton": kernels.swiglu_op, "eager": kernels.swiglu_reference}
        packed = {"triton": kernels.swiglu_packed_op, "eager": kernels.swiglu_packed_reference}
        if liger_swiglu is not None:
            pair["liger"] = liger_swiglu.apply
            packed["liger"] = lambda x: liger_swiglu.apply(x[..., hidden:], x[..., :hidden])
        cases.append(Case("swiglu", label, f"{rows}x{hidden}", rows * hidden * size, make_pair, pair))
        cases.append(Case("swiglu_packed", label, f"{rows}x{2 * hidden}", rows * hidden * size, make_packed, packed))

    if "textrin" in suites:  # batch 64 at 256 px: 256 latents x 1024 and 256 patches x 512 per image
        rms_case("latents", 16384, 1024)
        rms_case("data", 16384, 512)
        for kind in ("layer", "rms"):
            qk_case("latents 32 heads", 64, 256, 32, 32, kind)
            qk_case("latents 16 heads", 64, 256, 16, 64, kind)
        swiglu_cases("latents ffn", 16384, 2816)  # swiglu_hidden_dim(1024, 4)
        swiglu_cases("data ffn", 16384, 1536)  # swiglu_hidden_dim(512, 4)
    if "large" in suites:
        for hidden in (4096, 8192):
            rms_case("large", 32768, hidden)
            swiglu_cases("large", 32768, hidden)

    if "compile" in baselines:
        for case in cases:
            case.impls["compile"] = torch.compile(case.impls["eager"], dynamic=False)
    return cases


def _as_tuple(out):
    return tuple(o for o in out if o is not None) if isinstance(out, tuple) else (out,)


# The bwd timing replays one autograd graph (retain_graph=True), which a compiled backward with
# donated buffers refuses; donation only saves memory, so it is off for the benchmark.
@functorch_config.patch(donated_buffer=False)
def measure(cases: Sequence[Case], timer: Callable[[Callable], float]) -> None:
    """Fill case.results[mode][impl] with median milliseconds; a failing impl records its error."""
    for case in cases:
        torch._dynamo.reset()  # one compiled graph per case; no recompile limit to run into
        inputs = case.make_inputs()
        grad_inputs = [t for t in inputs if t is not None and t.requires_grad]
        case.results = {mode: {} for mode in MODES}
        for name, fn in case.impls.items():
            try:
                for mode, ms in _time_modes(fn, inputs, grad_inputs, timer).items():
                    case.results[mode][name] = ms
            except Exception as err:  # a baseline that cannot run this case is reported, not fatal
                for mode in MODES:
                    case.results[mode][name] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        del inputs, grad_inputs


def _time_modes(fn, inputs, grad_inputs, timer) -> Dict[str, float]:
    outs = _as_tuple(fn(*inputs))
    douts = [torch.randn_like(o) for o in outs]

    def fwd_bwd():
        return torch.autograd.grad(_as_tuple(fn(*inputs)), grad_inputs, douts)

    fwd_bwd()  # compiles / JITs outside the timed region
    return {
        "fwd": timer(lambda: fn(*inputs)),
        "bwd": timer(lambda: torch.autograd.grad(outs, grad_inputs, douts, retain_graph=True)),
        "fwd+bwd": timer(fwd_bwd),
    }


def copy_bandwidth(nbytes: int, device: str, timer: Callable[[Callable], float]) -> float:
    """GB/s of a device-to-device copy moving `nbytes` in total (half read, half written)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return nbytes / timer(lambda: dst.copy_(src)) / 1e6


def summarise(cases: Sequence[Case], copy_gbps: Callable[[int], float]) -> List[dict]:
    rows = []
    for case in cases:
        for mode in MODES:
            times = case.results[mode]
            nbytes = case.bytes_moved(mode)
            row = {"op": case.op, "case": case.label, "shape": case.shape, "mode": mode, "bytes": nbytes,
                   "ms": times, "copy_gbps": copy_gbps(nbytes)}
            row["gbps"] = {k: nbytes / v / 1e6 for k, v in times.items() if isinstance(v, float)}
            row["pct_copy"] = {k: 100 * v / row["copy_gbps"] for k, v in row["gbps"].items()}
            triton_ms = times.get("triton")
            row["speedup"] = {
                k: v / triton_ms for k, v in times.items()
                if k != "triton" and isinstance(v, float) and isinstance(triton_ms, float)
            }
            rows.append(row)
    return rows


def check_targets(rows: Sequence[dict]) -> List[dict]:
    """The issue's H100 targets, one verdict per (row, target) that applies."""
    checks = []

    def check(row, name, value, target):
        if value is not None:
            checks.append({"op": row["op"], "case": row["case"], "shape": row["shape"], "mode": row["mode"],
                           "target": name, "value": round(value, 3), "needed": target, "met": value >= target})

    for row in rows:
        pct = row["pct_copy"].get("triton")
        wide = row["op"] != "rms_norm" or int(row["shape"].split("x")[-1]) >= 1024
        if row["mode"] == "fwd" and wide:
            check(row, "fwd_pct_copy", pct, TARGETS["fwd_pct_copy"])
        if row["mode"] == "bwd":
            check(row, "bwd_pct_copy", pct, TARGETS["bwd_pct_copy"])
        if row["op"] == "qk_norm":
            check(row, "qk_x_unfused_eager", row["speedup"].get("eager"), TARGETS["qk_x_unfused_eager"])
        else:
            check(row, "x_eager", row["speedup"].get("eager"), TARGETS["x_eager"])
            check(row, "x_liger", row["speedup"].get("liger"), TARGETS["x_liger"])
    return checks


def format_table(rows: Sequence[dict]) -> str:
    baselines = sorted({k for row in rows for k in row["ms"] if k != "triton"})
    header = ["op", "case", "shape", "mode", "triton ms", "GB/s", "% copy"] + [f"x {b}" for b in baselines]
    lines = []
    for row in rows:
        triton_ms = row["ms"].get("triton")
        cells = [row["op"], row["case"], row["shape"], row["mode"]]
        if isinstance(triton_ms, float):
            cells += [f"{triton_ms:.4f}", f"{row['gbps']['triton']:.0f}", f"{row['pct_copy']['triton']:.1f}"]
        else:
            cells += ["error", "-", "-"]
        cells += [f"{row['speedup'][b]:.2f}" if b in row["speedup"] else "n/a" for b in baselines]
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*l) for l in lines])


def plot(rows: Sequence[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = ["triton"] + sorted({k for row in rows for k in row["pct_copy"] if k != "triton"})
    fig, ax = plt.subplots(figsize=(max(10, 0.45 * len(rows)), 6))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        values = [row["pct_copy"].get(impl, math.nan) for row in rows]
        ax.bar([x + i * width for x in range(len(rows))], values, width, label=impl)
    ax.axhline(TARGETS["fwd_pct_copy"], color="k", linestyle="--", linewidth=0.8, label="fwd target")
    ax.axhline(TARGETS["bwd_pct_copy"], color="gray", linestyle=":", linewidth=0.8, label="bwd target")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))])
    ax.set_xticklabels([f"{r['op']} {r['shape']} {r['mode']}" for r in rows], rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("% of device-to-device copy bandwidth")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cuda_timer(warmup: int, rep: int) -> Callable[[Callable], float]:
    import triton.testing

    return lambda fn: float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def run(args: argparse.Namespace, device: str, timer: Callable[[Callable], float], device_name: str) -> dict:
    cases = build_cases(args.suite, DTYPES[args.dtype], device, args.baselines, scale=args.scale)
    if args.ops:
        cases = [c for c in cases if c.op in args.ops]
    measure(cases, timer)
    copy_cache: Dict[int, float] = {}

    def copy_gbps(nbytes):
        if nbytes not in copy_cache:
            copy_cache[nbytes] = copy_bandwidth(nbytes, device, timer)
        return copy_cache[nbytes]

    rows = summarise(cases, copy_gbps)
    checks = check_targets(rows)
    import triton

    report = {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "liger_kernel": _liger_version(),
        "dtype": args.dtype,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "kernels.bench", *sys.argv[1:]]),
        "byte_model": "minimum activation traffic; see kernels/bench.py TENSOR_PASSES",
        "results": rows,
        "targets": checks,
    }
    print(f"{device_name}  torch {torch.__version__}  triton {triton.__version__}  dtype {args.dtype}")
    if "liger" in args.baselines and _liger()[0] is None:
        print("Liger-Kernel is not installed: no Liger baseline (pip install liger-kernel)")
    print(format_table(rows))
    missed = [c for c in checks if not c["met"]]
    print(f"\ntargets met: {len(checks) - len(missed)}/{len(checks)}")
    for c in missed:
        print(f"  missed {c['target']}: {c['op']} {c['shape']} {c['mode']} = {c['value']} (needs {c['needed']})")

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"kernels_bench_{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    plot(rows, out_dir / f"{stem}.png", f"{device_name}, {args.dtype}")
    print(f"wrote {out_dir / stem}.json and .png")
    return report


def _liger_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:
        return None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--suite", nargs="+", choices=["textrin", "large"], default=["textrin", "large"])
    parser.add_argument("--ops", nargs="+", choices=["rms_norm", "qk_norm", "swiglu", "swiglu_packed"])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--baselines", nargs="+", choices=["eager", "compile", "liger"],
                        default=["eager", "compile", "liger"])
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    parser.add_argument("--scale", type=int, default=1, help="divide the row counts (smoke runs)")
    args = parser.parse_args(argv)
    if "eager" not in args.baselines:
        args.baselines.append("eager")  # speed-ups and compile are defined against it
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "kernels.bench: no CUDA GPU on this machine. The benchmark measures GPU memory throughput "
            "(copy bandwidth, do_bench timings) and has nothing meaningful to time on a CPU; "
            "run it on a GPU machine. Nothing was written.",
            file=sys.stderr,
        )
        return 2
    device = "cuda"
    run(args, device, cuda_timer(args.warmup, args.rep), torch.cuda.get_device_name())
    return 0


if __name__ == "__main__":
    sys.exit(main())
