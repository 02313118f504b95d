"""Loader throughput: DALI (CPU, and GPU when present) against the PIL + torch DataLoader loader
(and the webdataset-package streaming loader), and the latent-mode loader (the release's mode).

Image mode: generates a synthetic-world dataset at ``--source-resolution`` (JPEG), then times full
epochs of each loader producing ``--resolution`` px batches, for each worker / thread count given.

Latent mode: generates ``--latent-samples`` samples shaped like the 16M recipe's training shards
(fp16 SDXL latents 4x32x32 with std, fp16 FLAN-T5-XL embeddings of 8-77 tokens for txt and 100-256
for the long caption, seven rewards per caption), then times epochs of ``WebDatasetLoader(mode=
"latent")`` with a 50/50 caption mix, max_text_len 256, for each ``--latent-workers`` count, side by
side with ``host_fp32_pad`` (the previous host path: fp32 up-cast, text padded to 256 on the host,
numpy arrays pickled through the worker pipe).

Every row has samples/s (wall, after the first batch) and samples per CPU-second: the CPU time of
the main process and its DataLoader workers (getrusage self + children, reaped at the end of each
epoch) and DALI's threads. On a box shared with other jobs wall time is noise; CPU-seconds are what
a loader costs. Prints a table and writes JSON (device, versions, date, command, results) to ``--out``.

    python -m miro_scale.data.bench --num-samples 512 --resolution 256 --out benchmarks/results/x.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its reaped children (DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _time_loader(loader, epochs: int = 1, field: str = "image") -> dict:
    n = 0
    c0 = _cpu_seconds()
    t0 = time.perf_counter()
    t_first = None
    n_first = 0
    for _ in range(epochs):
        for b in loader:
            x = b[field]
            if x.is_cuda:
                import torch

                torch.cuda.synchronize()
            n += x.shape[0]
            if t_first is None:
                t_first = time.perf_counter()
                n_first = x.shape[0]
    t1 = time.perf_counter()
    cpu = _cpu_seconds() - c0  # workers are reaped when an epoch ends, so their time is in
    steady = (n - n_first) / (t1 - t_first) if t1 > t_first and n > n_first else float("nan")
    return {"images": n, "seconds": round(t1 - t0, 4), "first_batch_s": round(t_first - t0, 4),
            "images_per_s": round(steady, 2), "images_per_s_incl_startup": round(n / (t1 - t0), 2),
            "cpu_seconds": round(cpu, 3), "images_per_cpu_s": round(n / cpu, 1) if cpu > 0 else None}


LATENT_TEXT_DIM = 2048  # FLAN-T5-XL


def write_latent_dataset(out_dir: str, num_samples: int, seed: int = 0, shard_size: int = 256) -> None:
    """Training shards as the 16M recipe's shard stage writes them with ``--images drop``."""
    import numpy as np

    from miro_scale.rewards.keys import MIRO_REWARD_KEYS

    from .format import reward_entry
    from .writer import ShardWriter

    rng = np.random.default_rng(seed)

    def rewards():
        return {k: reward_entry(float(rng.random()), int(rng.integers(0, 64)), 64) for k in MIRO_REWARD_KEYS}

    with ShardWriter(out_dir, max_samples=shard_size) as w:
        for i in range(num_samples):
            n_txt, n_long = int(rng.integers(8, 78)), int(rng.integers(100, 257))
            w.write(f"{i:09d}", {
                "txt": f"a short caption {i}",
                "json": {"captions": {"long": f"a long synthetic caption {i} " * 8}, "rewards": rewards(),
                         "rewards_by_caption": {"long": rewards()}},
                "latent_mean.npy": rng.standard_normal((4, 32, 32)).astype(np.float16),
                "latent_std.npy": rng.random((4, 32, 32)).astype(np.float16),
                "text_emb.npy": rng.standard_normal((n_txt, LATENT_TEXT_DIM)).astype(np.float16),
                "text_emb_long.npy": rng.standard_normal((n_long, LATENT_TEXT_DIM)).astype(np.float16)})


def _host_fp32_pad_loader():
    """The previous latent host path, kept here as the baseline: fp32 up-cast, text padded to
    max_text_len in the worker, numpy arrays pickled through the worker pipe, tensors made in the
    main process."""
    import numpy as np
    import torch

    from .loader import WebDatasetLoader

    class HostFp32Pad(WebDatasetLoader):
        def _collate(self, rows, keys, wheres, stats, messages):
            L = self.max_text_len
            out = {"keys": keys, "where": wheres, "text": [r["caption"] for r in rows],
                   "rewards": np.stack([r["rewards"] for r in rows])}
            for name in ("latents", "latents_std"):
                out[name] = np.stack([r[name].astype(np.float32) for r in rows])
            emb = np.zeros((len(rows), L, rows[0]["text_embeddings"].shape[1]), np.float32)
            mask = np.zeros((len(rows), L), bool)
            for j, r in enumerate(rows):
                n = r["text_embeddings"].shape[0]
                emb[j, :n], mask[j, :n] = r["text_embeddings"], r["text_mask"]
            out["text_embeddings"], out["text_mask"] = emb, mask
            return out

        def _to_torch(self, a):
            return {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in a.items()}

    return HostFp32Pad


