"""Model bundles in the layout the authors released (hub ids ``nicolas-dufour/miro``,
``nicolas-dufour/miro-ablations/<variant>``), read and written.

A bundle is a directory of three files:

``config.json``
    The release's sections: ``network`` (the ``CADRINTextCond`` kwargs), ``preconditioning``,
    ``data_preprocessing``, ``postprocessing``, ``scheduler``, ``coherence_keys``,
    ``sampler_defaults``, ``data_resolution``, ``img_resolution``, ``max_text_len``, ``model_type``,
    ``vae_repo``, ``text_encoder_repo``. Bundles this project writes add ``miro_scale``: the whole
    training config (text encoder and autoencoder paths, reward bins, model options the release has
    no key for), which then takes precedence.
``model.safetensors``
    The EMA weights: ``network.*`` (TextRIN, whose module names are the release's, plus the release's
    all-true bool masks, which carry no information and are checked and dropped),
    ``preconditioning.logvar_proj.*`` (the learned loss weighting), and the latent normalisation
    buffers ``postprocessing.{scale,bias}`` (0.5 / s_c and -b_c * 0.5 / s_c, from which
    ``flow.latent_scale`` / ``latent_shift`` are read) and ``data_preprocessing.{scale,bias}`` (the
    same, for training; checked and dropped). fp32 or fp16 (upcast on load).
``uncond_embedding.npy``
    The text encoder's embedding of the empty prompt, ``[L, D]`` float32 (FLAN-T5-XL: ``[1, 2048]``,
    the ``</s>`` token): the negative branch of classifier-free guidance.

The import is strict: every tensor is used or named as ignored, every shape is checked against the
network the config describes, and an error names the file and the key. Bundles written here load
in the authors' own ``miro.MiroPipeline.from_pretrained`` too, when the model is one the release can
express (LayerNorm QK-norm, Fourier reward embedding, 2 conditioning blocks of 16 heads).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from miro_scale.atomic import write_bytes_atomic
from miro_scale.config import MiroConfig, config_from_dict, config_to_dict

FILES = ("config.json", "model.safetensors", "uncond_embedding.npy")
NETWORK, PRECOND, POST, PRE = "network.", "preconditioning.", "postprocessing.", "data_preprocessing."
MASK = "attention_mask_dummy"


class BundleError(ValueError):
    """A bundle that cannot be loaded as it is; the message names the file and the key."""


def add_bundle_arguments(parser) -> None:
    """--model and --model-variant, as every command that loads a bundle spells them."""
    parser.add_argument("--model", required=True,
                        help="a model bundle: a directory from checkpoints_tools/export.py, or a hub id "
                             "(nicolas-dufour/miro)")
    parser.add_argument("--model-variant", default=None,
                        help="a bundle subfolder (e.g. of nicolas-dufour/miro-ablations)")


def resolve(path_or_id: str, variant: Optional[str] = None, revision: Optional[str] = None,
            cache_dir: Optional[str] = None) -> Path:
    """The local directory of a bundle: ``path_or_id`` itself (or its ``variant`` subfolder), else
    the files of that hub repo, downloaded by huggingface_hub."""
    local = Path(path_or_id)
    if local.is_dir():
        base = local / variant if variant else local
        missing = [f for f in FILES if not (base / f).exists()]
        if missing:
            raise BundleError(f"{base}: not a model bundle (missing {', '.join(missing)})")
        return base
    if local.suffix or local.exists() or str(path_or_id).count("/") != 1:
        raise BundleError(f"{path_or_id}: no such bundle directory (nor a hub id 'owner/name')")
    from huggingface_hub import snapshot_download

    patterns = [f"{variant}/{f}" if variant else f for f in FILES]
    root = Path(snapshot_download(path_or_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns))
    return root / variant if variant else root


# ----------------------------------------------------------------------------- config
def config_from_release(doc: dict, where: str = "config.json",
                        latent_norm: Optional[Tuple[list, list]] = None) -> MiroConfig:
    """Our config for a release-layout config.json (or its ``miro_scale`` section when present).
    ``latent_norm``: (shift, scale) read from the weights' postprocessing buffers."""
    if "miro_scale" in doc:
        return config_from_dict(doc["miro_scale"])
    try:
        net, pre = doc["network"], doc["preconditioning"]
    except KeyError as e:
        raise BundleError(f"{where}: no {e.args[0]!r} section (not a MIRO bundle config)") from None
    for key, want in (("use_cond_rin_block", True), ("concat_cond_token_to_latents", False)):
        if net.get(key, want) != want:
            raise BundleError(f"{where}: network.{key}={net[key]!r} is a variant this project does not build")
    model = {
        "latent_channels": net["num_input_channels"], "latent_size": net["data_size"], "patch_size": net["patch_size"],
        "data_dim": net["data_dim"], "num_latents": net["num_latents"], "latents_dim": net["latents_dim"],
        "num_blocks": net["num_blocks"], "num_processing_layers": net["num_processing_layers"],
        "read_write_heads": net["read_write_heads"], "compute_heads": net["compute_heads"],
        "latent_mlp_multiplier": net["latent_mlp_multiplier"], "data_mlp_multiplier": net["data_mlp_multiplier"],
        "text_dim": net["label_dim"], "num_text_registers": net["num_text_registers"],
        "cond_blocks": 2, "cond_heads": 16,  # fixed in the released network
        "reward_keys": list(net.get("coherence_keys", [])), "reward_embedding": "fourier",
        "reward_dropout": float(net.get("coherence_dropout", 0.0)), "qk_norm": "layer",
        "self_conditioning": bool(net.get("use_self_conditioning", True)),
    }
    flow = {"sigma_data": float(pre.get("sigma_data", 0.5)),
            "learned_loss_weighting": bool(pre.get("do_gradnorm_reweighting", True)),
            "loss_weighting_channels": int(pre.get("logvar_channels", 128))}
    if latent_norm is not None:
        flow["latent_shift"], flow["latent_scale"] = latent_norm
    sampler = doc.get("sampler_defaults", {})
    data = {"caption_source": "txt"}
    return config_from_dict({
        "model": model, "flow": flow, "data": data,
        "sampling": {"num_steps": int(sampler.get("num_steps", 50)),
                     "guidance_scale": float(sampler.get("guidance_scale", 7.0)),
                     "max_text_len": int(doc.get("max_text_len", 77))},
        "text_encoder": {"kind": "t5", "name_or_path": doc.get("text_encoder_repo", "google/flan-t5-xl"),
                         "max_length": int(doc.get("max_text_len", 77))},
        "autoencoder": {"kind": "sdxl_vae", "name_or_path": doc.get("vae_repo", "stabilityai/sdxl-vae"),
                        "image_size": int(doc.get("img_resolution", 8 * net["data_size"]))},
    })


