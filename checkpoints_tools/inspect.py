"""Say what a run directory, a checkpoint or a model bundle holds.

    python -m checkpoints_tools.inspect runs/miro_16m                    # a run: its checkpoints
    python -m checkpoints_tools.inspect runs/miro_16m/checkpoints/latest  # one checkpoint
    python -m checkpoints_tools.inspect exports/miro_16m                 # a bundle (or a hub id)

Reads metadata and tensor headers only (safetensors, JSON): nothing is unpickled.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _model_summary(cfg) -> str:
    m = cfg.model
    return (f"TextRIN {m.num_blocks}x{m.num_processing_layers} blocks, latents {m.num_latents}x{m.latents_dim}, "
            f"data {m.data_dim}, {m.latent_channels}x{m.latent_size}x{m.latent_size} latents, text {m.text_dim}-d; "
            f"rewards ({len(m.reward_keys)}): {', '.join(m.reward_keys) or 'none'}")


def inspect_bundle(path: str) -> dict:
    from safetensors import safe_open

    from miro_scale import bundle

    base = bundle.resolve(path)
    doc = json.loads((base / "config.json").read_text())
    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in keys})
    cfg, state, uncond, _ = bundle.load(str(base))  # strict: says what does not fit
    return {"kind": "bundle", "path": str(base), "written_by": "miro-scale" if "miro_scale" in doc else "the release",
            "model": _model_summary(cfg), "parameters": sum(v.numel() for v in state.values()),
            "tensors": len(keys), "dtypes": dtypes, "uncond_embedding": list(uncond.shape),
            "text_encoder": cfg.text_encoder.name_or_path, "autoencoder": cfg.autoencoder.name_or_path,
            "sampling": {"num_steps": cfg.sampling.num_steps, "guidance_scale": cfg.sampling.guidance_scale,
                         "max_text_len": cfg.sampling.max_text_len}}


def inspect_checkpoint(path: Path) -> dict:
    from miro_scale.convert import checkpoint_config

    state = json.loads((path / "trainer.json").read_text())
    cfg = checkpoint_config(path)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"kind": "checkpoint", "path": str(path.resolve()), "step": state.get("step"),
            "world_size": state.get("world_size"), "engine": cfg.engine.kind, "model": _model_summary(cfg),
            "bytes": size, "files": sorted(str(f.relative_to(path)) for f in path.iterdir())}


def inspect_run(path: Path) -> dict:
    ckpts = sorted(p for p in (path / "checkpoints").glob("step_*") if (p / "trainer.json").exists())
    latest = path / "checkpoints" / "latest"
    out = {"kind": "run", "path": str(path.resolve()), "checkpoints": [p.name for p in ckpts],
           "latest": latest.read_text().strip() if latest.is_file() else (latest.resolve().name if latest.exists() else None)}
    if ckpts:
        out["last"] = inspect_checkpoint(ckpts[-1])
    return out


def inspect(path: str) -> dict:
    p = Path(path)
    if (p / "trainer.json").exists():
        return inspect_checkpoint(p)
    if (p / "checkpoints").is_dir():
        return inspect_run(p)
    return inspect_bundle(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a run directory, a checkpoint directory, a bundle directory or a hub id")
    a = ap.parse_args()
    from miro_scale.bundle import BundleError
    try:
        print(json.dumps(inspect(a.path), indent=2))
    except (BundleError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
