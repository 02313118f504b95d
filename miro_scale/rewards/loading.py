"""Checkpoint resolution, digests and strict state-dict loading shared by the reward models."""
from __future__ import annotations

import fnmatch
import hashlib
import os
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch


class CheckpointError(RuntimeError):
    """A checkpoint does not match the architecture (names the file and keys)."""


def file_digest(path: str | os.PathLike, algo: str = "sha256", chunk: int = 1 << 22) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return f"{algo}:{h.hexdigest()}"


def dir_digest(path: str | os.PathLike) -> str:
    """Digest of every weight/config file in a directory (names + contents), order-independent."""
    h = hashlib.sha256()
    p = Path(path)
    for f in sorted(p.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt", ".model"):
            h.update(str(f.relative_to(p)).encode())
            h.update(file_digest(f).encode())
    return f"sha256:{h.hexdigest()}"


def resolve_file(source: str, filename: Optional[str] = None) -> Path:
    """A local file, a file inside a local directory, or `filename` from a Hugging Face hub repo id."""
    p = Path(source).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if filename is None:
            raise FileNotFoundError(f"{source} is a directory: say which file to load")
        q = p / filename
        if not q.is_file():
            raise FileNotFoundError(f"{q} does not exist")
        return q
    if filename is None or source.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"checkpoint {source!r} not found (neither a local file nor hub repo + filename)")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # pragma: no cover
        raise FileNotFoundError(f"{source!r} is not a local path and huggingface_hub is missing") from e
    return Path(hf_hub_download(repo_id=source, filename=filename))


def load_state_dict_file(path: str | os.PathLike, nested: Sequence[str] = ("state_dict", "model", "module")) -> Dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            try:  # OpenAI's original CLIP files are TorchScript archives
                sd = torch.jit.load(str(path), map_location="cpu").state_dict()
            except Exception:
                raise CheckpointError(f"{path}: cannot be read as a torch checkpoint with weights_only=True "
                                      f"nor as TorchScript ({e})") from e
    for k in nested:  # unwrap {"state_dict": {...}} style containers
        if isinstance(sd, dict) and k in sd and isinstance(sd[k], dict):
            sd = sd[k]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _fmt(keys: Iterable[str], n: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_state_dict(expected: Mapping[str, Tuple[int, ...]], state_dict: Mapping[str, torch.Tensor], *,
                     source: str = "<state dict>", optional: Sequence[str] = (), ignore: Sequence[str] = ()) -> None:
    """Raise CheckpointError naming missing, unexpected and shape-mismatched keys.

    expected: key -> shape; optional: glob patterns of expected keys allowed to be absent
    (non-persistent buffers); ignore: glob patterns of checkpoint keys known to be unused.
    """
    def matches(k, pats):
        return any(fnmatch.fnmatchcase(k, p) for p in pats)
    missing = [k for k in expected if k not in state_dict and not matches(k, optional)]
    unexpected = [k for k in state_dict if k not in expected and not matches(k, ignore)]
    bad_shape = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
                 for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])]
    errs = []
    if missing:
        errs.append(f"{len(missing)} missing key(s): {_fmt(missing)}")
    if unexpected:
        errs.append(f"{len(unexpected)} unexpected key(s): {_fmt(unexpected)}")
    if bad_shape:
        errs.append(f"{len(bad_shape)} shape mismatch(es): {_fmt(bad_shape)}")
    if errs:
        raise CheckpointError(f"{source}: " + "; ".join(errs))


def strict_load(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "<state dict>",
                optional: Sequence[str] = (), ignore: Sequence[str] = ()) -> None:
    """load_state_dict that fails loudly: every model key present (bar `optional`), no stray keys
    (bar `ignore`), every shape equal."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_state_dict(expected, state_dict, source=source, optional=optional, ignore=ignore)
    keep = {k: v for k, v in state_dict.items() if k in expected}
    module.load_state_dict(keep, strict=False)


def manifest_of(module: torch.nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}
