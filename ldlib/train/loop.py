"""The training-loop skeleton the loops share: resume, the update that skips a non-finite loss, the per-step
bookkeeping (history, TensorBoard, progress bar, checkpoint cadence, step timings) and the summary's common fields.

A loop supplies what is its own (the models, the forward of one step, what a checkpoint holds, what its summary
adds); a fix to resume, NaN skipping, logging or checkpointing is made here once. The teacher, the proxy and the
decoder run their loops through it. What only the decoder uses is here as options the others leave off: gradient
accumulation (``accumulation_windows``), several optimisers in one update and a skip decided from a finiteness
probe after the backwards (``Update``, ``apply_update``), records left on the device and read back every log_every
steps (``PendingRecords``), step timings and work between steps (``run_steps``' ``timer`` and ``between_steps``).
"""

from __future__ import annotations

import contextlib
import itertools
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import torch

from ..core.profiling import NO_TIMINGS
from ..core.runs import CheckpointManager, RunLogger, all_finite, mean_terms


@dataclass
class Progress:
    """Where a run stands: the next step, the steps skipped for a non-finite loss, this run's records."""

    step: int = 0
    skipped: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    def record_skip(self, acc) -> None:
        """Record the current step as skipped for a non-finite loss (one line says so)."""
        self.skipped.append(self.step)
        acc.print(f"step {self.step}: non-finite loss, step skipped")


def resume_progress(ckpts: CheckpointManager, acc, tensor_names: Sequence[str],
                    restore: Callable[[Path, dict, dict, dict], None]) -> Progress:
    """Restore from the newest intact checkpoint (``restore(path, tensors, objects, state)``); a fresh Progress if
    none.

    An unreadable checkpoint is skipped for the previous one (one line says which).
    """
    found = ckpts.load_intact(list(tensor_names), warn=acc.print)
    return Progress() if found is None else restore_progress(acc, found, restore)


def restore_progress(acc, found: tuple[Path, dict, dict, dict], restore: Callable[[Path, dict, dict, dict], None]
                     ) -> Progress:
    """Restore one checkpoint, ``found`` = (path, tensors, objects, state), with ``restore``: where it stood."""
    restore(*found)
    path, _, _, state = found
    progress = Progress(int(state["step"]), list(state.get("skipped", [])))
    acc.print(f"resumed from {path} at step {progress.step}")
    return progress


class Update(NamedTuple):
    """One optimiser of an update: its schedule, the parameters it clips, whether it steps this time (a
    discriminator before its start holds still; its schedule moves on)."""

    opt: Any
    sched: Any
    params: Iterable[torch.nn.Parameter]
    active: bool = True


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run the block with n intra-op CPU threads (0: leave the setting alone)."""
    before = torch.get_num_threads()
    if n <= 0 or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def apply_update(acc, take: bool, updates: Sequence[Update], max_grad_norm: float,
                 after_update: Callable[[], None] | None = None, threads: int = 0) -> None:
    """Clip, step and zero each active optimiser, then ``after_update()`` (the EMA), or drop every gradient when
    not ``take`` (weights and optimiser states stay); the schedules move on either way.

    ``threads``: intra-op CPU threads of the steps and ``after_update`` (element-wise work; 0: unchanged). The
    clipping norms keep all threads (reductions: their rounding depends on the thread count).
    """
    if take:
        if max_grad_norm > 0:
            for u in updates:
                if u.active:
                    acc.clip_grad_norm_(u.params, max_grad_norm)
        with cpu_threads(threads):
            for u in updates:
                if u.active:
                    u.opt.step()
                u.opt.zero_grad(set_to_none=True)
            if after_update is not None:
                after_update()
    else:
        for u in updates:
            u.opt.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        # Schedules follow the step count even on skipped steps / before an optimiser starts (torch warns).
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*", category=UserWarning)
        for u in updates:
            u.sched.step()


def guarded_update(acc, loss: torch.Tensor, progress: Progress, params: Iterable[torch.nn.Parameter], opt, sched,
                   max_grad_norm: float, after_update: Callable[[], None] | None = None) -> bool:
    """Backward and one optimiser step, unless the loss is non-finite on any process (then the step is recorded
    as skipped and the weights stay); the schedule moves on either way. Whether the step was taken."""
    ok = all_finite(acc, loss)
    if ok:
        acc.backward(loss)
    else:
        progress.record_skip(acc)
    apply_update(acc, ok, [Update(opt, sched, params)], max_grad_norm, after_update)
    return ok


def accumulation_windows(loader: Iterable, micro_steps: int) -> Iterator[Iterator]:
    """The loader's batches in windows of ``micro_steps`` (one optimiser step each), each fetched as it is consumed.

    A window must be consumed whole before the next one is asked for (the loader's length is a multiple of
    ``micro_steps``).
    """
    batches = iter(loader)
    for first in batches:
        yield itertools.chain([first], itertools.islice(batches, micro_steps - 1))


class PendingRecords:
    """The loss terms of the optimiser steps not read yet, left where they were computed (no host sync per step).

    ``read`` fetches all of them in one transfer and builds the history records exactly as an immediate read
    would: the same floats, the same per-window means, the same key order.
    """

    def __init__(self, device: torch.device, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.device = device
        self.reduce = reduce  # the mean across processes (DDP), or None
        self.steps: list[tuple[list[tuple[list[str], dict[str, float], torch.Tensor | None]], dict]] = []
        self.window: list[tuple[list[str], dict[str, float], torch.Tensor | None]] = []

    def add_micro(self, values: dict[str, torch.Tensor]) -> None:
        """One micro-step's scalars; those on the training device stay there until ``read``."""
        # By device type: accelerate's device may name no index (cuda) where tensors do (cuda:0).
        on_device = [v.detach().reshape(()) for v in values.values() if v.device.type == self.device.type]
        host = {k: float(v) for k, v in values.items() if v.device.type != self.device.type}  # on the host: free
        # float32 holds every float32 / bf16 / fp16 value exactly (float64 when a term is float64).
        dtype = torch.float64 if any(v.dtype == torch.float64 for v in on_device) else torch.float32
        stacked = torch.stack([v.to(dtype) for v in on_device]) if on_device else None
        self.window.append((list(values), host, stacked))

    def end_step(self, **meta) -> None:
        """Close the optimiser step (its micro-steps so far) with its step, lr and skipped flag."""
        self.steps.append((self.window, meta))
        self.window = []

    def read(self, collective: bool = True) -> list[dict]:
        """The records of the closed steps (one host transfer), oldest first; forgets them.

        ``collective``: the mean across processes (``reduce``), applied to every value (one collective: every
        process must call ``read`` at the same step, which it does at the loop's shared points, never on an error's
        way out).
        """
        if not self.steps:
            return []  # the same on every process (they close the same steps): no collective needed
        stacks = [s for micros, _ in self.steps for _, _, s in micros if s is not None]
        flat = torch.cat([s.to(torch.float64) for s in stacks]) if stacks else torch.zeros(0, dtype=torch.float64)
        hosts = [host[k] for micros, _ in self.steps for names, host, _ in micros for k in names if k in host]
        if collective and self.reduce is not None:
            # Each process logged the terms of its own slice of the global batch: the record is their mean, as one
            # process would compute it on the whole batch. Every process holds the same keys in the same order.
            host_t = torch.tensor(hosts, dtype=torch.float64, device=self.device)
            both = self.reduce(torch.cat([flat.to(self.device), host_t]))
            flat, hosts = both[: len(flat)], both[len(flat) :].tolist()
        flat, host_values = flat.tolist(), iter(hosts)
        records, i = [], 0
        for micros, meta in self.steps:
            window = []
            for names, host, stacked in micros:
                n = 0 if stacked is None else len(stacked)
                dev = iter(flat[i : i + n])
                i += n
                window.append({k: next(host_values) if k in host else next(dev) for k in names})
            rec = {k: sum(t[k] for t in window if k in t) / max(1, sum(k in t for t in window)) for k in window[-1]}
            rec.update(meta)
            records.append(rec)
        self.steps = []
        return records


