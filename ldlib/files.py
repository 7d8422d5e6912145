"""Files on disk: atomic writes, ``--shard i/N`` selection, and named tensors spread over safetensors shards.

Every writer in ldlib goes through ``atomic_write_bytes`` (a temporary file in the same folder, then a rename), so a
killed job never leaves a half-written file under a final name. Batch jobs that split work across machines select
their keys with ``in_shard`` and name their files with ``shard_tag``, so shards never collide.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to path through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------------------
# shards of a batch job: which keys a machine owns, and what its files are called
# ------------------------------------------------------------------------------------------------------------


def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int]:
    """'i/N' (0 <= i < N) -> (i, N); None -> (0, 1)."""
    if text is None:
        return (0, 1)
    if isinstance(text, tuple):
        i, n = text
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not m:
            raise ValueError(f"--shard must look like i/N (e.g. 0/4), got {text!r}")
        i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need 0 <= i < N")
    return (i, n)


def in_shard(key: str, shard: tuple[int, int]) -> bool:
    """Whether a key (a source path or a pair id) belongs to shard (i, N); stable across machines."""
    i, n = shard
    return n == 1 or int(hashlib.sha256(key.encode()).hexdigest()[:15], 16) % n == i


def shard_tag(shard: tuple[int, int]) -> str:
    """The tag in a shard's file names: 'all' when unsharded, else 'i-of-N'."""
    return "all" if shard[1] == 1 else f"{shard[0]}-of-{shard[1]}"


# ------------------------------------------------------------------------------------------------------------
# named tensors over safetensors files (latent caches, teacher data)
# ------------------------------------------------------------------------------------------------------------


def shard_files(folder: str | os.PathLike, pattern: str = "*.safetensors") -> list[Path]:
    """The safetensors files of a folder matching pattern, sorted (hidden temporaries excluded)."""
    return sorted(p for p in Path(folder).glob(pattern) if not p.name.startswith("."))


def write_tensor_shard(folder: str | os.PathLike, prefix: str, shard: tuple[int, int], tensors: dict[str, torch.Tensor],
                       metadata: dict[str, str]) -> Path:
    """Write one chunk of named tensors atomically as ``<prefix>-<shard tag>-<hash of the names>.safetensors``.

    The name depends only on which tensors the file holds, so a rerun that computes the same chunk replaces the
    file instead of adding a second copy.
    """
    from safetensors.torch import save

    name = hashlib.sha256("\0".join(sorted(tensors)).encode()).hexdigest()[:16]
    path = Path(folder) / f"{prefix}-{shard_tag(shard)}-{name}.safetensors"
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
    return path


class ShardedTensors:
    """Named tensors spread over safetensors files, read lazily; file handles are opened per process.

    ``scan(files, check)`` reads the headers (the first file holding a name wins; ``check(file, metadata)`` may
    refuse a file by raising); ``get(name)`` reads one tensor. Picklable, so it can go into DataLoader workers.
    """

    def __init__(self) -> None:
        self._index: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}

    def scan(self, files: Sequence[Path], check: Callable[[Path, dict], None] | None = None) -> list[dict]:
        """Index the tensors of files; returns each file's metadata, in file order."""
        from safetensors import safe_open

        index: dict[str, Path] = {}
        metas = []
        for path in files:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if check is not None:
                    check(path, meta)
                for key in f.keys():
                    index.setdefault(key, path)
            metas.append(meta)
        self._index, self._handles = index, {}
        return metas

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self._index)

    @property
    def names(self) -> set[str]:
        """Names of all indexed tensors."""
        return set(self._index)

    def get(self, name: str) -> torch.Tensor:
        """One tensor by name (KeyError when no file holds it)."""
        path = self._index[name]
        handle = self._handles.get(path)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[path] = safe_open(path, framework="pt")
        return handle.get_tensor(name)

    def __getstate__(self) -> dict:
        return {"_index": self._index, "_handles": {}}  # file handles do not cross process boundaries
