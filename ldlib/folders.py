"""Output folders: checked before a command writes into them, and replaced whole (never mixed) when rewritten.

``writable_folder(path)`` creates a folder a command writes into, or refuses with one line naming it (a file,
not writable). ``replaced_folder(out, marker)`` yields a fresh folder beside ``out`` to write into and, when the
block succeeds, puts it in ``out``'s place in one rename: ``out`` is either the old folder or the new one, never
a mix, and a failure leaves the old one untouched. It refuses an ``out`` that holds anything but a previous
output of the same command (recognised by ``marker``, a JSON file that command writes).
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import re
import secrets
import shutil
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class FolderBusyError(RuntimeError):
    """Another process is writing the folder right now; the message names it."""


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
    from .images import plain_file_mode

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