def release_config(cfg: MiroConfig) -> dict:
    """config.json for ``cfg``: the release's sections plus ``miro_scale`` (the whole config)."""
    m, f = cfg.model, cfg.flow
    return {
        "network": {
            "data_size": m.latent_size, "num_input_channels": m.latent_channels, "label_dim": m.text_dim,
            "num_cond_tokens": cfg.sampling.max_text_len, "data_dim": m.data_dim, "num_latents": m.num_latents,
            "latents_dim": m.latents_dim, "num_processing_layers": m.num_processing_layers,
            "num_blocks": m.num_blocks, "patch_size": m.patch_size, "read_write_heads": m.read_write_heads,
            "compute_heads": m.compute_heads, "data_mlp_multiplier": m.data_mlp_multiplier,
            "compute_dropout": 0, "rw_stochastic_depth": 0, "compute_stochastic_depth": 0,
            "num_text_registers": m.num_text_registers, "coherence_keys": list(m.reward_keys),
            "coherence_dropout": m.reward_dropout, "dropout_strategy": "binomial",
            "latent_mlp_multiplier": m.latent_mlp_multiplier, "use_cond_rin_block": True,
            "concat_cond_token_to_latents": False, "use_self_conditioning": m.self_conditioning},
        "preconditioning": {"num_latents": m.num_latents, "latents_dim": m.latents_dim,
                            "do_normalization": "noise_driven", "sigma_data": f.sigma_data,
                            "do_gradnorm_reweighting": f.learned_loss_weighting,
                            "logvar_channels": f.loss_weighting_channels, "logvar_mlp_layers": 0},
        "data_preprocessing": {"input_key_mean": "latent_mean", "input_key_std": "latent_std",
                               "output_key_root": "x_0", "vae_sample": f.sample_posterior,
                               "channel_wise_normalisation": True, "model_type": "sdxl"},
        "postprocessing": {"channel_wise_normalisation": True, "model_type": "sdxl"},
        "scheduler": {"start": 1, "end": 0, "clip_min": 1e-9},
        "coherence_keys": list(m.reward_keys),
        "sampler_defaults": {"num_steps": cfg.sampling.num_steps, "guidance_scale": cfg.sampling.guidance_scale,
                             "sigma_data": f.sigma_data},
        "data_resolution": m.latent_size, "img_resolution": cfg.autoencoder.image_size,
        "max_text_len": cfg.sampling.max_text_len, "model_type": "sdxl",
        "vae_repo": cfg.autoencoder.name_or_path, "text_encoder_repo": cfg.text_encoder.name_or_path,
        "miro_scale": config_to_dict(cfg),
    }


