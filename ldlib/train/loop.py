"""The training-loop skeleton the loops share: resume, the step that skips a non-finite loss, the per-step
bookkeeping (history, TensorBoard, progress bar, checkpoint cadence) and the summary's common fields.

A loop supplies what is its own (the models, the forward of one step, what a checkpoint holds, what its summary
adds); a fix to resume, NaN skipping, logging or checkpointing is made here once. The teacher and the proxy run
their whole loop through it. The decoder's loop (gradient accumulation, a skip decided before the optimiser and
the EMA move, records read back every log_every steps, step timings) still has its own driver in train/decoder.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ..core.runs import CheckpointManager, RunLogger, all_finite, mean_terms


@dataclass
class Progress:
    """Where a run stands: the next step, the steps skipped for a non-finite loss, this run's records."""

    step: int = 0
    skipped: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


def resume_progress(ckpts: CheckpointManager, acc, tensor_names: Sequence[str],
           restore: Callable[[dict, dict, dict], None]) -> Progress:
    """Restore from the newest intact checkpoint (``restore(tensors, objects, state)``); a fresh Progress if none.

    An unreadable checkpoint is skipped for the previous one (one line says which).
    """
    found = ckpts.load_intact(list(tensor_names), warn=acc.print)
    if found is None:
        return Progress()
    latest, tensors, objects, state = found
    restore(tensors, objects, state)
    progress = Progress(int(state["step"]), list(state.get("skipped", [])))
    acc.print(f"resumed from {latest} at step {progress.step}")
    return progress


def guarded_update(acc, loss: torch.Tensor, progress: Progress, params: Iterable[torch.nn.Parameter], opt, sched,
                   max_grad_norm: float, after_update: Callable[[], None] | None = None) -> bool:
    """Backward and one optimiser step, unless the loss is non-finite on any process (then the step is recorded
    as skipped and the weights stay); the schedule moves on either way. Whether the step was taken."""
    ok = all_finite(acc, loss)
    if ok:
        acc.backward(loss)
        if max_grad_norm > 0:
            acc.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        if after_update is not None:
            after_update()
    else:
        progress.skipped.append(progress.step)
        acc.print(f"step {progress.step}: non-finite loss, step skipped")
    opt.zero_grad(set_to_none=True)
    sched.step()
    return ok


def run_steps(loader: Iterable, progress: Progress, stop: int, one_step: Callable[[object, int], dict],
              log: RunLogger, log_every: int, checkpoint_every: int, save: Callable[[], None],
              scalars: Sequence[str], after_step: Callable[[dict], None] | None = None) -> None:
    """Run ``one_step(batch, step) -> record`` over the loader, with the bookkeeping every loop does the same way.

    After each step: ``after_step(record)`` (a held-out check that adds to the record), the record to
    history.jsonl, its ``scalars`` to TensorBoard every log_every steps, the progress bar, and ``save()`` every
    checkpoint_every steps and at ``stop``.
    """
    for batch in loader:
        rec = one_step(batch, progress.step)
        progress.step += 1
        if after_step is not None:
            after_step(rec)
        progress.history.append(rec)
        log.history(rec)
        if rec["step"] % log_every == 0:
            log.scalars(rec["step"], {k: rec[k] for k in scalars})
        log.advance(1, {"loss": rec["loss"]})
        if progress.step % checkpoint_every == 0 or progress.step == stop:
            save()
    log.close()


def summary_fields(out: Path, progress: Progress, steps_target: int, device: torch.device, t_start: float,
                   last: int, config: dict) -> dict:
    """What every run's summary.json starts with: where it stands, what it skipped, its last losses, its config."""
    return {"out": str(out), "steps_done": progress.step, "steps_target": steps_target,
            "finished": progress.step >= steps_target, "skipped_steps": progress.skipped, "device": str(device),
            "final_loss_mean_last_steps": mean_terms(progress.history, last=last).get("loss"),
            "wall_seconds_this_run": time.time() - t_start, "config": config}
