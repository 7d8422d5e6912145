"""Files on disk: atomic writes, ``--shard i/N`` selection, named tensors over safetensors shards, output folders.

Every writer in ldlib goes through ``atomic_write_bytes`` / ``atomic_write_file`` (a temporary file in the same
folder, then a rename, with the mode a plain ``open()`` would give), so a killed job never leaves a half-written
file under a final name. Batch jobs that split work across machines select their keys with ``in_shard`` and name
their files with ``shard_tag``, so shards never collide. ``writable_folder(path)`` creates a folder a command
writes into, or refuses with one line naming it; ``replaced_folder(out, marker)`` yields a staging folder that
replaces ``out`` whole when the block succeeds (an export is never mixed with what was there).
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch


class WriteError(OSError):
    """A write that failed (disk full, no permission); str() is one line naming the path and what was kept."""

    def __init__(self, err: int | None, message: str) -> None:
        super().__init__(err, message)  # (errno, message): pickles across worker processes as it is

    def __str__(self) -> str:
        return str(self.strerror)


def write_reason(e: BaseException) -> str:
    """Why a write failed, in a few words: the OS's text (``No space left on device``), not a library's wrapper."""
    if isinstance(e, WriteError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EIO):
        if os.strerror(code) in text:  # safetensors' SafetensorError wraps the OS error in its own text
            return os.strerror(code)
    return text.splitlines()[0] if text else type(e).__name__


def is_write_failure(e: BaseException) -> bool:
    """Whether e is how a write fails: an OSError, or safetensors' error for one (it raises its own type)."""
    return isinstance(e, OSError) or type(e).__name__ == "SafetensorError"


def failed_write(path: str | os.PathLike, e: BaseException, kept: str) -> WriteError:
    """The WriteError for a failed write of path: ``<path>: not written (<reason>); <kept>``."""
    if isinstance(e, WriteError):
        return e  # already names the file and what was kept
    return WriteError(getattr(e, "errno", None) or errno.EIO, f"{path}: not written ({write_reason(e)}); {kept}")


def _kept(path: Path) -> str:
    return "the previous file is unchanged" if path.exists() else "no partial file left"


def _new_temp(path: Path) -> tuple[int, Path]:
    """Create a hidden temporary file beside path as open() would (mode 0o666 less the umask); (fd, its path).

    Not tempfile.mkstemp: its 0600 would make every file we write unreadable to the group (shared pair sets).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # a name another writer drew; draw again
            continue


def plain_file_mode(folder: str | os.PathLike) -> int:
    """The permission bits a new file created with open() in folder gets (0o666 less the umask, or the ACL)."""
    fd, tmp = _new_temp(Path(folder) / "mode")
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to path through a temporary file in the same folder and a rename (mode as open() gives)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_write_failure(e):  # disk full: one line naming the file, not the bare errno
            raise failed_write(path, e, _kept(path)) from e
        raise


def atomic_write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Write path with write(temporary path) and a rename; for writers that make their own file (safetensors).

    The file gets the mode a plain open() gives: safetensors' save_file writes 0600 whatever the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp(path)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_write_failure(e):
            raise failed_write(path, e, _kept(path)) from e
        raise


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a matplotlib figure as PNG atomically; returns the path."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


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


# ------------------------------------------------------------------------------------------------------------
# output folders: writable, and replaced whole (exports)
# ------------------------------------------------------------------------------------------------------------


class FolderBusyError(RuntimeError):
    """Another process is writing the folder right now; the message names it."""


def lock_exclusive(f, busy: Callable[[], str]) -> None:
    """Take an advisory exclusive lock (fcntl.flock) on the open file f, or raise FolderBusyError(busy()).

    The kernel releases it when the file is closed or the process dies (kill -9 included): no stale lock to clean
    up. Not POSIX (no fcntl): no lock.
    """
    try:
        import fcntl
    except ImportError:
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        raise FolderBusyError(busy()) from e


LOCK_FILE = ".ldlib.lock"


def lock_folder(folder: str | os.PathLike, what: str):
    """Lock folder for this process (``lock_exclusive`` on folder/.ldlib.lock, which names the holder); the open file.

    Close it to release. The loser gets FolderBusyError: one line naming the folder and the holder (host, pid, since).
    """
    import time

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    f = open(path, "a+")

    def busy() -> str:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        return f"{folder}: {holder} is writing this {what} right now; wait for it to finish, or choose another folder"

    lock_exclusive(f, busy)
    # The holder's identity, for the loser's message (only the lock holder writes it).
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})")
    f.flush()
    return f


def _not_writable(path: Path) -> bool:
    return not os.access(path, os.W_OK | os.X_OK)


def writable_folder(path: str | os.PathLike) -> Path:
    """path as a folder this process can write into, created with its parents when missing; else ValueError."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        reason = f"{parent} is not writable" if isinstance(e, PermissionError) else (e.strerror or str(e))
        raise ValueError(f"{path}: cannot create the folder: {reason}") from e
    if _not_writable(path):
        raise ValueError(f"{path}: folder is not writable")
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # libc without renameat2 (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # kernel or filesystem without the exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _staging_prefix(out: Path) -> str:
    # Host and pid in the name: a later run can tell a dead run's leftover from a live one on a shared filesystem.
    return f".{out.name}.ldlib-{re.sub(r'[^A-Za-z0-9_]', '_', socket.gethostname())}-"