# ----------------------------------------------------------------------------- weights
def _masks(cfg: MiroConfig) -> Dict[str, tuple]:
    """The release network's all-true bool tensors and their shapes."""
    m = cfg.model
    n, r = len(m.reward_keys), m.num_text_registers
    masks = {"cond_mask": (1 + n + r,), "registers_coherence_mask": (n + r,)}
    for i in range(m.num_blocks):
        for block in ["retrieve_cond", "retriever_ca", "writer_ca"] + [f"processer_sa.{j}"
                                                                       for j in range(m.num_processing_layers)]:
            masks[f"rin_blocks.{i}.{block}.{MASK}"] = (1, 1)
    for i in range(m.cond_blocks):
        masks[f"transformers_blocks.{i}.{MASK}"] = (1, 1)
    return masks


def _norm_buffers(cfg: MiroConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias) [1, C, 1, 1]: x = z * scale + bias, the release's channel-wise normalisation."""
    f = cfg.flow
    scale = torch.tensor([f.sigma_data / s for s in f.latent_scale]).view(1, -1, 1, 1)
    bias = -torch.tensor(f.latent_shift).view(1, -1, 1, 1) * scale
    return scale, bias


def latent_norm_from(tensors: Dict[str, torch.Tensor], sigma_data: float, where: str) -> Tuple[list, list]:
    """(latent_shift, latent_scale) from the postprocessing buffers."""
    try:
        scale, bias = tensors[POST + "scale"].double().flatten(), tensors[POST + "bias"].double().flatten()
    except KeyError as e:
        raise BundleError(f"{where}: no {e.args[0]} (the latent normalisation)") from None
    return (-bias / scale).tolist(), (sigma_data / scale).tolist()


