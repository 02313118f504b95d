"""Tar shard indexing and random access: DALI ``.idx`` files, tar scanning, member reads.

A :class:`ShardIndex` lists a shard's samples in tar order, each as its key and a mapping
``ext -> (data offset, size, member name)``. It is read from the DALI index file beside the tar
(``NAME.idx`` for ``NAME.tar``) when there is one that fits the tar, otherwise built by scanning the
tar's headers (seeking over data, so it is quick). A truncated tar is indexed up to its last complete
member and flagged ``truncated``.

Member names are taken as users' tools write them (see :func:`normalize_member_name` and
:func:`canonical_ext`): ``./`` prefixes are dropped, directories stay part of the key, a key keeps
spaces and non-ASCII letters, and a name such as ``photo.v2.jpg`` (key ``photo`` by the webdataset
convention, extension ``v2.jpg``) is read as the sample's ``jpg``. Duplicate keys, whether their
members are consecutive or not, are never merged: the first sample keeps the key and every later one
is left out and listed in :attr:`ShardIndex.problems` (reason ``duplicate_key``), as are member
names that are not UTF-8 (``bad_member_name``).
"""
from __future__ import annotations

import logging
import os
import tarfile

import numpy as np
from typing import Iterator

from miro_scale.atomic import write_text_atomic

from .format import IMAGE_EXTS, INDEX_VERSION, JSON_EXT, TEXT_EXT, split_member_name

log = logging.getLogger("miro_scale.data")

Members = dict  # ext -> (offset, size, member name)

# Extensions recognised from the last suffix of a dotted extension ("v2.jpg" -> "jpg").
_ALIASED_EXTS = frozenset(IMAGE_EXTS + (TEXT_EXT, JSON_EXT))


def normalize_member_name(name: str) -> str | None:
    """A tar member name as a path relative to the archive root: ``./`` and ``/`` prefixes are
    dropped (``tar -C dir -cf x.tar .`` writes ``./KEY.jpg``). None for a name that cannot belong to
    a sample: not valid UTF-8 (tarfile hands those over with surrogate escapes) or with ``..``."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return None
    while name.startswith("./"):
        name = name[2:]
    name = name.lstrip("/")
    if ".." in name.split("/"):
        return None
    return name


def canonical_ext(ext: str) -> str:
    """``ext`` itself, or for a dotted extension that is not a known member type but ends in one
    (``v2.jpg``, left by a key with dots), that last suffix."""
    if ext in _ALIASED_EXTS or "." not in ext:
        return ext
    last = ext.rsplit(".", 1)[1]
    return last if last in _ALIASED_EXTS else ext


def _group_members(entries, problems: list):
    """Group ``(key, ext, value)`` entries of a tar (in tar order) into samples, in order of first
    appearance. A run of consecutive entries with one key is one sample (an extension repeated
    inside a run starts a new run). A later run of a key already seen joins that sample when it adds
    only new extensions (``tar -C dir -cf x.tar .`` stores files in directory order, so one sample's
    members need not be adjacent); when it repeats an extension it is a duplicate sample: left out
    whole and recorded in ``problems``, never merged. Returns (keys, members)."""
    runs: list = []
    for key, ext, value in entries:
        if runs and runs[-1][0] == key and ext not in runs[-1][1]:
            runs[-1][1][ext] = value
        else:
            runs.append((key, {ext: value}))
    keys: list = []
    members: list = []
    where: dict = {}
    for key, mem in runs:
        j = where.get(key)
        if j is None:
            where[key] = len(keys)
            keys.append(key)
            members.append(mem)
        elif members[j].keys().isdisjoint(mem):
            members[j].update(mem)
        else:
            problems.append(("duplicate_key", key))
    return keys, members


class ShardIndex:
    """A shard's samples in tar order, stored compactly: keys as a bytes array, and per member
    extension (``exts``) the data offset and size as int64 arrays ``[n, len(exts)]`` (size -1:
    member absent). ``keys``/``members`` give list views (slow; for tools and tests)."""

    def __init__(self, path: str, keys=(), members=(), truncated: bool = False,
                 cut_key: str | None = None, source: str = "scan", problems=()):
        self.path, self.truncated, self.cut_key, self.source = path, truncated, cut_key, source
        # (reason, name) of members/samples left out: duplicate_key, bad_member_name
        self.problems: list = list(problems)
        exts: list = []
        for mem in members:
            for e in mem:
                if e not in exts:
                    exts.append(e)
        self.exts = tuple(exts)
        col = {e: c for c, e in enumerate(self.exts)}
        n = len(keys)
        self.offsets = np.zeros((n, len(self.exts)), dtype=np.int64)
        self.sizes = np.full((n, len(self.exts)), -1, dtype=np.int64)
        for j, mem in enumerate(members):
            for e, v in mem.items():
                self.offsets[j, col[e]] = v[0]
                self.sizes[j, col[e]] = v[1]
        self.key_bytes = np.array([k.encode("utf-8") for k in keys], dtype=bytes) if n else \
            np.zeros(0, dtype="S1")

    @classmethod
    def from_arrays(cls, path: str, exts: tuple, key_bytes: np.ndarray, offsets: np.ndarray,
                    sizes: np.ndarray, source: str = "idx") -> "ShardIndex":
        idx = cls(path, source=source)
        idx.exts, idx.key_bytes = tuple(exts), key_bytes
        idx.offsets, idx.sizes = offsets.astype(np.int64), sizes.astype(np.int64)
        return idx

    def __len__(self) -> int:
        return int(self.key_bytes.shape[0])

    def key(self, j: int) -> str:
        return self.key_bytes[j].decode("utf-8")

    def member_dict(self, j: int) -> dict:
        """``{ext: (offset, size, member name)}`` of sample j."""
        k = self.key(j)
        return {e: (int(self.offsets[j, c]), int(self.sizes[j, c]), f"{k}.{e}")
                for c, e in enumerate(self.exts) if self.sizes[j, c] >= 0}

    def max_end(self) -> int:
        if self.sizes.size == 0:
            return 0
        return int(np.where(self.sizes >= 0, self.offsets + self.sizes, 0).max())

    @property
    def keys(self) -> list:
        return [self.key(j) for j in range(len(self))]

    @property
    def members(self) -> list:
        return [self.member_dict(j) for j in range(len(self))]


def index_path_for(tar_path: str) -> str:
    """``dir/NAME.tar`` -> ``dir/NAME.idx``."""
    base = tar_path[:-4] if tar_path.endswith(".tar") else tar_path
    return base + ".idx"


def format_index(keys: list, members: list) -> str | None:
    """DALI's webdataset index text (v1.2) for samples given in tar order; None when a member name
    has whitespace, which the index's space-separated lines cannot hold."""
    lines = [f"{INDEX_VERSION} {len(keys)}"]
    for key, mem in zip(keys, members):
        parts = []
        for ext, v in mem.items():
            off, size = v[0], v[1]
            name = f"{key}.{ext}"
            if any(c.isspace() for c in name):
                return None
            parts.append(f"{ext} {off} {size} {name}")
        lines.append(" ".join(parts))
    return "\n".join(lines) + "\n"