def _dali_cubic_always_loader():
    """The previous DALI pipeline, kept here as the baseline: every image resized, bicubic."""
    from .dali_loader import DaliLoader

    class DaliCubicAlways(DaliLoader):
        def _build(self):
            from nvidia.dali import fn, pipeline_def, types

            res = self.resolution

            @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads,
                          device_id=self.device_id, prefetch_queue_depth=1, exec_dynamic=True)
            def pipe():
                enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, batch=True)
                dec = fn.decoders.image(enc, device="cpu" if self.device_id is None else "mixed",
                                        output_type=types.RGB)
                dec = fn.resize(dec, resize_shorter=res, interp_type=types.INTERP_CUBIC, antialias=True)
                return fn.crop_mirror_normalize(dec, crop=(res, res), crop_pos_x=0.5, crop_pos_y=0.5,
                                                mean=[127.5] * 3, std=[127.5] * 3, dtype=types.FLOAT,
                                                output_layout="CHW")

            p = pipe()
            p.build()
            return p

    return DaliCubicAlways


def run_dali_resize(num_samples=256, resolution=256, sources=(256, 512), batch_size=32, threads=1,
                    epochs=2, seed=0) -> list:
    """DALI on the CPU, this pipeline (resize only when the size differs, linear) against the
    previous one (bicubic, always), on sources already at ``resolution`` and at other sizes."""
    from miro_scale.synthetic.world import generate

    from .dali_loader import DaliLoader

    results = []
    for src in sources:
        data = tempfile.mkdtemp(prefix="miro_bench_dali_")
        try:
            generate(data, num_samples, shard_size=max(1, num_samples // 4), resolution=src, seed=seed,
                     workers=os.cpu_count() or 1, progress=False)
            for name, cls in (("dali_resize_if_needed_linear", DaliLoader),
                              ("dali_resize_always_cubic", _dali_cubic_always_loader())):
                D = cls(data, batch_size, num_threads=threads, resolution=resolution, drop_last=False, seed=seed)
                _time_loader(D)
                results.append({"loader": name, "device": "cpu", "workers": None, "threads": threads,
                                "batch_size": batch_size, "source_resolution": src, **_time_loader(D, epochs)})
        finally:
            shutil.rmtree(data, ignore_errors=True)
    return results


def run_latent(num_samples=1024, batch_size=32, workers=(1,), data=None, epochs=2, seed=0) -> list:
    """Latent-mode rows: this loader and the previous host path, alternating per worker count."""
    from miro_scale.rewards.keys import MIRO_REWARD_KEYS

    from .loader import WebDatasetLoader

    tmp = None
    if data is None:
        tmp = data = tempfile.mkdtemp(prefix="miro_bench_latent_")
        write_latent_dataset(data, num_samples, seed)
    kw = dict(mode="latent", reward_keys=MIRO_REWARD_KEYS, caption_source={"txt": 0.5, "long": 0.5},
              text_embeddings=True, max_text_len=256, latent_std=True, drop_last=False, seed=seed)
    variants = {"latent": WebDatasetLoader, "latent_host_fp32_pad": _host_fp32_pad_loader()}
    results = []
    try:
        for w in workers:
            for name, cls in variants.items():
                L = cls(data, batch_size, num_workers=w, **kw)
                _time_loader(L, 1, "latents")  # warm the page cache and the code paths
                r = _time_loader(L, epochs, "latents")
                results.append({"loader": name, "device": "cpu", "workers": w, "threads": None,
                                "batch_size": batch_size, **r})
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return results


def run_images(num_samples, resolution, source_resolution, batch_size, workers, threads, data, epochs,
               include_wds, seed) -> tuple:
    """Image-mode rows (PIL DataLoader, webdataset streaming, DALI) and the dataset's size."""
    import torch

    from .dali_loader import DaliLoader, dali_available
    from .loader import WebDatasetLoader
    from .plan import build_dataset_index, resolve_shards
    from miro_scale.synthetic.world import generate

    ncpu = os.cpu_count() or 1
    tmp = None
    if data is None:
        tmp = tempfile.mkdtemp(prefix="miro_bench_")
        data = tmp
        generate(data, num_samples, shard_size=max(1, num_samples // 8), resolution=source_resolution,
                 seed=seed, workers=ncpu, progress=True)
    shards = resolve_shards(data)
    results = []
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
    return results, dataset_samples


def run(num_samples=512, resolution=256, source_resolution=384, batch_size=32, workers=None,
        threads=None, data=None, epochs=1, include_wds=True, seed=0, latent_samples=1024,
        latent_workers=(1,), latent_epochs=2, dali_resize_samples=0) -> dict:
    """Image mode unless ``num_samples`` is 0 (and no ``data``), then latent mode unless
    ``latent_samples`` is 0, then DALI's resize against the previous one on ``dali_resize_samples``
    images at ``resolution`` and twice that."""
    import torch

    from .dali_loader import dali_available

    ncpu = os.cpu_count() or 1
    load_before = os.getloadavg()
    results, dataset_samples = [], 0
    if num_samples or data:
        results, dataset_samples = run_images(num_samples, resolution, source_resolution, batch_size,
                                              workers or [ncpu], threads or [ncpu], data, epochs,
                                              include_wds, seed)
    if latent_samples:
        results += run_latent(latent_samples, batch_size, latent_workers, epochs=latent_epochs, seed=seed)
    if dali_resize_samples and dali_available():
        results += run_dali_resize(dali_resize_samples, resolution, (resolution, 2 * resolution), batch_size,
                                   seed=seed)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    best = lambda name, dev: max((r["images_per_s"] for r in results  # noqa: E731
                                  if r["loader"] == name and r["device"] == dev), default=None)
    pil = best("pil_dataloader", "cpu")
    summary = {"pil_dataloader_best": pil, "dali_cpu_best": best("dali", "cpu"),
               "dali_gpu_best": best("dali", "gpu")}
    for k in ("dali_cpu_best", "dali_gpu_best"):
        if summary[k] and pil:
            summary[k.replace("_best", "_vs_pil")] = round(summary[k] / pil, 3)
    for r in results:  # DALI per CPU-second, against the previous pipeline in the same run
        if r["loader"] == "dali_resize_if_needed_linear":
            base = next(b for b in results if b["loader"] == "dali_resize_always_cubic"
                        and b["source_resolution"] == r["source_resolution"])
            summary[f"dali_cpu_src{r['source_resolution']}_per_cpu_s_vs_cubic_always"] = round(
                r["images_per_cpu_s"] / base["images_per_cpu_s"], 2)
    for r in results:  # latent mode per CPU-second, against the previous host path in the same run
        if r["loader"] == "latent":
            base = next(b for b in results if b["loader"] == "latent_host_fp32_pad" and b["workers"] == r["workers"])
            summary[f"latent_w{r['workers']}_samples_per_cpu_s"] = r["images_per_cpu_s"]
            summary[f"latent_w{r['workers']}_vs_host_fp32_pad_per_cpu_s"] = round(
                r["images_per_cpu_s"] / base["images_per_cpu_s"], 2)
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
                   "epochs_timed": epochs, "data": data or "synthetic_world jpg",
                   "latent": {"num_samples": latent_samples, "epochs_timed": latent_epochs,
                              "data": "fp16 latents 4x32x32 + std, fp16 T5-XL text 8-77 / 100-256 tokens, "
                                      "50/50 txt/long, max_text_len 256, 7 rewards"}},
        "results": results,
        "summary": summary,
    }


