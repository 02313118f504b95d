"""Loader throughput: DALI (CPU, and GPU when present) against the PIL + torch DataLoader loader
(and the webdataset-package streaming loader).

Generates a synthetic-world dataset at ``--source-resolution`` (JPEG), then times full epochs of
each loader producing ``--resolution`` px batches, for each worker / thread count given. Images/s
counts the epoch after the first batch (steady state); the first-batch latency is reported apart.
Prints a table and writes JSON (device, versions, date, command, results) to ``--out``.

    python -m miro_scale.data.bench --num-samples 512 --resolution 256 --out benchmarks/results/x.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time


def _versions() -> dict:
    v = {"python": platform.python_version()}
    for mod, name in (("torch", "torch"), ("PIL", "pillow"), ("numpy", "numpy"),
                      ("nvidia.dali", "nvidia-dali"), ("webdataset", "webdataset")):
        try:
            m = __import__(mod, fromlist=["__version__"])
            v[name] = getattr(m, "__version__", "?")
        except ImportError:
            v[name] = None
    return v


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _time_loader(loader, epochs: int = 1) -> dict:
    n = 0
    t0 = time.perf_counter()
    t_first = None
    n_first = 0
    for _ in range(epochs):
        for b in loader:
            x = b["image"]
            if x.is_cuda:
                import torch

                torch.cuda.synchronize()
            n += x.shape[0]
            if t_first is None:
                t_first = time.perf_counter()
                n_first = x.shape[0]
    t1 = time.perf_counter()
    steady = (n - n_first) / (t1 - t_first) if t1 > t_first and n > n_first else float("nan")
    return {"images": n, "seconds": round(t1 - t0, 4), "first_batch_s": round(t_first - t0, 4),
            "images_per_s": round(steady, 2), "images_per_s_incl_startup": round(n / (t1 - t0), 2)}


def run(num_samples=512, resolution=256, source_resolution=384, batch_size=32, workers=None,
        threads=None, data=None, epochs=1, include_wds=True, seed=0) -> dict:
    import torch

    from .dali_loader import DaliLoader, dali_available
    from .loader import WebDatasetLoader
    from .plan import resolve_shards
    from miro_scale.synthetic.world import generate

    ncpu = os.cpu_count() or 1
    load_before = os.getloadavg()
    workers = workers or [ncpu]
    threads = threads or [ncpu]
    tmp = None
    if data is None:
        tmp = tempfile.mkdtemp(prefix="miro_bench_")
        data = tmp
        generate(data, num_samples, shard_size=max(1, num_samples // 8), resolution=source_resolution,
                 seed=seed, workers=ncpu, progress=True)
    shards = resolve_shards(data)
    results = []
    from .plan import build_dataset_index

    dataset_samples = len(build_dataset_index(shards, ["jpg"]))
    common = dict(resolution=resolution, drop_last=False, seed=seed)
    try:
        for w in workers:
            L = WebDatasetLoader(shards, batch_size, num_workers=w, **common)
            _time_loader(L)  # warm the page cache and the code paths
            results.append({"loader": "pil_dataloader", "device": "cpu", "workers": w, "threads": None,
                            "batch_size": batch_size, **_time_loader(L, epochs)})
            if include_wds:
                try:
                    from .wds_stream import WdsStreamLoader

                    S = WdsStreamLoader(shards, batch_size, num_workers=w, resolution=resolution,
                                        seed=seed)
                    results.append({"loader": "wds_stream_pil", "device": "cpu", "workers": w,
                                    "threads": None, "batch_size": batch_size, **_time_loader(S, epochs)})
                except ImportError as e:
                    print(f"webdataset streaming loader skipped: {e}", file=sys.stderr)
        if dali_available():
            devices = [None] + ([0] if torch.cuda.is_available() else [])
            for dev in devices:
                for t in threads:
                    D = DaliLoader(shards, batch_size, device_id=dev, num_threads=t, **common)
                    _time_loader(D)
                    results.append({"loader": "dali", "device": "cpu" if dev is None else "gpu",
                                    "workers": None, "threads": t, "batch_size": batch_size,
                                    **_time_loader(D, epochs)})
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    best = lambda name, dev: max((r["images_per_s"] for r in results  # noqa: E731
                                  if r["loader"] == name and r["device"] == dev), default=None)
    pil = best("pil_dataloader", "cpu")
    summary = {"pil_dataloader_best": pil, "dali_cpu_best": best("dali", "cpu"),
               "dali_gpu_best": best("dali", "gpu")}
    for k in ("dali_cpu_best", "dali_gpu_best"):
        if summary[k] and pil:
            summary[k.replace("_best", "_vs_pil")] = round(summary[k] / pil, 3)
    return {
        "benchmark": "miro_scale.data.bench",
        "command": " ".join([os.path.basename(sys.executable), "-m", "miro_scale.data.bench"] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": {"cpu": _cpu_name(), "cpu_count": ncpu, "gpu": gpu, "host": platform.node(),
                   # other jobs on a shared box skew the numbers: the 1-min load average, before/after
                   "loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "versions": _versions(),
        "config": {"num_samples": dataset_samples, "resolution": resolution,
                   "source_resolution": source_resolution, "batch_size": batch_size,
                   "epochs_timed": epochs, "data": "synthetic_world jpg" if tmp else data},
        "results": results,
        "summary": summary,
    }


def print_table(rep: dict) -> None:
    print(f"\n{rep['device']['cpu']} x{rep['device']['cpu_count']}  gpu={rep['device']['gpu']}  "
          f"load {rep['device']['loadavg_1min_before_after']}  "
          f"{rep['config']['source_resolution']}px jpg -> {rep['config']['resolution']}px, "
          f"batch {rep['config']['batch_size']}")
    hdr = f"{'loader':<20}{'device':<8}{'workers':>8}{'threads':>8}{'images':>8}{'img/s':>10}{'img/s+start':>13}{'1st batch s':>12}"
    print(hdr)
    print("-" * len(hdr))
    for r in rep["results"]:
        print(f"{r['loader']:<20}{r['device']:<8}{str(r['workers'] or '-'):>8}{str(r['threads'] or '-'):>8}"
              f"{r['images']:>8}{r['images_per_s']:>10.1f}{r['images_per_s_incl_startup']:>13.1f}"
              f"{r['first_batch_s']:>12.3f}")
    print("summary:", json.dumps(rep["summary"]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="DALI vs PIL DataLoader throughput",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--resolution", type=int, default=256, help="output size")
    p.add_argument("--source-resolution", type=int, default=384, help="stored JPEG size")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", help="DataLoader worker counts (default: #cpus)")
    p.add_argument("--threads", type=int, nargs="+", help="DALI thread counts (default: #cpus)")
    p.add_argument("--data", help="existing shards to read instead of generating")
    p.add_argument("--epochs", type=int, default=1, help="epochs timed per configuration")
    p.add_argument("--no-wds", action="store_true", help="skip the webdataset-package baseline")
    p.add_argument("--out", default="benchmarks/results/data_loader_bench.json")
    a = p.parse_args(argv)
    rep = run(a.num_samples, a.resolution, a.source_resolution, a.batch_size, a.workers, a.threads,
              a.data, a.epochs, not a.no_wds)
    print_table(rep)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(rep, f, indent=1)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
