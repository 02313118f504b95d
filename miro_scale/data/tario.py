"""Tar shard indexing and random access: DALI ``.idx`` files, tar scanning, member reads.

A :class:`ShardIndex` lists a shard's samples in tar order, each as its key and a mapping
``ext -> (data offset, size, member name)``. It is read from the DALI index file beside the tar
(``NAME.idx`` for ``NAME.tar``) when there is one that fits the tar, otherwise built by scanning the
tar's headers (seeking over data, so it is quick). A truncated tar is indexed up to its last complete
member and flagged ``truncated``.
"""
from __future__ import annotations

import logging
import os
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

from .format import INDEX_VERSION, split_member_name

log = logging.getLogger("miro_scale.data")

Members = dict  # ext -> (offset, size, member name)


@dataclass
class ShardIndex:
    path: str
    keys: list = field(default_factory=list)
    members: list = field(default_factory=list)  # list[Members], parallel to keys
    truncated: bool = False
    cut_key: str | None = None  # the sample a truncation cut (left out of the index)
    source: str = "scan"  # "idx" or "scan"

    def __len__(self) -> int:
        return len(self.keys)


def index_path_for(tar_path: str) -> str:
    """``dir/NAME.tar`` -> ``dir/NAME.idx``."""
    base = tar_path[:-4] if tar_path.endswith(".tar") else tar_path
    return base + ".idx"


def format_index(keys: list, members: list) -> str:
    """DALI's webdataset index text (v1.2) for samples given in tar order."""
    lines = [f"{INDEX_VERSION} {len(keys)}"]
    for key, mem in zip(keys, members):
        parts = []
        for ext, (off, size, name) in mem.items():
            if any(c.isspace() for c in name):
                raise ValueError(f"member name {name!r} has whitespace; DALI's index cannot hold it")
            parts.append(f"{ext} {off} {size} {name}")
        lines.append(" ".join(parts))
    return "\n".join(lines) + "\n"


def write_index_file(path: str, keys: list, members: list) -> None:
    """Write a DALI index atomically (temporary name, then rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(format_index(keys, members))
    os.replace(tmp, path)


def read_index_file(idx_path: str, tar_path: str) -> ShardIndex:
    """Parse a DALI v1.2 index. Raises ValueError naming the file on a malformed line."""
    with open(idx_path) as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != INDEX_VERSION:
            raise ValueError(f"{idx_path}: unsupported index header {' '.join(header)!r}")
        expected = int(header[1])
        idx = ShardIndex(path=tar_path, source="idx")
        for lineno, line in enumerate(f, start=2):
            tok = line.split()
            if not tok:
                continue
            if len(tok) % 4:
                raise ValueError(f"{idx_path}:{lineno}: expected groups of 'ext offset size name'")
            mem = {}
            key = None
            for i in range(0, len(tok), 4):
                ext, off, size, name = tok[i], int(tok[i + 1]), int(tok[i + 2]), tok[i + 3]
                mem[ext] = (off, size, name)
                key = split_member_name(name)[0]
            idx.keys.append(key)
            idx.members.append(mem)
    if len(idx.keys) != expected:
        raise ValueError(f"{idx_path}: header says {expected} samples, found {len(idx.keys)}")
    return idx


def scan_tar(tar_path: str) -> ShardIndex:
    """Index a tar by reading its headers. Keys group *consecutive* members, as DALI's ``wds2idx``
    does; hidden files (basename starting with '.') and non-regular entries are ignored."""
    idx = ShardIndex(path=tar_path, source="scan")
    file_size = os.path.getsize(tar_path)
    last_key = None
    try:
        with tarfile.open(tar_path, "r:") as tf:
            while True:
                try:
                    ti = tf.next()
                except (tarfile.ReadError, EOFError, OSError) as e:
                    idx.truncated = True
                    log.warning("%s: tar is damaged or truncated after key %s (%s); indexed %d samples",
                                tar_path, last_key, e, len(idx.keys))
                    break
                if ti is None:
                    break
                if not ti.isreg():
                    continue
                key, ext = split_member_name(ti.name)
                if ti.offset_data + ti.size > file_size:
                    idx.truncated = True
                    if idx.keys and idx.keys[-1] == key:  # drop the sample's earlier members too
                        idx.keys.pop()
                        idx.members.pop()
                    idx.cut_key = key
                    log.warning("%s: tar is truncated inside member %s; indexed %d samples",
                                tar_path, ti.name, len(idx.keys))
                    break
                if not key or key.endswith("/"):
                    continue
                if key != last_key:
                    idx.keys.append(key)
                    idx.members.append({})
                    last_key = key
                idx.members[-1][ext] = (ti.offset_data, ti.size, ti.name)
    except tarfile.ReadError as e:  # not a tar at all (or empty file)
        idx.truncated = True
        log.warning("%s: cannot be read as a tar (%s); no samples", tar_path, e)
    return idx


def load_index(tar_path: str, use_idx_file: bool = True) -> ShardIndex:
    """The shard's index: from ``NAME.idx`` when present and consistent with the tar, else a scan."""
    idx_path = index_path_for(tar_path)
    if use_idx_file and os.path.exists(idx_path):
        try:
            idx = read_index_file(idx_path, tar_path)
            size = os.path.getsize(tar_path)
            if all(off + sz <= size for mem in idx.members for off, sz, _ in mem.values()):
                return idx
            log.warning("%s: index %s points past the end of the tar (stale or truncated tar); "
                        "rescanning", tar_path, idx_path)
        except (ValueError, OSError) as e:
            log.warning("%s: ignoring index file (%s); rescanning", tar_path, e)
    return scan_tar(tar_path)


class MemberReader:
    """Reads members by (offset, size) with a few open file handles kept (one reader per worker)."""

    def __init__(self, max_open: int = 16):
        self.max_open = max_open
        self._files: dict = {}

    def read(self, path: str, offset: int, size: int) -> bytes:
        f = self._files.pop(path, None)
        if f is None:
            if len(self._files) >= self.max_open:
                _, old = self._files.popitem()  # dict order: drop the oldest
                old.close()
            f = open(path, "rb")
        self._files[path] = f  # most recent last
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise EOFError(f"{path}: short read at offset {offset} ({len(data)} of {size} bytes)")
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def iter_samples(tar_path: str) -> Iterator[tuple[str, dict]]:
    """Stream a tar's samples in order as ``(key, {ext: bytes})``, stopping with a warning at a
    truncation (the last, incomplete sample is still yielded; callers check its members)."""
    idx = load_index(tar_path)
    with open(tar_path, "rb") as f:
        for key, mem in zip(idx.keys, idx.members):
            data = {}
            for ext, (off, size, _) in mem.items():
                f.seek(off)
                data[ext] = f.read(size)
            yield key, data