def write_index_file(path: str, keys: list, members: list) -> bool:
    """Write a DALI index atomically (temporary name, then rename). Index files are optional: when
    a key has whitespace none is written (and a stale one is removed), and readers scan the tar."""
    text = format_index(keys, members)
    if text is None:
        log.info("%s: not written (a key has whitespace); the tar is scanned instead", path)
        if os.path.exists(path):
            os.remove(path)
        return False
    write_text_atomic(path, text)
    return True


def read_index_file(idx_path: str, tar_path: str) -> ShardIndex:
    """Parse a DALI v1.2 index. Raises ValueError naming the file on a malformed line."""
    with open(idx_path) as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != INDEX_VERSION:
            raise ValueError(f"{idx_path}: unsupported index header {' '.join(header)!r}")
        expected = int(header[1])
        fast = _read_uniform_index(f.read(), expected, idx_path, tar_path)
        if fast is not None:
            return fast
        f.seek(0)
        f.readline()
        keys, members, problems, seen = [], [], [], set()
        for lineno, line in enumerate(f, start=2):
            tok = line.split()
            if not tok:
                continue
            if len(tok) % 4:
                raise ValueError(f"{idx_path}:{lineno}: expected groups of 'ext offset size name'")
            mem = {}
            for i in range(0, len(tok), 4):
                ext, off, size, name = tok[i], int(tok[i + 1]), int(tok[i + 2]), tok[i + 3]
                mem[canonical_ext(ext)] = (off, size, name)
            key = split_member_name(name)[0]
            keys.append(key)
            members.append(mem)
    if len(keys) != expected:
        raise ValueError(f"{idx_path}: header says {expected} samples, found {len(keys)}")
    unique = [j for j, k in enumerate(keys) if not (k in seen or seen.add(k))]
    for j in sorted(set(range(len(keys))) - set(unique)):
        problems.append(("duplicate_key", keys[j]))
    keys, members = [keys[j] for j in unique], [members[j] for j in unique]
    return ShardIndex(tar_path, keys, members, source="idx", problems=problems)