def _remove_dead_stagings(out: Path) -> None:
    """Delete staging folders that a killed run of this host left beside out."""
    prefix = _staging_prefix(out)
    for p in out.parent.glob(f"{glob.escape(prefix)}*"):
        m = re.fullmatch(r"(\d+)-[0-9a-f]+(\.old)?", p.name[len(prefix):])
        if not m or not p.is_dir():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _check_target(out: Path, marker: str) -> None:
    """Refuse an out that is a file, unwritable, or holds anything but a previous output with marker."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file, not a folder")
    if out.is_dir():
        if _not_writable(out):
            raise ValueError(f"{out}: folder is not writable")
        if any(out.iterdir()):
            try:
                ok = isinstance(json.loads((out / marker).read_text()), dict)
            except (OSError, ValueError):
                ok = False
            if not ok:
                raise ValueError(
                    f"{out}: folder is not empty and is not a previous output of this command (no {marker}); "
                    "refusing to mix files: choose a new or empty folder"
                )
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{parent}: is a file, not a folder")
    if _not_writable(parent):
        raise ValueError(f"{parent}: folder is not writable (the output is written beside {out.name} and renamed)")


@contextmanager
def replaced_folder(out: str | os.PathLike, marker: str) -> Iterator[Path]:
    """A new empty folder beside out to write into; on success it replaces out in one rename (see module doc).

    Files in it get the mode a plain open() gives (libraries such as safetensors write 0600 temporaries).
    """

    out = Path(out)
    if out.is_symlink():  # replace the folder it points to, not the link
        out = out.resolve()
    _check_target(out, marker)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_stagings(out)
    staging = out.parent / f"{_staging_prefix(out)}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()  # not mkdtemp: its 0700 would become out's mode
    try:
        yield staging
        mode = plain_file_mode(staging)
        for p in staging.rglob("*"):
            if p.is_file() and not p.is_symlink():
                p.chmod(mode)
        if not (out.is_dir() and any(out.iterdir())):
            os.replace(staging, out)  # rename() replaces a missing or empty folder atomically
        else:
            _check_target(out, marker)  # still a previous output (not filled by someone else meanwhile)
            if not _exchange(staging, out):  # no atomic swap here: two renames, out is missing for a moment
                old = staging.with_name(staging.name + ".old")
                os.rename(out, old)
                os.rename(staging, out)
                staging = old
    finally:  # the old output after a swap, or the half-written new one after an error
        shutil.rmtree(staging, ignore_errors=True)
