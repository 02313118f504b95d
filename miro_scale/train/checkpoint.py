"""The checkpointer: one format for every engine, written by every rank together, read without
running code.

Layout of one checkpoint, root/step_{N:08d}/:
    state/             a torch.distributed.checkpoint (DCP) directory holding tensors only: the
                       engine's model, optimizer and scheduler and the EMA, by parameter name,
                       whole tensors or DTensor shards; DCP reshards on load, so a run may
                       resume on another world size or engine
    trainer.json       step and counters, plus every non-tensor leaf of that state (optimizer
                       hyperparameters, scheduler counters) with placeholders for the tensors
    rank_{r:05d}.json  each rank's data position and RNG states
    config.json        the config that produced it
Everything is written into root/.tmp_step_N first; rank 0 renames it into place once all ranks
are done, then points root/latest at it (written last, atomically). A run killed at any moment
leaves either the previous checkpoint or the new one, never a half-written one that `latest` names.

Nothing here unpickles: JSON for what is not a tensor, DCP's tensor files through
torch.load(weights_only=True), and DCP's `.metadata` pickle through an allowlist of its own
record types (stock DCP reads it with pickle.load and byte entries with weights_only=False).
"""
from __future__ import annotations

import base64
import contextlib
import errno
import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from miro_scale.atomic import write_text_atomic

LATEST_FILE = "latest"
TRAINER_FILE = "trainer.json"
STATE_DIR = "state"
TENSOR_KEY = "__tensor__"  # a JSON placeholder: {"__tensor__": "<its key in the DCP directory>"}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, foreign, truncated or tampered with; the message names the file."""


def staging_dir(root: Path, step: int) -> Path:
    return root / f".tmp_step_{step:08d}"


def rank_file(path: Path, rank: int) -> Path:
    return path / f"rank_{rank:05d}.json"


def prepare_staging(root: Path, step: int) -> Path:
    """Rank 0 only: an empty staging directory for this step."""
    tmp = staging_dir(root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(root: Path, step: int, trainer_state: Dict[str, Any], config: Dict[str, Any], keep: int) -> Path:
    """Rank 0 only, after every rank has written into the staging directory."""
    tmp, final = staging_dir(root, step), root / f"step_{step:08d}"
    with naming_a_full_disk(final):
        _write_json(tmp / TRAINER_FILE, trainer_state)
        _write_json(tmp / "config.json", config)
        if final.exists():  # the same step saved again (a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(root / LATEST_FILE, final.name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read checkpoint file {path}: not JSON ({err})") from None


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    root = Path(root)
    pointer = root / LATEST_FILE
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / TRAINER_FILE).exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which has no {TRAINER_FILE}")
    return path


def read_trainer_state(path: Path) -> Dict[str, Any]:
    return read_json(Path(path) / TRAINER_FILE)


# -- tensors apart from everything else -------------------------------------------------------
def split_tensors(tree: Any, prefix: str = "") -> Tuple[Dict[str, torch.Tensor], Any]:
    """(tensors by dotted key, the tree with each tensor replaced by a JSON placeholder)."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}, {TENSOR_KEY: prefix}
    if isinstance(tree, dict):
        flat, skeleton = {}, {}
        for key, value in tree.items():
            sub, skeleton[str(key)] = split_tensors(value, f"{prefix}.{key}" if prefix else str(key))
            flat.update(sub)
        return flat, skeleton
    if isinstance(tree, (list, tuple)):
        flat, skeleton = {}, []
        for i, value in enumerate(tree):
            sub, part = split_tensors(value, f"{prefix}.{i}")
            flat.update(sub)
            skeleton.append(part)
        return flat, skeleton
    return {}, tree


def join_tensors(skeleton: Any, flat: Dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if set(skeleton) == {TENSOR_KEY}:
            return flat[skeleton[TENSOR_KEY]]
        return {k: join_tensors(v, flat) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tensors(v, flat) for v in skeleton]
    return skeleton


# -- DCP, read safely ---------------------------------------------------------------------------
def _allowed_global(module: str, name: str):
    """The record types a DCP `.metadata` pickle is made of, and nothing callable beyond them."""
    import pathlib

    import torch.distributed.checkpoint.filesystem as fs_mod
    import torch.distributed.checkpoint.metadata as md_mod

    if module == "torch.distributed.checkpoint.metadata" and isinstance(getattr(md_mod, name, None), type):
        return getattr(md_mod, name)
    if (module, name) == ("torch.distributed.checkpoint.filesystem", "_StorageInfo"):
        return fs_mod._StorageInfo
    if module == "torch" and name == "Size":
        return torch.Size
    if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
        return getattr(torch, name)
    if (module, name) == ("torch.serialization", "_get_layout"):  # a layout from its name
        from torch.serialization import _get_layout

        return _get_layout
    if module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
        return getattr(pathlib, name)
    if (module, name) == ("collections", "OrderedDict"):
        import collections

        return collections.OrderedDict
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        found = _allowed_global(module, name)
        if found is None:
            raise CheckpointError(f"{self.path} refers to {module}.{name}, which a DCP metadata file never "
                                  f"holds; refusing to load it (a tampered or foreign checkpoint)")
        return found


class SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        path = Path(self._get_metadata_path(rank))
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if rank is not None:  # DCP looks for a per-rank metadata file first, then the global one
                raise
            raise CheckpointError(f"{path} is missing: {path.parent} is not a complete checkpoint") from None
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data), path).load()
        except CheckpointError:
            raise
        except Exception as err:  # truncated or garbage
            raise CheckpointError(f"cannot read checkpoint file {path}: {err}") from None
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} is not a DCP metadata file")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorsOnlyPlanner(DefaultLoadPlanner):
    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def load_bytes(self, read_item, value) -> None:  # stock DCP: torch.load(weights_only=False)
        raise _pickled_bytes(self.path, read_item.dest_index.fqn)


def _pickled_bytes(state_dir: Path, key: str) -> CheckpointError:
    return CheckpointError(f"{state_dir} stores {key} as pickled bytes; our checkpoints hold tensors only, "
                           f"refusing to unpickle it")


def checkpoint_tensors(path: Path) -> Dict[str, Any]:
    """The tensors a checkpoint's DCP directory holds: {key: TensorStorageMetadata (size, dtype)}."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    state_dir = Path(path) / STATE_DIR
    stored = SafeReader(str(state_dir)).read_metadata().state_dict_metadata
    for key, md in stored.items():
        if not isinstance(md, TensorStorageMetadata):
            raise _pickled_bytes(state_dir, key)
    return dict(stored)