def _read_uniform_index(body: str, expected: int, idx_path: str, tar_path: str) -> ShardIndex | None:
    """Fast path for the common index where every sample has the same members in the same order
    and keys are unique (what ShardWriter and img2dataset produce): one split and numpy reshapes.
    None otherwise."""
    tok = body.split()
    if expected == 0 or not tok or len(tok) % (4 * expected):
        return None
    E = len(tok) // (4 * expected)
    arr = np.array(tok, dtype=object).reshape(expected, E, 4)
    exts = tuple(arr[0, :, 0])
    if len(set(exts)) != E or not (arr[:, :, 0] == np.array(exts, dtype=object)).all():
        return None
    try:
        offsets = arr[:, :, 1].astype(np.int64)
        sizes = arr[:, :, 2].astype(np.int64)
    except ValueError:
        raise ValueError(f"{idx_path}: non-integer offset or size") from None
    cut = len(exts[0]) + 1
    names = arr[:, 0, 3]
    keys = [n[:-cut] for n in names]
    for e_i, e in enumerate(exts[1:], start=1):  # all members of a line must share the key
        c = len(e) + 1
        if any(n[:-c] != k for n, k in zip(arr[:, e_i, 3], keys)):
            return None
    exts = tuple(canonical_ext(e) for e in exts)
    if len(set(keys)) != len(keys) or len(set(exts)) != E:
        return None
    key_bytes = np.array([k.encode("utf-8") for k in keys], dtype=bytes)
    return ShardIndex.from_arrays(tar_path, exts, key_bytes, offsets, sizes, source="idx")


def scan_tar(tar_path: str) -> ShardIndex:
    """Index a tar by reading its headers (GNU and pax long names included). Keys group
    *consecutive* members, as DALI's ``wds2idx`` does; hidden files (basename starting with '.'),
    directories and other non-regular entries are ignored."""
    entries: list = []
    problems: list = []
    truncated, cut_key = False, None
    file_size = os.path.getsize(tar_path)
    try:
        with tarfile.open(tar_path, "r:", encoding="utf-8", errors="surrogateescape") as tf:
            while True:
                try:
                    ti = tf.next()
                except (tarfile.ReadError, EOFError, OSError) as e:
                    truncated = True
                    log.warning("%s: tar is damaged or truncated after key %s (%s); indexed the samples "
                                "before it", tar_path, entries[-1][0] if entries else None, e)
                    break
                if ti is None:
                    if entries and file_size - tf.offset < 512:
                        # no end-of-archive block: cut at a member boundary, so the last sample may
                        # be missing members
                        truncated, cut_key = True, entries[-1][0]
                        entries = [e for e in entries if e[0] != cut_key]
                        log.warning("%s: tar ends without its end-of-archive block (truncated after %s); "
                                    "indexed the samples before it", tar_path, cut_key)
                    break
                if not ti.isreg():
                    continue
                name = normalize_member_name(ti.name)
                if name is None:
                    problems.append(("bad_member_name", repr(ti.name)))
                    continue
                key, ext = split_member_name(name)
                if ti.offset_data + ti.size > file_size:
                    truncated = True
                    entries = [e for e in entries if e[0] != key]  # the sample's other members too
                    cut_key = key
                    log.warning("%s: tar is truncated inside member %s; indexed the samples before it",
                                tar_path, ti.name)
                    break
                if not key or key.endswith("/"):
                    continue  # a hidden file (".name")
                entries.append((key, canonical_ext(ext), (ti.offset_data, ti.size)))
    except tarfile.ReadError as e:  # not a tar at all (or empty file)
        truncated = True
        log.warning("%s: cannot be read as a tar (%s); no samples", tar_path, e)
    keys, members = _group_members(entries, problems)
    return ShardIndex(tar_path, keys, members, truncated=truncated, cut_key=cut_key, source="scan",
                      problems=problems)


def load_index(tar_path: str, use_idx_file: bool = True) -> ShardIndex:
    """The shard's index: from ``NAME.idx`` when present and consistent with the tar, else a scan."""
    idx_path = index_path_for(tar_path)
    if use_idx_file and os.path.exists(idx_path):
        try:
            idx = read_index_file(idx_path, tar_path)
            size = os.path.getsize(tar_path)
            if idx.max_end() <= size:
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
        for j in range(len(idx)):
            key, mem = idx.key(j), idx.member_dict(j)
            data = {}
            for ext, (off, size, _) in mem.items():
                f.seek(off)
                data[ext] = f.read(size)
            yield key, data
