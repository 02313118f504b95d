"""Atomic WebDataset shard writer with DALI index files and a manifest.

Each shard is written to a hidden temporary name in the output directory and renamed into place only
when complete, so a reader never sees a half-written ``.tar``; its DALI index (``NAME.idx``) is
written the same way just after. :meth:`ShardWriter.close` writes ``manifest.json`` (shard -> sample
count, byte size, keys digest), merged with an existing manifest's entries for other shards.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from typing import Any, Mapping

import numpy as np

from miro_scale.atomic import write_text_atomic

from .format import FORMAT_VERSION, IMAGE_EXTS
from .tario import index_path_for, load_index, write_index_file

MANIFEST_NAME = "manifest.json"

# members are written in this order (then any others, sorted) so shards are byte-reproducible
_ORDER = {ext: i for i, ext in enumerate(IMAGE_EXTS + ("txt", "json"))}


def encode_member(value: Any, ext: str, where: str = "") -> bytes:
    """bytes as they are; str as UTF-8; dict/list as JSON (UTF-8); numpy arrays as .npy."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, allow_nan=False).encode("utf-8")
    raise TypeError(f"{where}: cannot encode member .{ext} of type {type(value).__name__}")


def check_key(key: str) -> None:
    """Keys are kept as users' tools wrote them (directories, spaces, non-ASCII), so only what
    cannot survive a tar round trip is refused: an empty key, a '.' in the basename (it would move
    the key/extension split), a leading or trailing '/', '..' or '\\', control characters."""
    base = key.rsplit("/", 1)[-1]
    if (not key or not base or "." in base or key.startswith("/") or ".." in key.split("/") or "\\" in key
            or any(ord(c) < 32 or ord(c) == 127 for c in key)):
        raise ValueError(f"sample key {key!r} cannot be a shard key (empty, a '.' in its basename, "
                         "a leading/trailing '/', '..', '\\' or control characters)")


def keys_digest(keys) -> str:
    return hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()


def read_manifest(directory: str) -> dict | None:
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_manifest(directory: str, entries: list, extra: Mapping | None = None, replace: bool = False) -> str:
    """Write ``manifest.json`` atomically; ``entries`` replace same-named shards already listed (or,
    with ``replace``, the whole list). The same shards give the same bytes."""
    old = {} if replace else (read_manifest(directory) or {})
    by_name = {e["name"]: e for e in old.get("shards", [])}
    for e in entries:
        by_name[e["name"]] = e
    shards = [by_name[n] for n in sorted(by_name)]
    manifest = {
        "format": FORMAT_VERSION,
        "num_samples": int(sum(e["num_samples"] for e in shards)),
        "num_shards": len(shards),
        "shards": shards,
    }
    if extra:
        manifest.update(extra)
    path = os.path.join(directory, MANIFEST_NAME)
    write_text_atomic(path, json.dumps(manifest, indent=1, sort_keys=True))
    return path


class TarSampleWriter:
    """Writes samples into one tar (GNU format, members in a fixed order, mtime 0: the same samples
    give the same bytes) and keeps each member's data offset for the DALI index."""

    def __init__(self, fileobj):
        # 1 MiB copies: tarfile's default 16 KiB makes ~60 writes per sample of latents + embeddings
        self._tf = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.GNU_FORMAT, copybufsize=1 << 20)
        self.keys: list = []
        self.members: list = []

    @property
    def offset(self) -> int:
        return self._tf.offset

    @staticmethod
    def encode(key: str, members: Mapping[str, Any]) -> list:
        """``[(ext, bytes)]`` in writing order; checks the key and extensions."""
        check_key(key)
        if not members:
            raise ValueError(f"sample {key}: no members")
        encoded = []
        for ext in sorted(members, key=lambda e: (_ORDER.get(e, len(_ORDER)), e)):
            if not ext or ext.startswith(".") or "/" in ext:
                raise ValueError(f"sample {key}: bad extension {ext!r}")
            encoded.append((ext, encode_member(members[ext], ext, where=key)))
        return encoded

    def write_encoded(self, key: str, encoded: list) -> None:
        mem = {}
        for ext, data in encoded:
            ti = tarfile.TarInfo(f"{key}.{ext}")
            ti.size = len(data)
            ti.mtime = 0
            ti.mode = 0o644
            ti.uname = ti.gname = ""
            self._tf.addfile(ti, io.BytesIO(data))
            data_offset = self._tf.offset - (len(data) + 511) // 512 * 512
            mem[ext] = (data_offset, len(data), ti.name)
        self.keys.append(key)
        self.members.append(mem)

    def write(self, key: str, members: Mapping[str, Any]) -> None:
        self.write_encoded(key, self.encode(key, members))

    def close(self) -> None:
        self._tf.close()


