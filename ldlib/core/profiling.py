"""Where a training step's time goes: ``StepTimings``, an optional collector that ``train_decoder`` fills in.

The loop calls ``split(name)`` at the boundaries of its pieces (data, degradation, decoder forward, ...): each
piece is the time since the previous boundary, so the pieces of a step add up to the whole step and nothing goes
unaccounted. On CUDA every boundary synchronises the device first, so a piece is what it costs on the device, not
when the host queued it (timing therefore slows a GPU run: use it in benchmarks, not in production runs).
``sync=False`` leaves the device alone: the pieces are then the host's time to queue them, and a step's total is
still its real wall time once the loop's own per-step read of the device keeps host and device in step.
Without a collector the loop calls ``NO_TIMINGS``, which does nothing.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


class StepTimings:
    """Per-step wall time of the named pieces of a training loop (seconds), one dict per optimiser step."""

    active = True

    def __init__(self, device: str | torch.device | None = None, memory: bool = False, sync: bool = True,
                 on_step: Callable[[], object] | None = None) -> None:
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.device = device
        self._sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" and sync else None
        self.memory = memory
        self.on_step = on_step  # called after each step closes (e.g. a torch.profiler schedule's step)
        self._memory_base: float | None = None
        self.steps: list[dict[str, float]] = []
        self.outside: dict[str, float] = {}  # pieces that are not part of a step (checkpoints, validation)
        self._current: dict[str, float] = {}
        self._last: float | None = None

    def start(self) -> None:
        """Start the clock (the first piece is measured from here), and the peak-memory count when asked for."""
        self._wait()
        if self.memory:
            self._memory_base = reset_peak_memory(self.device)
        self._last = time.perf_counter()

    def peak_memory_mb(self) -> float:
        """Peak memory (MB) above what was in use at ``start``: CUDA allocations, or this process's RSS on CPU.

        On CPU it is the resident-set high-water mark (Linux), approximate: the allocator keeps some freed memory,
        and anything else the process did since ``start`` counts too.
        """
        if self._memory_base is None:
            raise ValueError("StepTimings(memory=True) and a started loop are needed for peak memory")
        return peak_memory_since(self.device, self._memory_base)

    def split(self, name: str, in_step: bool = True) -> None:
        """Charge the time since the previous boundary to ``name`` (to ``outside`` when not ``in_step``)."""
        self._wait()
        now = time.perf_counter()
        if self._last is not None:
            target = self._current if in_step else self.outside
            target[name] = target.get(name, 0.0) + now - self._last
        self._last = now

    def end_step(self) -> None:
        """Close the current optimiser step's record."""
        self.steps.append(self._current)
        self._current = {}
        if self.on_step is not None:
            self.on_step()

    def median(self, skip: int = 0) -> dict[str, float]:
        """Median seconds per piece over the steps after the first ``skip`` (a piece absent in a step counts 0)."""
        steps = self.steps[skip:]
        if not steps:
            raise ValueError(f"no timed steps after skipping {skip} (have {len(self.steps)})")
        names = list(dict.fromkeys(k for s in steps for k in s))
        return {k: statistics.median(s.get(k, 0.0) for s in steps) for k in names}

    def step_totals(self, skip: int = 0) -> list[float]:
        """Seconds of each whole step (the sum of its pieces) after the first ``skip``."""
        return [sum(s.values()) for s in self.steps[skip:]]

    def _wait(self) -> None:
        if self._sync is not None:
            self._sync()


def rss_mb(field: str = "VmRSS") -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM, ...) in MB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_memory(device: torch.device) -> float:
    """Reset the peak-memory counter (CUDA allocator, or this process's RSS mark); returns the baseline (MB)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")
    return rss_mb("VmHWM")  # the reset mark itself: the peak read later can only be higher


def peak_memory_since(device: torch.device, base: float) -> float:
    """Peak memory (MB) above ``base`` from ``reset_peak_memory``: CUDA allocations, or RSS on CPU (Linux)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20 - base
    # The kernel batches RSS counter updates per thread: the mark can read a page below the reset value.
    return max(0.0, rss_mb("VmHWM") - base)


class _NoTimings:
    """The collector used when none is given: every call is a no-op."""

    active = False

    def start(self) -> None:
        pass

    def split(self, name: str, in_step: bool = True) -> None:
        pass

    def end_step(self) -> None:
        pass


NO_TIMINGS = _NoTimings()
