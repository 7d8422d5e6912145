"""What the benches share: medians of timed calls (alone or interleaved, with per-round ratios), the device and
its synchronisation, a full-size random-weight Wan VAE, and source photos (the shared folder's, or generated)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from ... import presets
from ...core.images import IMAGE_SUFFIXES, list_images


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time (s) of fn() over repeats, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def timed_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                      sync: Callable[[], None] = lambda: None) -> dict[str, dict]:
    """Median wall and CPU time of each fn, running them in turn every round (a noisy machine hits all alike).

    Returns name -> {"wall_s", "cpu_s", "walls"}; "walls" (per round, in order) lets callers take per-round ratios.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    walls: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t, c = time.perf_counter(), time.process_time()
            fn()
            sync()
            walls[k].append(time.perf_counter() - t)
            cpus[k].append(time.process_time() - c)
    return {k: {"wall_s": statistics.median(walls[k]), "cpu_s": statistics.median(cpus[k]), "walls": walls[k]}
            for k in fns}


def round_ratio(timings: dict[str, dict], slow: str, fast: str) -> float:
    """Median over rounds of slow/fast wall time (each round ran both back to back)."""
    return statistics.median(a / b for a, b in zip(timings[slow]["walls"], timings[fast]["walls"]))


def default_device() -> torch.device:
    """CUDA when there is one, else the CPU: where the benches run."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_sync(device: torch.device) -> Callable[[], None]:
    """What waits for the device's queued work (CUDA), or nothing (CPU)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def full_wan_vae(seed: int = 0, config: dict | None = None):
    """A seeded random-weight AutoencoderKLWan; the default config is the real Wan 2.1 VAE architecture."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan(**(config or {})).eval()


def shared_photos() -> list[Path]:
    """The real photos in ../shared/data/photos (its image files, not its SOURCES.md), sorted; [] without it."""
    folder = presets.SHARED_DIR / "data" / "photos"
    return [p for p in list_images(folder) if p.suffix.lower() in IMAGE_SUFFIXES] if folder.is_dir() else []


def generate_photos(folder: Path, count: int, size: tuple[int, int] = (3840, 2160)) -> None:
    """Seeded photo-like JPEGs (upsampled noise plus grain) for benches when ../shared/data/photos is absent."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    for i in range(count):
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)  # upsampled noise: photo-like smoothness
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        noisy = np.asarray(img).astype(np.int16) + rng.integers(-8, 9, (h, w, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"gen{i}.jpg", quality=95)