def print_table(rep: dict) -> None:
    print(f"\n{rep['device']['cpu']} x{rep['device']['cpu_count']}  gpu={rep['device']['gpu']}  "
          f"load {rep['device']['loadavg_1min_before_after']}  "
          f"{rep['config']['source_resolution']}px jpg -> {rep['config']['resolution']}px, "
          f"batch {rep['config']['batch_size']}")
    hdr = (f"{'loader':<35}{'device':<8}{'workers':>8}{'threads':>8}{'samples':>8}{'/s':>9}{'/s+start':>10}"
           f"{'1st batch s':>12}{'CPU s':>8}{'/CPU-s':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in rep["results"]:
        dash = lambda v: "-" if v is None else str(v)  # noqa: E731
        name = r["loader"] + (f" @{r['source_resolution']}" if "source_resolution" in r else "")
        print(f"{name:<35}{r['device']:<8}{dash(r['workers']):>8}{dash(r['threads']):>8}"
              f"{r['images']:>8}{r['images_per_s']:>9.1f}{r['images_per_s_incl_startup']:>10.1f}"
              f"{r['first_batch_s']:>12.3f}{r['cpu_seconds']:>8.2f}{r['images_per_cpu_s'] or 0:>9.1f}")
    print("summary:", json.dumps(rep["summary"]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Loader throughput (samples/s and per CPU-second)",
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
    p.add_argument("--latent-samples", type=int, default=1024, help="latent-mode samples (0: skip)")
    p.add_argument("--latent-workers", type=int, nargs="+", default=[1], help="latent-mode worker counts")
    p.add_argument("--latent-epochs", type=int, default=2, help="latent-mode epochs timed per row")
    p.add_argument("--dali-resize-samples", type=int, default=256,
                   help="images per source size for DALI's resize vs the previous pipeline (0: skip)")
    p.add_argument("--out", default="benchmarks/results/data_loader_bench.json")
    a = p.parse_args(argv)
    rep = run(a.num_samples, a.resolution, a.source_resolution, a.batch_size, a.workers, a.threads,
              a.data, a.epochs, not a.no_wds, latent_samples=a.latent_samples,
              latent_workers=a.latent_workers, latent_epochs=a.latent_epochs,
              dali_resize_samples=a.dali_resize_samples)
    print_table(rep)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(rep, f, indent=1)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
