"""One config system: typed dataclasses loaded from JSON, strict validation, dotted overrides.

    cfg = load_config("configs/miro_16m.json", overrides=["model.latents_dim=512", "optim.lr=3e-4"])

Every error names the dotted field it is about (and, for unknown keys, the nearest valid one), so a
typo in a 500k-step config fails before any process group or model is built.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

from miro_scale.rewards.keys import MIRO_REWARD_KEYS, REWARD_KEYS


class ConfigError(ValueError):
    """A config that cannot be used; the message names the dotted field."""


# SDXL-VAE latent statistics per channel (released recipe): x = (z - shift) * sigma_data / scale.
SDXL_LATENT_SHIFT = [-0.3480, 0.3754, 0.0419, 2.4331]
SDXL_LATENT_SCALE = [7.8518, 5.8465, 6.8716, 5.3140]


@dataclass
class ModelConfig:
    """TextRIN ("CADRINTextCond") sizes; defaults are the released 0.36B MIRO network."""

    latent_channels: int = 4
    latent_size: int = 32  # latent height = width (256 px through the SDXL VAE)
    patch_size: int = 2
    data_dim: int = 512
    num_latents: int = 256
    latents_dim: int = 1024
    num_blocks: int = 4
    num_processing_layers: int = 4
    read_write_heads: int = 16
    compute_heads: int = 32
    latent_mlp_multiplier: int = 4
    data_mlp_multiplier: int = 4
    text_dim: int = 2048  # FLAN-T5-XL hidden size
    num_text_registers: int = 16
    cond_blocks: int = 2
    cond_heads: int = 16
    reward_keys: List[str] = field(default_factory=lambda: list(MIRO_REWARD_KEYS))
    reward_embedding: Literal["fourier", "sinusoidal"] = "fourier"
    reward_bins: int = 64
    reward_dropout: float = 0.0
    # a NaN reward while training: "value0" embeds it as value 0 (the release: nan_to_num before the
    # embedder); "zero_token" gives the zero token a NaN gets at inference (docs/fidelity.md)
    nan_reward_in_training: Literal["value0", "zero_token"] = "value0"
    qk_norm: Literal["layer", "rms"] = "layer"  # the released checkpoints use LayerNorm for QK-norm
    # initial patch position embedding: "normal" (std 0.02, as released) or "sincos" (2-D sin-cos of
    # unit scale, as DiT): with std 0.02 against RMS-normed patches, a small model sees no position
    # for its first thousand steps and scatters the patches of a shape (README, "What the demo finds")
    data_pos_init: Literal["normal", "sincos"] = "normal"
    # each data token reads, and writes back, a k x k block of patches around its own (overlapping
    # patches: a conv of kernel k * patch_size and stride patch_size in, its transpose out); 1 is the
    # released non-overlapping linear patches. With 1, a small pixel-space model decides each patch
    # from its own noise and draws scatters of patches; with 3 it draws coherent objects (README,
    # "What the demo finds")
    patch_context: int = 1
    self_conditioning: bool = True

    def validate(self, prefix: str) -> None:
        for name in ("latent_channels", "latent_size", "patch_size", "data_dim", "num_latents",
                     "latents_dim", "num_blocks", "read_write_heads", "compute_heads",
                     "latent_mlp_multiplier", "data_mlp_multiplier", "text_dim", "cond_heads"):
            _require(getattr(self, name) > 0, prefix, name, "must be > 0")
        for name in ("num_processing_layers", "num_text_registers", "cond_blocks"):
            _require(getattr(self, name) >= 0, prefix, name, "must be >= 0")
        _require(self.latent_size % self.patch_size == 0, prefix, "patch_size",
                 f"{self.patch_size} does not divide latent_size {self.latent_size}")
        _require(self.reward_bins >= 2, prefix, "reward_bins", "must be >= 2")
        _require(self.patch_context >= 1 and self.patch_context % 2 == 1, prefix, "patch_context",
                 f"must be an odd number >= 1 (a block of patches centred on its own), got {self.patch_context}")
        _require(self.data_pos_init != "sincos" or self.data_dim % 4 == 0, prefix, "data_pos_init",
                 f"'sincos' needs data_dim divisible by 4, got {self.data_dim}")
        _require(0.0 <= self.reward_dropout < 1.0, prefix, "reward_dropout", "must be in [0, 1)")
        for i, key in enumerate(self.reward_keys):
            if key not in REWARD_KEYS:
                raise ConfigError(f"{prefix}reward_keys[{i}]: unknown reward key {key!r}"
                                  f"{_nearest_hint(key, REWARD_KEYS)}; known: {', '.join(REWARD_KEYS)}")
        _require(len(set(self.reward_keys)) == len(self.reward_keys), prefix, "reward_keys",
                 "has duplicates")
        heads = {
            "read_write_heads": (self.read_write_heads, [min(self.latents_dim, self.data_dim), self.latents_dim]),
            "compute_heads": (self.compute_heads, [self.latents_dim]),
            "cond_heads": (self.cond_heads, [self.latents_dim]),
        }
        for name, (num_heads, widths) in heads.items():
            for width in widths:
                _require(width % num_heads == 0, prefix, name,
                         f"{num_heads} heads do not divide attention width {width}")
        _require(self.latents_dim % 4 == 0, prefix, "latents_dim", "must be divisible by 4 (Fourier embedder width)")


@dataclass
class FlowConfig:
    """Flow matching as released: x_t = gamma*x0 + (1-gamma)*noise, v = noise - x0."""

    sigma_data: float = 0.5
    latent_shift: List[float] = field(default_factory=lambda: list(SDXL_LATENT_SHIFT))
    latent_scale: List[float] = field(default_factory=lambda: list(SDXL_LATENT_SCALE))
    sample_posterior: bool = True  # draw z = mean + std * eps from the precomputed VAE posterior
    time_distribution: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    learned_loss_weighting: bool = True  # EDM2 loss / exp(u(gamma)) + u(gamma)
    loss_weighting_channels: int = 128
    self_cond_rate: float = 0.9
    # what the network predicts: "velocity" (as released) or "sample" (x0; see miro_scale.flow)
    prediction: Literal["velocity", "sample"] = "velocity"

    def validate(self, prefix: str) -> None:
        _require(self.sigma_data > 0, prefix, "sigma_data", "must be > 0")
        _require(len(self.latent_shift) == len(self.latent_scale), prefix, "latent_scale",
                 f"has {len(self.latent_scale)} channels but latent_shift has {len(self.latent_shift)}")
        _require(all(s > 0 for s in self.latent_scale), prefix, "latent_scale", "entries must be > 0")
        _require(self.logit_normal_std > 0, prefix, "logit_normal_std", "must be > 0")
        _require(self.loss_weighting_channels > 0, prefix, "loss_weighting_channels", "must be > 0")
        _require(0.0 <= self.self_cond_rate <= 1.0, prefix, "self_cond_rate", "must be in [0, 1]")


@dataclass
class SamplingConfig:
    num_steps: int = 50
    solver: Literal["euler", "heun"] = "euler"
    guidance_scale: float = 7.0
    # Per reward key: the value of s+ and s- (in [0, 1]); keys not given default to 1 and 0.
    reward_targets: Dict[str, float] = field(default_factory=dict)
    negative_reward_targets: Dict[str, float] = field(default_factory=dict)
    empty_prompt_negative: bool = True
    max_text_len: int = 77
    # < 1: stop the flow at this signal level and return the model's clean estimate there (see
    # miro_scale.sampling.sample); 1 integrates to the data, as released
    final_gamma: float = 1.0

    def validate(self, prefix: str) -> None:
        _require(self.num_steps >= 1, prefix, "num_steps", "must be >= 1")
        _require(self.guidance_scale >= 0, prefix, "guidance_scale", "must be >= 0")
        _require(self.max_text_len >= 1, prefix, "max_text_len", "must be >= 1")
        _require(0.0 < self.final_gamma <= 1.0, prefix, "final_gamma", "must be in (0, 1]")
        for name in ("reward_targets", "negative_reward_targets"):
            for key, value in getattr(self, name).items():
                _require(0.0 <= value <= 1.0, prefix, f"{name}.{key}", f"{value} is not in [0, 1]")


@dataclass
class OptimConfig:
    """LAMB with linear warmup then 0.5*lr*(1 + cos(rate*pi*progress))."""

    name: Literal["lamb", "adamw"] = "lamb"
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 5000
    cosine_rate: float = 0.8
    grad_clip: float = 2.0
    ema_decay: float = 0.9999
    ema_start_step: int = 0

    def validate(self, prefix: str) -> None:
        _require(self.lr > 0, prefix, "lr", f"must be > 0, got {self.lr}")
        _require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), prefix, "betas",
                 "must be two values in [0, 1)")
        _require(self.eps > 0, prefix, "eps", "must be > 0")
        _require(self.weight_decay >= 0, prefix, "weight_decay", "must be >= 0")
        _require(self.warmup_steps >= 0, prefix, "warmup_steps", "must be >= 0")
        _require(self.cosine_rate > 0, prefix, "cosine_rate", "must be > 0")
        _require(self.grad_clip >= 0, prefix, "grad_clip", "must be >= 0 (0 disables clipping)")
        _require(0.0 <= self.ema_decay < 1.0, prefix, "ema_decay", "must be in [0, 1)")
        _require(self.ema_start_step >= 0, prefix, "ema_start_step", "must be >= 0")


@dataclass
class DataConfig:
    """Where batches come from.

    synthetic_tensors: deterministic latents/embeddings/rewards made in memory (smoke runs, tests).
    shards: WebDataset shards (docs/data.md) read by the PIL/torch or DALI loader; `mode` "latent"
    reads precomputed VAE latents, "image" decodes images (encoded by the autoencoder on the fly);
    text comes as precomputed embeddings or as captions encoded by the text encoder on the fly.
    """

    source: Literal["synthetic_tensors", "shards"] = "synthetic_tensors"
    num_samples: int = 4096  # synthetic_tensors: size of the deterministic dataset
    text_len: int = 16  # synthetic_tensors: text tokens per sample (the release pads to 256)
    shards: str = ""  # shards: a directory, a glob or a brace pattern ('data/{00000..01999}.tar')
    loader: Literal["pil", "dali"] = "pil"
    mode: Literal["latent", "image"] = "latent"
    resolution: int = 256  # image mode: pixels
    # "txt", a name in json["captions"] (e.g. "long", a synthetic caption), or a {name: weight} mix
    # drawn per sample and epoch; each caption brings its own rewards (json "rewards_by_caption")
    caption_source: Union[str, Dict[str, float]] = "txt"
    precomputed_text: bool = True  # text embeddings stored in the shards; else encode captions
    max_text_len: int = 256
    num_workers: int = 2

    def validate(self, prefix: str) -> None:
        _require(self.num_samples >= 1, prefix, "num_samples", "must be >= 1")
        _require(self.text_len >= 1, prefix, "text_len", "must be >= 1")
        _require(self.max_text_len >= 1, prefix, "max_text_len", "must be >= 1")
        _require(self.num_workers >= 0, prefix, "num_workers", "must be >= 0")
        _require(self.resolution >= 1, prefix, "resolution", "must be >= 1")
        _require(self.source != "shards" or bool(self.shards), prefix, "shards", "is required when source is 'shards'")
        mix = self.caption_mix()
        _require(all(w >= 0 for w in mix.values()) and sum(mix.values()) > 0, prefix, "caption_source",
                 f"weights must be >= 0 with a positive sum, got {self.caption_source!r}")
        if self.source == "shards" and self.loader == "dali":
            _require(self.mode == "image", prefix, "loader",
                     "'dali' decodes images; latent mode (precomputed latents) reads shards with loader 'pil'")
            _require(not self.precomputed_text, prefix, "loader",
                     "'dali' does not read precomputed text embeddings; use loader 'pil' or precomputed_text false")

    def caption_mix(self) -> Dict[str, float]:
        """The caption sources and their weights."""
        src = self.caption_source
        return {src: 1.0} if isinstance(src, str) else dict(src)


@dataclass
class TrainConfig:
    steps: int = 500_000
    global_batch_size: int = 1024
    micro_batch_size: int = 64  # per process; accumulation = global / (micro * world)
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast; fp16 would need loss scaling
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    output_dir: str = "runs/miro"
    init_from: str = ""  # post-training: start from this checkpoint's EMA weights, fresh optimizer
    peak_tflops: float = 989.0  # per device, dense bf16 (H100 SXM), the MFU denominator
    wandb_project: str = ""  # also log to this Weights & Biases project ("": off)
    sample_every: int = 0  # steps between sample grids (0: never)
    sample_count: int = 8  # prompts in a grid; each at s+ = 1 (guided) and s+ = 0
    eval_rewards: List[str] = field(default_factory=list)  # reward models scoring each grid's images
    eval_reward_variant: Literal["pretrained", "random", "tiny"] = "pretrained"

    def validate(self, prefix: str) -> None:
        _require(self.steps >= 1, prefix, "steps", "must be >= 1")
        _require(self.global_batch_size >= 1, prefix, "global_batch_size", "must be >= 1")
        _require(self.micro_batch_size >= 1, prefix, "micro_batch_size", "must be >= 1")
        _require(self.global_batch_size % self.micro_batch_size == 0, prefix, "global_batch_size",
                 f"{self.global_batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}")
        _require(self.log_every >= 1, prefix, "log_every", "must be >= 1")
        _require(self.checkpoint_every >= 1, prefix, "checkpoint_every", "must be >= 1")
        _require(self.keep_checkpoints >= 1, prefix, "keep_checkpoints", "must be >= 1")
        _require(self.peak_tflops > 0, prefix, "peak_tflops", "must be > 0")
        _require(self.sample_every >= 0, prefix, "sample_every", "must be >= 0")
        _require(self.sample_count >= 1, prefix, "sample_count", "must be >= 1")
        for i, key in enumerate(self.eval_rewards):
            if key not in REWARD_KEYS:
                raise ConfigError(f"{prefix}eval_rewards[{i}]: unknown reward key {key!r}"
                                  f"{_nearest_hint(key, REWARD_KEYS)}")
        _require(not self.eval_rewards or self.sample_every > 0, prefix, "eval_rewards",
                 "scores the sample grids, so sample_every must be > 0")


@dataclass
class EngineConfig:
    """How the same model, loss and data are distributed (a thin adapter; see train/engines.py)."""

    kind: Literal["local", "deepspeed", "fsdp"] = "local"
    zero_stage: int = 2  # deepspeed: ZeRO stage 0-3
    # deepspeed ZeRO 1-3: reduce gradients in buckets of this many elements from the backward's
    # gradient hooks (overlapping the backward) instead of all at once after it
    zero_overlap_comm: bool = True
    zero_bucket_elements: int = 25_000_000  # ~15 buckets for the 0.36B model
    zero_reduce_dtype: Literal["bf16", "fp32"] = "fp32"  # deepspeed's gradient communication dtype
    activation_checkpointing: bool = False  # recompute each RIN block in backward
    fsdp_param_dtype: Literal["bf16", "fp32"] = "bf16"  # FSDP2 compute/communication dtype
    fsdp_reduce_dtype: Literal["bf16", "fp32"] = "fp32"
    fsdp_reshard_after_forward: bool = True

    def validate(self, prefix: str) -> None:
        _require(self.zero_stage in (0, 1, 2, 3), prefix, "zero_stage", f"must be 0-3, got {self.zero_stage}")
        _require(self.zero_bucket_elements >= 1, prefix, "zero_bucket_elements", "must be >= 1")


@dataclass
class TextEncoderConfig:
    kind: Literal["t5", "small"] = "t5"
    name_or_path: str = "google/flan-t5-xl"
    max_length: int = 77

    def validate(self, prefix: str) -> None:
        _require(self.max_length >= 1, prefix, "max_length", "must be >= 1")


@dataclass
class AutoencoderConfig:
    kind: Literal["sdxl_vae", "identity"] = "sdxl_vae"
    name_or_path: str = "stabilityai/sdxl-vae"
    image_size: int = 256

    def validate(self, prefix: str) -> None:
        _require(self.image_size >= 1, prefix, "image_size", "must be >= 1")


@dataclass
class MiroConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)

    def validate(self, prefix: str = "") -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f"{prefix}{f.name}.")
        _require(len(self.flow.latent_shift) == self.model.latent_channels, "flow.", "latent_shift",
                 f"has {len(self.flow.latent_shift)} channels, model.latent_channels is "
                 f"{self.model.latent_channels}")
        if self.data.source == "shards" and self.data.mode == "image":
            downsample = 8 if self.autoencoder.kind == "sdxl_vae" else 1
            _require(self.data.resolution == self.model.latent_size * downsample, "data.", "resolution",
                     f"{self.data.resolution} px through the {self.autoencoder.kind} autoencoder does not give "
                     f"model.latent_size {self.model.latent_size}")
        for name in ("reward_targets", "negative_reward_targets"):
            for key in getattr(self.sampling, name):
                if key not in self.model.reward_keys:
                    raise ConfigError(f"sampling.{name}.{key}: not one of model.reward_keys "
                                      f"{self.model.reward_keys}{_nearest_hint(key, self.model.reward_keys)}")


def _require(ok: bool, prefix: str, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{prefix}{name}: {message}")


def _nearest_hint(key: str, candidates: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    """Check `value` against a type hint, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected an object, got {type(value).__name__}")
        return _from_dict(annotation, value, path + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}{_nearest_hint(str(value), [str(a) for a in args])}")
        return value
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected an object, got {type(value).__name__}")
        return {str(k): _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {annotation}")


def _from_dict(cls, data: Dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key{_nearest_hint(key, names)}; "
                              f"valid keys here: {', '.join(names)}")
    kwargs = {key: _coerce(value, hints[key], prefix + key) for key, value in data.items()}
    return cls(**kwargs)


def config_from_dict(data: Dict[str, Any]) -> MiroConfig:
    cfg = _from_dict(MiroConfig, data)
    cfg.validate()
    return cfg


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply `a.b.c=value` strings; values parse as JSON when they can, else as plain strings."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node, parts = data, dotted.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted}: {'.'.join(parts[:depth + 1])} is not an object")
            node = child
        node[parts[-1]] = value
    return data


def _merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def read_config_file(path: str | Path, _seen: tuple = ()) -> Dict[str, Any]:
    """A JSON config as a dict; `"extends": "other.json"` (relative to this file) is read first and
    this file's values are merged over it, so variants state only what differs."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be an object")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends: expected a file name")
    return _merge(read_config_file(path.parent / base, _seen + (path.resolve(),)), data)


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> MiroConfig:
    """Load a JSON config (or the defaults when path is None), apply overrides, validate."""
    data: Dict[str, Any] = read_config_file(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path or '<defaults>'}: {err}") from None


def config_to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)