def run_steps(loader: Iterable, progress: Progress, stop: int, one_step: Callable[[Any, int], dict | None],
              log: RunLogger, log_every: int, checkpoint_every: int, save: Callable[[], None],
              scalars: Sequence[str] | None = None, after_step: Callable[[dict], None] | None = None,
              pending: PendingRecords | None = None, between_steps: Callable[[int], None] | None = None,
              bar_key: str = "loss", timer=NO_TIMINGS) -> None:
    """Run ``one_step(batch, step) -> record`` over the loader, with the bookkeeping every loop does the same way.

    After each step: ``after_step(record)`` (a held-out check that adds to the record), the record to
    history.jsonl, its ``scalars`` (None: every float) to TensorBoard every log_every steps, the progress bar (its
    ``bar_key`` value), ``between_steps(steps done)`` outside the step's timing (validation grids), and ``save()``
    every checkpoint_every steps and at ``stop``. With ``pending``, ``one_step`` leaves its record there (and
    returns None): records are read back every log_every steps, before each checkpoint and at the end, and when the
    loop stops with an error, this process's own records are still written. ``timer``: a
    ``ldlib.core.profiling.StepTimings`` (``one_step`` splits its own pieces; "logging" and "checkpoint" are here).
    """
    def write(records: list[dict]) -> None:
        for rec in records:
            progress.history.append(rec)
            log.history(rec)
            if rec["step"] % log_every == 0:
                log.scalars(rec["step"], {k: v for k, v in rec.items() if isinstance(v, float)} if scalars is None
                            else {k: rec[k] for k in scalars})

    def flush(collective: bool = True) -> None:
        if pending is not None:
            write(pending.read(collective))
            if progress.history:
                log.advance(0, {bar_key: progress.history[-1].get(bar_key, float("nan"))})

    try:
        timer.start()
        for batch in loader:
            rec = one_step(batch, progress.step)
            progress.step += 1
            if rec is not None:
                if after_step is not None:
                    after_step(rec)
                write([rec])
                log.advance(1, {bar_key: rec[bar_key]})
            else:
                if (progress.step - 1) % log_every == 0:
                    flush()
                log.advance(1)
            timer.split("logging")
            timer.end_step()
            if between_steps is not None:
                between_steps(progress.step)
            if progress.step % checkpoint_every == 0 or progress.step == stop:
                flush()  # history.jsonl is complete up to every checkpoint
                save()
                timer.split("checkpoint", in_step=False)
        flush()
    except BaseException:
        # This process's own terms (under DDP the other processes may never reach a collective mean); never
        # replaces the error.
        with contextlib.suppress(Exception):
            flush(collective=False)
        raise


def summary_fields(out: Path, progress: Progress, steps_target: int, device: torch.device, t_start: float,
                   last: int, config: dict) -> dict:
    """What every run's summary.json starts with: where it stands, what it skipped, its last losses, its config."""
    return {"out": str(out), "steps_done": progress.step, "steps_target": steps_target,
            "finished": progress.step >= steps_target, "skipped_steps": progress.skipped, "device": str(device),
            "final_loss_mean_last_steps": mean_terms(progress.history, last=last).get("loss"),
            "wall_seconds_this_run": time.time() - t_start, "config": config}