@contextlib.contextmanager
def _single_process_quietly():
    """DCP warns on every single-process save and load, which is how one process (and export) works."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_state(tree: Dict[str, Any], path: Path) -> Any:
    """Collective: the tensors of `tree` into path/state (DCP); returns the JSON rest."""
    flat, skeleton = split_tensors(tree)
    with naming_a_full_disk(path), _single_process_quietly():
        dcp.save(flat, checkpoint_id=str(Path(path) / STATE_DIR), no_dist=not dist.is_initialized())
    return skeleton


@contextlib.contextmanager
def naming_a_full_disk(path: Path):
    """A full disk anywhere in a checkpoint write surfaces as ENOSPC naming the checkpoint and the
    config key, not as DCP's or the C++ stream's own message (`basic_ios::clear: iostream error`)."""
    try:
        yield
    except (Exception, CheckpointException) as err:
        if _is_disk_full(err):
            raise OSError(errno.ENOSPC, f"no space left on the device while writing checkpoint {path} "
                                        f"(train.output_dir): free space or lower train.keep_checkpoints") from err
        raise


def _is_disk_full(err: Optional[BaseException]) -> bool:
    if err is None:
        return False
    if isinstance(err, CheckpointException):  # {rank: (exception, traceback)}
        return any(_is_disk_full(failure[0]) for failure in err.failures.values())
    return (getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err)
            or _is_disk_full(err.__cause__))


def load_state(path: Path, targets: Dict[str, Any], skeleton: Any) -> Dict[str, Any]:
    """Collective: `targets` (the live state: shapes and shardings to load into) filled from path/state,
    with the checkpoint's own non-tensor leaves (`skeleton`, from trainer.json)."""
    flat, _ = split_tensors(targets)
    saved = _placeholders(skeleton)
    missing, unexpected = sorted(set(flat) - set(saved)), sorted(set(saved) - set(flat))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit this model and optimizer: it lacks {missing[:5]} and holds "
                              f"{unexpected[:5]} (model.* or optim.name differ from the run that wrote it)")
    checkpoint_tensors(path)  # DCP would turn a refusal of its metadata into a bare AssertionError
    state_dir = Path(path) / STATE_DIR
    try:
        with _single_process_quietly():
            dcp.load(flat, storage_reader=SafeReader(str(state_dir)), planner=_TensorsOnlyPlanner(state_dir),
                     no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as err:  # the latter is a BaseException
        raise _cause(err) or CheckpointError(f"cannot read the tensors in {state_dir}: {err}") from err
    return join_tensors(skeleton, flat)


def _cause(err: BaseException) -> Optional[CheckpointError]:
    """Our own error, from inside DCP's per-rank exception wrapper (CheckpointException)."""
    if isinstance(err, CheckpointError):
        return err
    for inner in getattr(err, "failures", {}).values():  # {rank: (exception, traceback)}
        if (found := _cause(inner[0] if isinstance(inner, tuple) else inner)) is not None:
            return found
    return None


def _placeholders(skeleton: Any) -> set:
    if isinstance(skeleton, dict):
        if set(skeleton) == {TENSOR_KEY}:
            return {skeleton[TENSOR_KEY]}
        return set().union(*map(_placeholders, skeleton.values()))
    if isinstance(skeleton, list):
        return set().union(*map(_placeholders, skeleton))
    return set()


def write_rank_state(path: Path, rank: int, data: Dict[str, Any], rng: Dict[str, Optional[torch.Tensor]]) -> None:
    with naming_a_full_disk(path):
        _write_json(rank_file(path, rank), {
            "data": data,
            "rng": {k: None if v is None else base64.b64encode(v.numpy().tobytes()).decode() for k, v in rng.items()}})


def read_rank_state(path: Path, rank: int) -> Tuple[Dict[str, Any], Dict[str, Optional[torch.Tensor]]]:
    state = read_json(rank_file(path, rank))
    rng = {k: None if v is None else torch.frombuffer(bytearray(base64.b64decode(v)), dtype=torch.uint8)
           for k, v in state["rng"].items()}
    return state["data"], rng
