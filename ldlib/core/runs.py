"""Run infrastructure shared by every training loop (decoder, proxy, teacher): what a run folder is and how it resumes.

- ``make_accelerator``: CPU, one GPU with bf16 autocast, or DDP / multi-node under ``accelerate launch`` with no
  code change (accelerate reads the launcher's environment).
- ``GlobalBatchSampler``: the global batch of step k is a fixed function of (seed, k); rank r takes its slice. So
  resuming needs no sampler state, and N processes at batch B see exactly what one process sees at batch N*B.
- ``sample_generator``: per-sample randomness (sigma, degradation noise) seeded by (seed, step, global index), for
  the same reason.
- ``CheckpointManager``: checkpoints written into a temporary folder and renamed into place (atomic), a
  ``latest.json`` pointer, per-rank RNG states, old checkpoints pruned.
- ``all_finite``: a NaN/inf loss on any rank makes every rank skip the step (a one-sided skip would hang DDP).
- ``reused_cpu_memory``: freed CPU memory stays in the process for the loop's next step (far fewer page faults).
- ``RunLogger``: tqdm bar, TensorBoard scalars/images and ``history.jsonl`` on the main process only;
  ``read_history`` / ``plot_history`` read them back.

This module knows no training configuration: loops pass their settings in explicitly.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .files import WriteError, atomic_write_bytes, atomic_write_file, is_write_failure, lock_folder, write_reason


def default_device() -> torch.device:
    """The accelerator when one is present (CUDA), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def loader_workers(requested: int | None, device: torch.device, processes: int = 1) -> int:
    """DataLoader workers: ``requested``, or by default 0 on CPU and min(8, CPUs per process - 1), at least 1, on CUDA.

    ``processes``: the run's process count; the processes on this machine come from ``LOCAL_WORLD_SIZE`` when the
    launcher sets it (torchrun, accelerate launch).
    """
    if requested is not None:
        return requested
    if device.type == "cpu":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or processes
    return max(1, min(8, cpus // max(1, local) - 1))


# glibc's mallopt parameters (malloc.h), and the settings its dynamic defaults reach once large blocks were freed
# (mmap threshold: the largest freed mapped block, at most 32 MB; trim threshold: twice that; mappings: 65536).
# Setting any of them ends the dynamic adjustment, so leaving the block restores that end state.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_MALLOC_AFTER = {_M_MMAP_THRESHOLD: 32 * 2**20, _M_TRIM_THRESHOLD: 64 * 2**20, _M_MMAP_MAX: 65536}
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_")


def _glibc():
    """glibc when it is the allocator in use and the user set none of its malloc settings, else None."""
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if any(k in os.environ for k in _MALLOC_ENV) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return None  # the user's own allocator settings win
    try:
        libc = ctypes.CDLL("libc.so.6")
        in_use = ctypes.CDLL(None).malloc  # what the process calls: differs under an LD_PRELOADed jemalloc / tcmalloc
    except (OSError, AttributeError):
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    address = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731
    return libc if address(in_use) == address(libc.malloc) else None


@contextlib.contextmanager
def reused_cpu_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, CPU memory the process frees is kept for its next allocations (glibc); yields whether it is."""
    # Why: a 512 px decoder step allocates and frees 1-3 GB of activations in blocks of up to 70 MB. glibc serves a
    # block above its mmap threshold (32 MB at most) with a fresh mapping and unmaps it when freed, so the kernel
    # faults in and zeroes every page again on the next step: 340k page faults and a fifth to a quarter of a taef2
    # step on 2 cores (python -m ldlib bench train). With mapping and trimming off, freed blocks are reused; the
    # arithmetic is untouched (bit-identical results). On the main thread (where the loops run) that holds for any
    # size; a thread's own arena still maps blocks over 64 MB. On leaving, glibc gets _MALLOC_AFTER and malloc_trim
    # returns the kept memory. Not re-entrant: an inner block's exit ends an outer one's reuse (only slower).
    libc = _glibc() if enabled else None
    if libc is None or libc.mallopt(_M_MMAP_MAX, 0) != 1:
        yield False
        return
    libc.mallopt(_M_TRIM_THRESHOLD, -1)  # -1: never trim (any positive value still trims past it)
    try:
        yield True
    finally:
        for param, value in _MALLOC_AFTER.items():
            libc.mallopt(param, value)
        libc.malloc_trim(0)


def make_accelerator(mixed_precision: str = "auto", grad_accum: int = 1):
    """An Accelerator for this process: bf16 autocast on CUDA by default, fp32 on CPU; DDP when launched so."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed_precision:
        # accelerate keeps one precision per process and refuses another; a notebook that trains twice with
        # different settings needs a fresh state (the process group, PartialState, is kept).
        AcceleratorState._reset_state(reset_partial_state=False)
    # The scheduler is stepped by hand once per optimiser step (accelerate would step it once per process).
    acc = Accelerator(
        # accelerate only sets up CPU DDP (gloo) under torchrun when told it is on CPU.
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        step_scheduler_with_optimizer=False,
        # Wan's decoder has parameters that a single frame never uses (temporal upsampling convs): DDP must be
        # told, or it waits for their gradients forever.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=True, find_unused_parameters=True)],
    )
    return acc


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and runs)."""
    h = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def sample_generator(seed: int, step: int, index: int, stream: int = 0) -> torch.Generator:
    """The CPU generator of one sample's randomness at one step (same on every rank and in every run)."""
    return torch.Generator().manual_seed(mix_seed(seed, step, index, stream))


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Batches of indices for steps start..steps-1: step k's global batch is a pure function of (seed, k).

    The index stream is a concatenation of seeded permutations of range(n); the global batch of micro-step k is
    ``stream[k*G:(k+1)*G]`` with G = batch * world, and rank r takes ``[r*batch:(r+1)*batch]`` of it.
    """

    def __init__(self, n: int, batch: int, world: int, rank: int, seed: int, start: int, stop: int) -> None:
        if n < 1:
            raise ValueError("GlobalBatchSampler: the dataset is empty")
        self.n, self.batch, self.world, self.rank, self.seed = n, batch, world, rank, seed
        self.start, self.stop = start, stop
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch, 7)))}
        return self._perms[epoch]

    def global_batch(self, k: int) -> list[int]:
        """Dataset indices of micro-step k's global batch (all ranks)."""
        g = self.batch * self.world
        return [int(self._perm(j // self.n)[j % self.n]) for j in range(k * g, (k + 1) * g)]

    def __iter__(self) -> Iterator[list[int]]:
        for k in range(self.start, self.stop):
            yield self.global_batch(k)[self.rank * self.batch : (self.rank + 1) * self.batch]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def all_finite(accelerator, value: torch.Tensor) -> bool:
    """Whether value is finite on every process (so that all ranks skip a bad step together)."""
    bad = (~torch.isfinite(value.detach().float())).any().float().reshape(1).to(accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bool(bad.item() == 0)


def rng_states() -> dict[str, torch.Tensor]:
    """This process's global torch RNG states (CPU and CUDA)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def set_rng_states(states: dict[str, torch.Tensor]) -> None:
    """Restore states from rng_states()."""
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(k for k in states if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_file(path, lambda tmp: save_file(sd, str(tmp)))  # the umask's mode, not save_file's 0600


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file missing")
    return load_file(str(path))


class CheckpointManager:
    """Atomic checkpoints under ``folder``: ``step_NNNNNN/`` folders plus a ``latest.json`` pointer.

    A checkpoint is written into a hidden temporary folder (main process: tensors as safetensors, optimiser and
    scheduler states with torch.save; every rank: its RNG states), then renamed into place and only then named in
    latest.json, so a crash mid-write never leaves a checkpoint that looks complete.
    """

    def __init__(self, folder: str | os.PathLike, accelerator=None, keep: int = 2) -> None:
        self.folder = Path(folder)
        self.acc = accelerator
        self.keep = keep

    @property
    def _main(self) -> bool:
        return self.acc is None or self.acc.is_main_process

    def _barrier(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()

    def _everywhere(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every process (a collective under DDP: every rank must call it)."""
        if self.acc is None or self.acc.num_processes == 1:
            return ok
        flags = self.acc.reduce(torch.tensor([int(ok)], device=self.acc.device), reduction="sum")
        return int(flags.item()) == self.acc.num_processes

    def latest(self) -> Path | None:
        """The checkpoint folder latest.json names, or None when there is none yet."""
        pointer = self.folder / "latest.json"
        if not pointer.is_file():
            return None
        try:
            name = json.loads(pointer.read_text())["checkpoint"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{pointer}: unreadable checkpoint pointer ({e})") from e
        path = self.folder / name
        if not (path / "state.json").is_file():
            raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint")
        return path

    def candidates(self) -> list[Path]:
        """Complete-looking checkpoint folders, newest first: the one latest.json names, then older ones by step."""
        found = sorted((p for p in self.folder.glob("step_*") if (p / "state.json").is_file()), reverse=True)
        try:
            named = self.latest()
        except (ValueError, FileNotFoundError):
            named = None  # a broken pointer: fall back on the folders themselves
        if named is not None:
            found = [named] + [p for p in found if p != named and p.name < named.name]
        return found

    def load_intact(self, tensor_names: Sequence[str], restore_rng: bool = True, with_objects: bool = True,
                    warn=print) -> tuple[Path, dict, dict, dict] | None:
        """(path, tensors, objects, state) of the newest checkpoint that reads back whole, or None when none exists.

        A checkpoint with an unreadable file (truncated, corrupt) is skipped for the previous intact one, with one
        line saying which file and why, and renamed ``unreadable_step_N`` so that pruning never keeps it over an
        intact one. Raises when checkpoints exist but none reads back.
        """
        problems = []
        for path in self.candidates():
            found, rng, error, unexpected = None, None, None, None
            try:
                found = (path, *self.load(path, tensor_names, with_objects=with_objects))
                rng = self._read_rng(path) if restore_rng else None
            except CheckpointError as e:
                error = e
            except Exception as e:  # noqa: BLE001 - re-raised below, once every rank has answered
                error = unexpected = e
            # Under DDP every rank must resume from the same checkpoint: one rank's unreadable file (its own
            # rng_<rank>.pt) sends all of them to the previous one. Every rank answers before any acts.
            agreed = self._everywhere(error is None)
            if unexpected is not None:
                raise unexpected
            if agreed:
                if rng is not None:
                    set_rng_states(rng)
                return found
            if error is not None and not self._main:
                print(f"warning (process {self.acc.process_index}): {error}", flush=True)
            why = str(error) if error is not None else f"{path}: a file of another process does not read back"
            problems.append(why)
            warn(f"warning: {why}; trying the previous checkpoint")
            if self._main and restore_rng:
                os.replace(path, path.with_name(f"unreadable_{path.name}"))
        if problems:
            raise CheckpointError(f"{self.folder}: no checkpoint reads back whole ({'; '.join(problems)})")
        return None

    def save(
        self,
        step: int,
        tensors: dict[str, dict[str, torch.Tensor]],
        objects: dict[str, Any],
        state: dict,
    ) -> Path:
        """Write tensors (name -> state dict, as safetensors), objects (torch.save), state (JSON), per-rank RNG."""
        final = self.folder / f"step_{step:06d}"
        tmp = self.folder / f".tmp_step_{step:06d}"
        try:
            if self._main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self._barrier()
            rank = 0 if self.acc is None else self.acc.process_index
            torch.save(rng_states(), tmp / f"rng_{rank}.pt")
            if self._main:
                for name, sd in tensors.items():
                    save_safetensors(sd, tmp / f"{name}.safetensors")
                torch.save(objects, tmp / "optim.pt")
                (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        except Exception as e:
            if not is_write_failure(e):
                raise
            # Disk full mid-checkpoint: the half-written folder goes now (MBs), the earlier checkpoints stay.
            shutil.rmtree(tmp, ignore_errors=True)
            latest = None
            with contextlib.suppress(ValueError, FileNotFoundError):
                latest = self.latest()
            kept = f"kept: the previous checkpoint {latest}" if latest else "no earlier checkpoint exists"
            raise WriteError(getattr(e, "errno", None) or 5,
                             f"{final}: checkpoint of step {step} not written ({write_reason(e)}); {kept}") from e
        self._barrier()
        if self._main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_bytes(self.folder / "latest.json", json.dumps({"checkpoint": final.name, "step": step}).encode())
            done = sorted(p for p in self.folder.glob("step_*") if p.is_dir())
            for old in done[: max(0, len(done) - self.keep)]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def load(self, path: Path, tensor_names: Sequence[str], with_objects: bool = True) -> tuple[dict, dict, dict]:
        """(tensors by name, objects, state) of a checkpoint; the RNG states are ``load_intact``'s to restore.

        Any unreadable file raises CheckpointError naming it. ``with_objects=False`` skips the optimiser states
        (loading weights only).
        """
        tensors = {name: _read(path / f"{name}.safetensors", load_safetensors) for name in tensor_names}
        objects = _read(path / "optim.pt", _torch_load) if with_objects else {}
        state = _read(path / "state.json", lambda f: json.loads(f.read_text()))
        return tensors, objects, state

    def _read_rng(self, path: Path) -> dict | None:
        """This rank's RNG states saved in a checkpoint (None when it has none); CheckpointError when unreadable."""
        rng = path / f"rng_{0 if self.acc is None else self.acc.process_index}.pt"
        return _read(rng, _torch_load) if rng.is_file() else None


class CheckpointError(ValueError):
    """A checkpoint file could not be read back; the message names it."""


def _torch_load(file: Path):
    return torch.load(file, map_location="cpu", weights_only=True)


def _read(file: Path, how):
    """``how(file)``, with any way a damaged file fails turned into a CheckpointError naming it."""
    from safetensors import SafetensorError

    try:
        return how(file)
    # UnpicklingError: torch.load of bytes that are not a checkpoint at all (not a zip, not a pickle).
    except (OSError, RuntimeError, ValueError, EOFError, KeyError, SafetensorError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{file}: unreadable ({type(e).__name__}: {e})") from e


# Settings a resumed run may change: they do not alter what is computed, only how often it is saved or shown, or
# how fast it runs; and how long it runs (steps), which open_run allows only where the learning-rate schedule does
# not depend on it (LENGTH_FREE_SCHEDULES).
RESUMABLE_KEYS = ("steps", "checkpoint_every", "keep_checkpoints", "val_every", "val_count", "log_every", "num_workers",
                  "compile", "grad_checkpointing", "eval_bins", "reuse_cpu_memory", "update_threads")


# diffusers schedules whose lr at a step does not depend on the run's length (num_training_steps): with any other
# (cosine, linear, polynomial, ...) a new `steps` redraws the whole curve, and the lr jumps at the resume step.
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup", "piecewise_constant")


def check_optimiser_settings(name: str, lr: float, betas: Sequence[float], weight_decay: float, warmup_steps: int,
                             keep_checkpoints: int, **more_lrs: float) -> None:
    """ValueError naming the first setting of an optimiser config that AdamW or the run machinery would refuse."""
    for key, value in {"lr": lr, **more_lrs}.items():
        # NaN fails both comparisons; above 1, one AdamW step moves every weight by about lr: the run diverges.
        if not 0 < value <= 1:
            raise ValueError(f"{name}.{key} must be in (0, 1], got {value}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"{name}.betas must be two numbers in [0, 1), got {tuple(betas)}")
    if weight_decay < 0 or warmup_steps < 0:
        raise ValueError(f"{name}: weight_decay and warmup_steps must be >= 0, got {weight_decay}, {warmup_steps}")
    if keep_checkpoints < 1:
        raise ValueError(f"{name}.keep_checkpoints must be >= 1, got {keep_checkpoints}")


def config_changes(have: dict, want: dict, allowed: Sequence[str] = RESUMABLE_KEYS, prefix: str = "") -> list[str]:
    """'key: old -> new' for every setting that differs between two config dicts, except the allowed ones."""
    out = []
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, allowed, f"{prefix}{key}.")
        elif key not in allowed and a != b and not (isinstance(a, list) and tuple(a) == b):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


# Run folders this process holds the lock of (open_run takes it, holds_run_lock's wrapper lets it go).
_RUN_LOCKS: dict[Path, Any] = {}


def lock_run(out: Path, accelerator=None) -> None:
    """Make this process the one writer of run folder out (main process; an advisory lock, released on death).

    Two trainings on one folder would remove each other's checkpoint folders and interleave history.jsonl; the
    second one gets FolderBusyError naming the folder and the holder. Taking it again in this process replaces
    this process's own earlier lock (a notebook that reruns a cell after an error).
    """
    if accelerator is not None and not accelerator.is_main_process:
        return
    key = Path(out).resolve()
    release_run(key)
    _RUN_LOCKS[key] = lock_folder(key, "run folder")


def release_run(out: Path) -> None:
    """Let go of this process's lock on run folder out, if it holds one."""
    f = _RUN_LOCKS.pop(Path(out).resolve(), None)
    if f is not None:
        f.close()


def holds_run_lock(fn):
    """Decorator of a training loop: the run-folder locks it takes (open_run) are released when it returns or raises."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = set(_RUN_LOCKS)
        try:
            return fn(*args, **kwargs)
        finally:
            for key in set(_RUN_LOCKS) - before:
                release_run(key)

    return wrapper


def with_defaults(have: dict, defaults: dict, want: dict) -> dict:
    """A run's recorded settings, plus each setting of ``want`` it lacks (added to ldlib since) at its default."""
    out = {**{k: v for k, v in defaults.items() if k in want and k not in have}, **have}
    for k, v in defaults.items():
        if isinstance(v, dict) and isinstance(have.get(k), dict) and isinstance(want.get(k), dict):
            out[k] = with_defaults(have[k], v, want[k])
    return out


def open_run(out: Path, accelerator, resume: bool, keep: int, config: dict,
             defaults: dict | None = None) -> tuple[CheckpointManager, Path | None]:
    """Check a run folder before anything is written: (its checkpoints, the folder to resume from or None).

    Takes the run folder's lock first (``lock_run``): a second writer is refused before it reads anything.

    Refuses a folder that holds a run unless resuming; when resuming, refuses settings that differ from the run's
    config.json except those in RESUMABLE_KEYS (one line listing each change), so the file never records settings
    the run does not use, and a new ``steps`` when the config's ``lr_schedule`` depends on it. ``defaults`` (the
    config class's defaults, as ``config``): a setting the run's config.json lacks, because it was added to ldlib after
    the run was made, counts as its default there (a new setting's default keeps the behaviour runs had before it).
    Writes nothing: call ``write_config`` once the set-up has succeeded.
    """
    out = Path(out)
    lock_run(out, accelerator)
    ckpts = CheckpointManager(out / "checkpoints", accelerator, keep=keep)
    has_run = (out / "checkpoints" / "latest.json").is_file() or any((out / "checkpoints").glob("step_*"))
    if not resume and has_run:
        raise ValueError(f"{out}: holds a run already; pass resume=True (--resume) or choose another folder")
    if resume and (out / "config.json").is_file():
        try:
            have = json.loads((out / "config.json").read_text())
        except ValueError as e:
            raise ValueError(f"{out / 'config.json'}: unreadable ({e})") from e
        want = json.loads(json.dumps(config))
        if defaults is not None:
            have = with_defaults(have, json.loads(json.dumps(defaults)), want)
        changes = config_changes(have, want)
        if changes:
            raise ValueError(f"{out}: resuming with other settings than the run's ({'; '.join(changes)}); only "
                             f"{', '.join(RESUMABLE_KEYS)} may change on resume: start a new run folder instead")
        schedule = config.get("lr_schedule", "constant")
        if have.get("steps", config.get("steps")) != config.get("steps") and schedule not in LENGTH_FREE_SCHEDULES:
            raise ValueError(f"{out}: resuming with steps {config.get('steps')} instead of the run's {have['steps']} "
                             f"would redraw its {schedule!r} learning-rate schedule (the lr would jump at the resume "
                             f"step); resume with steps {have['steps']}, or start a new run (init_from for the "
                             f"decoder)")
    candidates = ckpts.candidates() if resume else []
    return ckpts, candidates[0] if candidates else None


def write_config(out: Path, accelerator, config: dict) -> None:
    """Record the run's settings in out/config.json (main process), after its set-up succeeded."""
    if accelerator.is_main_process:
        atomic_write_bytes(Path(out) / "config.json", json.dumps(config, indent=2).encode())
    accelerator.wait_for_everyone()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a torn or foreign line: dropped


def _after_existing_events(tb: Path) -> None:
    """Wait, if needed, until the clock's second is past every event file's in ``tb``.

    TensorBoard reads a folder's event files in name order, whose first field is the second the file was made, and a
    resumed writer's purge_step hides only the events of files read before its own: a writer made in the same second
    as the previous one (a quick restart, a test) would sort by process id and writer count instead.
    """
    stamps = [int(f.name.split(".")[3]) for f in tb.glob("events.out.tfevents.*")
              if len(f.name.split(".")) > 3 and f.name.split(".")[3].isdigit()]
    wait = max(stamps, default=0) + 1 - time.time()
    if wait > 0:
        time.sleep(wait)


class RunLogger:
    """tqdm progress bar + TensorBoard writer + history.jsonl, active on the main process only."""

    def __init__(self, out: Path, accelerator, total: int, initial: int = 0, desc: str = "train",
                 progress: bool = True) -> None:
        self.main = accelerator.is_main_process
        self.out = out
        self.bar = None
        self.tb = None
        if self.main:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm.auto import tqdm

            out.mkdir(parents=True, exist_ok=True)
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=not progress)
            # A run resumed at step S (or restarted from scratch, S = 0) logged steps >= S before it was killed:
            # TensorBoard hides those events (purge_step) and history.jsonl keeps only the lines before S.
            _after_existing_events(out / "tb")
            self.tb = SummaryWriter(str(out / "tb"), purge_step=initial)
            hist = out / "history.jsonl"
            if hist.is_file():
                kept = [line for line in hist.read_text().splitlines(keepends=True)
                        if line.endswith("\n") and _step_of(line) is not None and _step_of(line) < initial]
                atomic_write_bytes(hist, "".join(kept).encode())
            self._hist = open(hist, "a")

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        """Log scalars to TensorBoard."""
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def history(self, record: dict) -> None:
        """Append one line to history.jsonl (flushed: a crash keeps what was logged)."""
        if self.main:
            self._hist.write(json.dumps(record) + "\n")
            self._hist.flush()

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """Log one 3 x H x W image in [-1, 1]."""
        if self.tb is not None:
            self.tb.add_image(tag, ((image.float().clamp(-1, 1) + 1) / 2).cpu(), step)

    def advance(self, n: int = 1, postfix: dict | None = None) -> None:
        """Move the bar."""
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        """Flush and close everything."""
        if self.main:
            self.bar.close()
            self.tb.close()
            self._hist.close()



def build_optimizer(params, lr: float, betas: tuple[float, float], weight_decay: float, schedule: str,
                    warmup_steps: int, total_steps: int):
    """AdamW and a diffusers learning-rate schedule (any ``get_scheduler`` name) stepped once per optimiser step."""
    from diffusers.optimization import get_scheduler

    params = list(params)
    # On CUDA the fused kernel: one launch instead of a few per tensor (the update was ~5 ms of launches per Wan
    # decoder step, bench train); the same update to float rounding. CPU keeps the default (foreach) kernels.
    fused = bool(params) and all(p.device.type == "cuda" for p in params)
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused or None)
    sched = get_scheduler(schedule, opt, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    return opt, sched


def build_ema(params, decay: float):
    """diffusers' EMAModel of params (its decay schedule, counter, state dict, store / copy_to / restore) whose step
    is torch's EMA update (``swa_utils.get_ema_multi_avg_fn``): the same average to float rounding."""
    from diffusers.training_utils import EMAModel
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    class LerpEMA(EMAModel):
        # One foreach lerp reads both lists and writes the average once; EMAModel.step's foreach path subtracts into
        # a full-size temporary and then subtracts that, twice the memory traffic. Full-size Wan decoder (73 M
        # parameters): 0.98 -> 0.48 ms per step on an H100; 60 -> 27 ms on one CPU thread with the loop's memory
        # reuse (207 -> 27 ms without it: the temporary's fresh pages).
        @torch.no_grad()
        def step(self, parameters) -> None:
            parameters = list(parameters)
            pairs = list(zip(self.shadow_params, parameters))
            if not parameters or len(pairs) != len(parameters) or not all(
                    p.requires_grad and p.is_floating_point() and s.dtype == p.dtype and s.device == p.device
                    for s, p in pairs):
                # diffusers' own path: frozen tensors are copied, not averaged, and it promotes mixed dtypes
                return super().step(parameters)
            self.optimization_step += 1
            self.cur_decay_value = self.get_decay(self.optimization_step)
            get_ema_multi_avg_fn(self.cur_decay_value)(self.shadow_params, parameters, None)

    return LerpEMA(params, decay=decay, foreach=True)


def load_optimizer_state(opt, state: dict) -> None:
    """Load a saved optimiser state, keeping this optimiser's kernel choice: ``fused`` / ``foreach`` follow the
    device the run is on (build_optimizer), not the one the checkpoint was written on."""
    own = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in opt.param_groups]
    opt.load_state_dict({**state, "param_groups": [{**saved, **mine} for saved, mine in zip(state["param_groups"], own)]})


def mean_terms(records: list[dict], last: int | None = None) -> dict[str, float]:
    """Mean of each float term over the last ``last`` (default: all) records that were not skipped and have it."""
    # A skipped step's terms are the non-finite values that made it skip: one would turn every mean into NaN.
    records = [r for r in records if not r.get("skipped")]
    records = records[-last:] if last else records
    keys = {k for r in records for k, v in r.items() if isinstance(v, float)}
    return {k: sum(r[k] for r in records if k in r) / sum(k in r for r in records) for k in sorted(keys)}


def json_ready(obj: Any) -> Any:
    """``obj`` with every non-finite float (in dicts, lists and tuples) replaced by None: NaN / Infinity are not JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def json_bytes(obj: Any) -> bytes:
    """``obj`` as indented JSON; a non-finite float is written as null (``json_ready``)."""
    return json.dumps(json_ready(obj), indent=2, allow_nan=False).encode()


def read_history(run: str | os.PathLike) -> list[dict]:
    """The records of a run's history.jsonl (one per optimiser step), in order."""
    path = Path(run) / "history.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no history.jsonl (not a training run, or nothing logged yet)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_history(run: str | os.PathLike, panels: dict[str, Sequence[str]], marks: dict[str, int] | None = None,
                 log_y: Sequence[str] = (), fig=None, smooth: int = 1):
    """One panel per title with the history keys it lists, over steps; ``marks`` draws labelled vertical lines.

    ``smooth``: a trailing mean over that many records drawn over the raw values (per-step losses of small batches
    are mostly noise; the mean shows the trend).
    """
    from matplotlib.figure import Figure

    history = read_history(run)
    fig = fig or Figure(figsize=(4.4 * len(panels), 3))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, keys) in zip(axes, panels.items()):
        plotted = 0
        for k, key in enumerate(keys):
            pts = [(h["step"], h[key]) for h in history if isinstance(h.get(key), (int, float))]
            if pts:
                steps, values = [p[0] for p in pts], np.asarray([p[1] for p in pts], float)
                smoothed = smooth > 1 and len(values) > 1 and key != "lr"  # a schedule is not noisy: drawn as it is
                if smoothed:
                    ax.plot(steps, values, lw=0.5, alpha=0.3, color=f"C{k}")
                    sums = np.cumsum(np.insert(values, 0, 0.0))
                    lo = np.maximum(np.arange(1, len(values) + 1) - smooth, 0)
                    values = (sums[1:] - sums[lo]) / (np.arange(1, len(values) + 1) - lo)
                ax.plot(steps, values, lw=1.0, color=f"C{k}", label=f"{key} (mean of {smooth})" if smoothed else key)
                plotted += 1
        if not plotted:  # e.g. the GAN's terms in a run without GAN
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        for label, step in (marks or {}).items():
            ax.axvline(step, color="grey", ls=":", lw=1, label=label)
        if title in log_y:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if plotted and (plotted > 1 or marks):
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
