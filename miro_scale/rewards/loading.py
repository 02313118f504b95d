"""Checkpoint resolution, digests and strict state-dict loading shared by the reward models.

Loading a large model without holding it twice in host memory:

    with init_on_meta():                      # parameters on the meta device: no memory, no init
        model = build(...)
    materialize(model, device, dtype, keep_fp32=("logit_scale",))   # storage on the target device
    load_checkpoint_files(model, files, source=..., optional=..., ignore=..., aliases=..., rename=...)

load_checkpoint_files copies one tensor at a time (safetensors) or one file at a time (torch pickles,
memory-mapped) into the materialised model, after checking every name and shape of every file.
"""
from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import nn


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


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip holding compiled code and constants.pkl beside data.pkl."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def load_state_dict_file(path: str | os.PathLike, nested: Sequence[str] = ("state_dict", "model", "module"),
                         mmap: bool = False) -> Dict[str, torch.Tensor]:
    """A checkpoint file's state dict; `mmap` maps a torch pickle's storage instead of reading it
    (tensors are paged in when used; only zip-format pickles can be mapped, older ones are read)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            sd = load_file(str(path))
        except Exception as e:  # safetensors' own errors do not name the file
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True,
                            mmap=mmap and zipfile.is_zipfile(path))
        except Exception as e:
            if not _is_torchscript(path):
                raise CheckpointError(f"{path}: cannot be read as a torch checkpoint with weights_only=True "
                                      f"({e}); nothing else is tried, as that would unpickle it") from e
            try:  # OpenAI's original CLIP files: TorchScript's own unpickler admits no Python callables
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


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _bad_shape(key: str, checkpoint: Sequence[int], model: Sequence[int]) -> str:
    return f"{key}: checkpoint {tuple(checkpoint)} vs model {tuple(model)}"


def check_state_dict(expected: Mapping[str, Tuple[int, ...]], state_dict: Mapping[str, torch.Tensor], *,
                     source: str = "<state dict>", optional: Sequence[str] = (), ignore: Sequence[str] = ()) -> None:
    """Raise CheckpointError naming missing, unexpected and shape-mismatched keys.

    expected: key -> shape; optional: glob patterns of expected keys allowed to be absent
    (non-persistent buffers); ignore: glob patterns of checkpoint keys known to be unused.
    """
    missing = [k for k in expected if k not in state_dict and not _matches(k, optional)]
    unexpected = [k for k in state_dict if k not in expected and not _matches(k, ignore)]
    bad_shape = [_bad_shape(k, state_dict[k].shape, expected[k])
                 for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])]
    _raise_if(source, missing, unexpected, bad_shape)


def _raise_if(source: str, missing: Sequence[str], unexpected: Sequence[str], bad_shape: Sequence[str]) -> None:
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


@contextmanager
def init_on_meta():
    """Build modules with every parameter on the meta device: no memory, and initialisers run on
    meta tensors (free). Buffers stay real: they are small, computed at construction (position
    ids, attention masks) and often absent from checkpoints. Patches nn.Module.register_parameter
    while active, so build one model at a time."""
    register = nn.Module.register_parameter

    def register_on_meta(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def materialize(module: nn.Module, device="cpu", dtype: torch.dtype = torch.float32,
                keep_fp32: Sequence[str] = ()) -> nn.Module:
    """Give every parameter and buffer of `module` storage on `device`, floating ones in `dtype`
    (float32 where a name matches a `keep_fp32` glob). Meta tensors get uninitialised storage, to be
    filled by load_checkpoint_files; real ones are converted. Tied parameters stay tied."""
    device = torch.device(device)
    names: Dict[int, List[str]] = {}
    for n, t in itertools.chain(module.named_parameters(remove_duplicate=False),
                                module.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(n)
    new: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (old, new); holding `old` keeps ids unique
    for mod in module.modules():
        for store in (mod._parameters, mod._buffers):
            for n, t in store.items():
                if t is None:
                    continue
                if id(t) not in new:
                    dt = t.dtype
                    if t.is_floating_point():
                        dt = torch.float32 if any(_matches(k, keep_fp32) for k in names[id(t)]) else dtype
                    x = (torch.empty(t.shape, dtype=dt, device=device) if t.device.type == "meta"
                         else t.detach().to(device=device, dtype=dt))
                    if isinstance(t, nn.Parameter):
                        x = nn.Parameter(x, requires_grad=t.requires_grad)
                    new[id(t)] = (t, x)
                store[n] = new[id(t)][1]
    return module


class CheckpointFile:
    """One checkpoint file, read lazily. safetensors: the header once, then each tensor through its own
    safe_open, because mapped pages count as resident memory until the mapping is closed; torch
    pickles: memory-mapped as a whole while the file is open."""

    def __init__(self, path: Path):
        self.path = path
        self._sd: Optional[Dict[str, torch.Tensor]] = None

    def __enter__(self):
        if self.path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        else:
            self._sd = load_state_dict_file(self.path, mmap=True)
            self.shapes = {k: tuple(v.shape) for k, v in self._sd.items()}
        return self

    def __exit__(self, *exc):
        self._sd = None  # drops the mapping

    def tensor(self, key: str) -> torch.Tensor:
        if self._sd is not None:
            return self._sd[key]
        from safetensors import safe_open
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            return f.get_tensor(key)


def load_checkpoint_files(module: nn.Module, files: Sequence[str | os.PathLike], *, source: Optional[str] = None,
                          optional: Sequence[str] = (), ignore: Sequence[str] = (),
                          aliases: Optional[Mapping[str, str]] = None,
                          rename: Optional[Callable[[str], str]] = None) -> Set[str]:
    """Copy the tensors of checkpoint `files` (.safetensors, or torch pickles .bin/.pt/.pth; the
    shards of one checkpoint) into `module`, strictly, one tensor at a time: beyond the module, host
    memory peaks at about one tensor for safetensors, one file for torch pickles (memory-mapped, so
    its pages are reclaimable page cache). Values are cast to each target's dtype and device (see
    materialize).

    rename:   checkpoint key -> module key (a namespace change).
    aliases:  {checkpoint key: module key} for extra copies of a tensor saved under a name the module
              lacks (t2v-metrics' top-level `embed_tokens.weight` for `shared.weight`).
    optional: globs of module keys allowed to be absent (buffers computed at construction, parts
              the caller loads from elsewhere: what it does not load keeps its current values).
    ignore:   globs of checkpoint keys known to be unused.
    Module keys that are one tensor (tied weights) are loaded by any one of their names; every
    further copy in the checkpoint (a tied name or an alias) must have the same shape and values.
    Every name and shape is checked before anything is copied: CheckpointError names each missing,
    unexpected and mis-shaped key, then each copy whose values differ. Returns the module keys loaded."""
    files = [Path(f) for f in files]
    source = source or ", ".join(map(str, files))
    aliases = dict(aliases or {})
    state = module.state_dict(keep_vars=True)
    canonical: Dict[str, str] = {}  # module key -> first module key of the same tensor
    first: Dict[int, str] = {}
    for k, t in state.items():
        canonical[k] = first.setdefault(id(t), k)
    where: Dict[str, Path] = {}
    plan: Dict[str, List[str]] = {}  # canonical module key -> checkpoint keys holding it
    unexpected, bad_shape = [], []
    for f in files:
        with CheckpointFile(f) as ck:
            for key, shape in ck.shapes.items():
                if key in where:
                    raise CheckpointError(f"{source}: {key} is in both {where[key].name} and {f.name}")
                where[key] = f
                mk = aliases.get(key) or (rename(key) if rename else key)
                if mk not in state:
                    if not _matches(key, ignore):
                        unexpected.append(key)
                elif shape != tuple(state[mk].shape):
                    bad_shape.append(_bad_shape(key, shape, state[mk].shape))
                else:
                    plan.setdefault(canonical[mk], []).append(key)
    members: Dict[str, List[str]] = {}
    for k, c in canonical.items():
        members.setdefault(c, []).append(k)
    missing = [c for c, ks in members.items() if c not in plan and not any(_matches(k, optional) for k in ks)]
    _raise_if(source, missing, unexpected, bad_shape)
    for keys in plan.values():
        keys.sort(key=lambda k: k in aliases)  # the module's own names first
    primary = {keys[0]: c for c, keys in plan.items()}
    with torch.no_grad():
        for f in files:
            with CheckpointFile(f) as ck:
                for key in ck.shapes:
                    if key in primary:
                        state[primary[key]].copy_(ck.tensor(key))

    def read(key):
        with CheckpointFile(where[key]) as ck:
            return ck.tensor(key)

    differ = [f"{k} (differs from {keys[0]})" for keys in plan.values() for k in keys[1:]
              if not torch.equal(read(k), read(keys[0]))]
    if differ:
        raise CheckpointError(f"{source}: {len(differ)} tied copy(ies) with other values: {_fmt(differ)}")
    return {k for k, c in canonical.items() if c in plan}


WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")


def weight_files(directory: str | os.PathLike) -> List[Path]:
    """The weight files of a transformers-style model directory: safetensors before torch pickles,
    sharded (listed by an .index.json) or single."""
    d = Path(directory)
    for name in WEIGHT_FILES:
        if (d / name).is_file():
            if name.endswith(".index.json"):
                return sorted({d / f for f in json.loads((d / name).read_text())["weight_map"].values()})
            return [d / name]
    raise FileNotFoundError(f"{d}: none of {', '.join(WEIGHT_FILES)}")


def model_dir(source: str) -> Path:
    """A local model directory, or the hub snapshot of repo `source` with its .json files and one set
    of weight files (safetensors when the repo has them)."""
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    if source.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"model directory {source} does not exist")
    from huggingface_hub import list_repo_files, snapshot_download
    names = set(list_repo_files(source))
    name = next((n for n in WEIGHT_FILES if n in names), None)
    if name is None:
        raise FileNotFoundError(f"hub repo {source}: none of {', '.join(WEIGHT_FILES)}")
    weights = "*.safetensors" if "safetensors" in name else "*.bin"
    return Path(snapshot_download(source, allow_patterns=["*.json", weights]))