class ShardWriter:
    """Write samples into size-capped shards.

    Args:
        out_dir: output directory (created).
        pattern: shard file name pattern, formatted with the shard number (img2dataset's ``{:05d}.tar``).
        max_samples: at most this many samples per shard (None: no cap).
        max_bytes: roll over before a shard would pass this many bytes (None: no cap). A single sample
            larger than the cap gets a shard of its own.
        start_shard: number of the first shard.
        write_index: write DALI ``.idx`` files beside the shards.
        manifest_extra: extra top-level fields for manifest.json (e.g. reward keys, num_bins).

    Use as a context manager, or call :meth:`close`. ``write(key, {ext: value})`` takes bytes, str,
    dict (json) or numpy arrays (npy).
    """

    def __init__(self, out_dir: str, pattern: str = "{:05d}.tar", max_samples: int | None = 1000,
                 max_bytes: int | None = None, start_shard: int = 0, write_index: bool = True,
                 manifest_extra: Mapping | None = None):
        if max_samples is None and max_bytes is None:
            raise ValueError("set max_samples or max_bytes")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir
        self.pattern = pattern
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.write_index = write_index
        self.manifest_extra = dict(manifest_extra or {})
        self.shard_no = start_shard
        self.entries: list = []  # manifest entries of shards closed by this writer
        self.paths: list = []
        self._tf = None
        self._fobj = None
        self._tmp = None
        self._closed = False

    # -- shard lifecycle -------------------------------------------------------------------------
    def _open(self) -> None:
        name = self.pattern.format(self.shard_no)
        self._name = name
        self._final = os.path.join(self.out_dir, name)
        self._tmp = os.path.join(self.out_dir, f".{name}.tmp{os.getpid()}")
        self._fobj = open(self._tmp, "wb")
        self._tf = TarSampleWriter(self._fobj)

    def _finish(self) -> None:
        if self._tf is None:
            return
        self._tf.close()
        self._fobj.flush()
        os.fsync(self._fobj.fileno())
        self._fobj.close()
        size = os.path.getsize(self._tmp)
        os.replace(self._tmp, self._final)
        if self.write_index:
            write_index_file(self._final[:-4] + ".idx" if self._final.endswith(".tar")
                             else self._final + ".idx", self._tf.keys, self._tf.members)
        self.entries.append({"name": self._name, "num_samples": len(self._tf.keys), "num_bytes": size,
                             "keys_sha256": keys_digest(self._tf.keys)})
        self.paths.append(self._final)
        self._tf = self._fobj = self._tmp = None
        self.shard_no += 1

    # -- public ----------------------------------------------------------------------------------
    def write(self, key: str, members: Mapping[str, Any]) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        encoded = TarSampleWriter.encode(key, members)
        sample_bytes = sum(512 + (len(d) + 511) // 512 * 512 for _, d in encoded)
        if self._tf is not None and self._tf.keys and (
                (self.max_samples is not None and len(self._tf.keys) >= self.max_samples)
                or (self.max_bytes is not None and self._tf.offset + sample_bytes > self.max_bytes)):
            self._finish()
        if self._tf is None:
            self._open()
        self._tf.write_encoded(key, encoded)

    def close(self) -> list:
        """Finish the open shard and write the manifest; returns the manifest entries written."""
        if self._closed:
            return self.entries
        self._finish()
        self._closed = True
        if self.entries:
            write_manifest(self.out_dir, self.entries, self.manifest_extra)
        return self.entries

    def abort(self) -> None:
        """Drop the open shard's temporary file (shards already closed stay)."""
        if self._tf is not None:
            try:
                self._tf.close()
                self._fobj.close()
            finally:
                if self._tmp and os.path.exists(self._tmp):
                    os.remove(self._tmp)
            self._tf = None
        self._closed = True
        if self.entries:
            write_manifest(self.out_dir, self.entries, self.manifest_extra)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def index_shards(paths, progress: bool = True) -> list:
    """Write DALI .idx files and a manifest.json for existing shards (in each shard's directory)."""
    from tqdm import tqdm

    by_dir: dict = {}
    for p in tqdm(paths, desc="index", disable=not progress):
        idx = load_index(p, use_idx_file=False)
        keys = idx.keys
        write_index_file(index_path_for(p), keys, idx.members)
        by_dir.setdefault(os.path.dirname(os.path.abspath(p)), []).append(
            {"name": os.path.basename(p), "num_samples": len(idx), "num_bytes": os.path.getsize(p),
             "keys_sha256": keys_digest(keys), **({"truncated": True} if idx.truncated else {})})
    for d, entries in by_dir.items():
        write_manifest(d, entries)
    return [e for es in by_dir.values() for e in es]