def to_release_tensors(state: Dict[str, torch.Tensor], cfg: MiroConfig,
                       dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """A MiroFlowModel state dict as model.safetensors tensors (the release's names and masks)."""
    out = {}
    for k, v in state.items():
        if k.startswith("net."):
            name = NETWORK + k[len("net."):]
        elif k.startswith("logvar_proj."):
            name = PRECOND + k
        else:
            raise BundleError(f"model state key {k!r} has no place in a bundle")
        v = v.detach().cpu()
        out[name] = (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
    for name, shape in _masks(cfg).items():
        out[NETWORK + name] = torch.ones(shape, dtype=torch.bool)
    scale, bias = _norm_buffers(cfg)
    for prefix in (POST, PRE):
        out[prefix + "scale"], out[prefix + "bias"] = scale.clone(), bias.clone()
    return out


def from_release_tensors(tensors: Dict[str, torch.Tensor], cfg: MiroConfig, where: str) -> Dict[str, torch.Tensor]:
    """model.safetensors tensors -> a MiroFlowModel state dict (fp32), strictly: every tensor is used
    or known to be ignorable, and every shape must match the network ``cfg`` describes."""
    from miro_scale.models.flops import build_meta_model

    expected = {k: tuple(v.shape) for k, v in build_meta_model(cfg).state_dict().items()}
    masks = _masks(cfg)
    state, problems = {}, []
    for name, t in tensors.items():
        if name.startswith(NETWORK) and name[len(NETWORK):] in masks:
            key = name[len(NETWORK):]
            if t.dtype != torch.bool or tuple(t.shape) != masks[key] or not bool(t.all()):
                problems.append(f"{name}: expected an all-true bool mask {masks[key]}")
            continue
        if name in (POST + "scale", POST + "bias", PRE + "scale", PRE + "bias"):
            continue  # read into the config (latent normalisation) / training only
        if name.startswith(NETWORK):
            key = "net." + name[len(NETWORK):]
        elif name.startswith(PRECOND):
            key = name[len(PRECOND):]
        else:
            problems.append(f"{name}: unknown tensor")
            continue
        if key not in expected:
            problems.append(f"{name}: not a parameter of the network config.json describes")
            continue
        if tuple(t.shape) != expected[key]:
            problems.append(f"{name}: shape {tuple(t.shape)}, the network has {expected[key]}")
            continue
        state[key] = t.float() if t.is_floating_point() else t
    missing = sorted(set(expected) - set(state))
    missing_masks = sorted(NETWORK + k for k in masks if NETWORK + k not in tensors)
    if missing or missing_masks:
        problems.append(f"missing tensors: {', '.join((missing + missing_masks)[:8])}"
                        f"{' ...' if len(missing) + len(missing_masks) > 8 else ''}")
    if problems:
        raise BundleError(f"{where}: {len(problems)} problem(s): " + "; ".join(problems[:6]))
    return state


# ----------------------------------------------------------------------------- files
def load(path_or_id: str, **resolve_kw) -> Tuple[MiroConfig, Dict[str, torch.Tensor], np.ndarray, Path]:
    """(config, MiroFlowModel state dict, empty-prompt embedding [L, D], bundle directory)."""
    from safetensors.torch import load_file

    base = resolve(path_or_id, **resolve_kw)
    try:
        doc = json.loads((base / "config.json").read_text())
    except ValueError as e:
        raise BundleError(f"{base / 'config.json'}: invalid JSON ({e})") from None
    weights = base / "model.safetensors"
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors' and numpy's errors do not name the file
        raise BundleError(f"{weights}: not a readable safetensors file ({e})") from None
    sigma = float(doc.get("preconditioning", {}).get("sigma_data", 0.5))
    norm = None if "miro_scale" in doc else latent_norm_from(tensors, sigma, str(weights))
    cfg = config_from_release(doc, str(base / "config.json"), norm)
    state = from_release_tensors(tensors, cfg, str(weights))
    try:
        uncond = np.load(base / "uncond_embedding.npy", allow_pickle=False)
    except ValueError as e:
        raise BundleError(f"{base / 'uncond_embedding.npy'}: not a plain .npy array ({e})") from None
    if not isinstance(uncond, np.ndarray):  # np.load opens any zip as an .npz archive
        raise BundleError(f"{base / 'uncond_embedding.npy'}: not a plain .npy array (a zip archive)")
    uncond = uncond.astype(np.float32)
    if uncond.ndim == 1:
        uncond = uncond[None]
    if uncond.ndim != 2 or uncond.shape[1] != cfg.model.text_dim:
        raise BundleError(f"{base / 'uncond_embedding.npy'}: shape {uncond.shape}, expected [L, {cfg.model.text_dim}]")
    return cfg, state, uncond, base


def save(directory: str | Path, cfg: MiroConfig, state: Dict[str, torch.Tensor], uncond: np.ndarray,
         dtype: Optional[torch.dtype] = None) -> Path:
    """Write a bundle: into a temporary directory renamed into place when complete, so a reader (or
    a rerun after a kill) sees the old bundle or the new one, never a mix."""
    import io
    import os
    import shutil

    from safetensors.torch import save as save_tensors

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_bytes_atomic(tmp / "model.safetensors", save_tensors(to_release_tensors(state, cfg, dtype)))
    buf = io.BytesIO()
    np.save(buf, np.asarray(uncond, dtype=np.float32), allow_pickle=False)
    write_bytes_atomic(tmp / "uncond_embedding.npy", buf.getvalue())
    write_bytes_atomic(tmp / "config.json", json.dumps(release_config(cfg), indent=2).encode())
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old{os.getpid()}")
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
    return directory
