"""Benchmarks (`python -m ldlib bench ...`): medians after a warm-up, ratios measured in the same run.

Each bench is a function ``bench_<name>(preset_name, quick) -> dict`` with keys ``title``, ``rows`` (list of
dicts, one per measured variant) and ``ratios`` (name -> float); ``run_benches`` writes them to Markdown + JSON.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable


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


BENCHES: dict[str, Callable[[str, bool], dict]] = {}


def _markdown(name: str, result: dict) -> str:
    lines = [f"## {name}: {result.get('title', '')}", ""]
    rows = result.get("rows", [])
    if rows:
        cols = list(rows[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
        lines.append("")
    for k, v in result.get("ratios", {}).items():
        lines.append(f"- **{k}**: {v:.3g}x")
    return "\n".join(lines) + "\n"


def run_benches(which: str, out: Path, preset_name: str = "tiny", quick: bool = False) -> dict:
    """Run one bench or all; write out/<name>.json and out/<name>.md and print the Markdown."""
    from .images import atomic_write_bytes

    names = list(BENCHES) if which == "all" else [which]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise ValueError(f"unknown bench {unknown[0]!r}; available: {', '.join(BENCHES) or 'none'} or all")
    results = {}
    for name in names:
        result = BENCHES[name](preset_name, quick)
        results[name] = result
        md = _markdown(name, result)
        atomic_write_bytes(out / f"{name}.json", json.dumps(result, indent=2).encode())
        atomic_write_bytes(out / f"{name}.md", md.encode())
        print(md)
    return results


def bench_degrade(preset_name: str, quick: bool) -> dict:
    """Proxy vs one teacher step per latent batch, at the real Wan 2.1 1.3B transformer size (random weights)."""
    import torch

    from .degrade import ProxyNet
    from .presets import TINY_WAN_TRANSFORMER_CONFIG, WAN21_1_3B_TRANSFORMER_CONFIG

    from diffusers import WanTransformer3DModel

    # Real size: a 256 px LQ -> 16 x 32 x 32 latent, 512 text tokens of width 4096 (UMT5-XXL).
    cfg, text_len, hw = (TINY_WAN_TRANSFORMER_CONFIG, 16, 8) if quick else (WAN21_1_3B_TRANSFORMER_CONFIG, 512, 32)
    batch = 1
    torch.manual_seed(0)
    teacher = WanTransformer3DModel(**cfg).eval()
    channels = cfg["in_channels"]
    proxy = ProxyNet(channels=channels).eval()
    x = torch.randn(batch, channels, hw, hw)
    text = torch.randn(batch, text_len, cfg["text_dim"])
    t = torch.full((batch,), 100.0)
    sigma = torch.full((batch,), 0.1)
    with torch.inference_mode():
        t_teacher = timeit(lambda: teacher(hidden_states=x.unsqueeze(2), timestep=t, encoder_hidden_states=text, return_dict=False),
                           repeats=1 if not quick else 3, warmup=1)
        t_proxy = timeit(lambda: proxy(x, sigma), repeats=20, warmup=3)
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_proxy = sum(p.numel() for p in proxy.parameters())
    del teacher
    return {
        "title": f"proxy vs one teacher step, latent {channels}x{hw}x{hw}, batch {batch}, "
                 f"{'tiny (quick)' if quick else 'Wan 2.1 1.3B size'} teacher, {torch.get_num_threads()} threads",
        "rows": [
            {"model": "teacher transformer, 1 step", "params": n_teacher, "seconds": t_teacher},
            {"model": "ProxyNet (default size)", "params": n_proxy, "seconds": t_proxy},
        ],
        "ratios": {"proxy speed-up over one teacher step": t_teacher / t_proxy},
    }


BENCHES["degrade"] = bench_degrade


def bench_pairs(preset_name: str, quick: bool) -> dict:
    """Seconds per source image: bare decode vs the whole pair build (recipe spec, K=1 and K=4, one worker).

    Sources: ../shared/data/photos when present, else generated 4k JPEGs. For every image, bare decode, load_rgb8,
    and one-image builds at K=1 and K=4 run back to back (each build pays its own listing, manifest and report,
    so this is an upper bound on a folder build); ratios are per round, median over rounds, wall and CPU time.
    ``preset_name`` does not apply: building is measured at the recipe's sizes (512 px HQ), what real runs use.
    """
    import shutil
    import tempfile
    import warnings

    import numpy as np
    from PIL import Image

    from .images import IMAGE_SUFFIXES, list_images, load_rgb8
    from .pairs import PairSpec, SkippedInputWarning, build_pairs
    from .presets import SHARED_DIR

    photos_dir = SHARED_DIR / "data" / "photos"
    with tempfile.TemporaryDirectory(prefix="ldlib-bench-pairs-") as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        src.mkdir()
        if photos_dir.is_dir():
            origin = str(photos_dir)
            photos = [p for p in list_images(photos_dir) if p.suffix.lower() in IMAGE_SUFFIXES][: 3 if quick else None]
            for p in photos:  # links, so a subset can be built without copying the photos
                (src / p.name).symlink_to(p)
        else:
            origin = "generated 3840x2160 JPEGs (../shared/data/photos absent)"
            rng = np.random.default_rng(0)
            for i in range(2 if quick else 4):
                small = rng.integers(0, 256, (135, 240, 3), dtype=np.uint8)  # upsampled noise: photo-like smoothness
                img = Image.fromarray(small).resize((3840, 2160), Image.BICUBIC)
                noisy = np.asarray(img).astype(np.int16) + rng.integers(-8, 9, (2160, 3840, 3))
                Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(src / f"gen{i}.jpg", quality=95)
        files = list_images(src)
        n = len(files)
        for p in files:
            p.read_bytes()  # warm the page cache so the first timed pass does not pay the disk
        with warnings.catch_warnings():  # warm-up: imports and first-call costs stay out of the timings
            warnings.simplefilter("ignore", SkippedInputWarning)
            (tmp / "warm").mkdir()
            (tmp / "warm" / files[0].name).symlink_to(files[0].resolve())
            build_pairs(tmp / "warm", tmp / "out-warm", PairSpec(), workers=1, progress=False)
        rounds = 1 if quick else 3
        keys = ("bare", "decode", "k1", "k4")
        # Per round, summed over images: wall and CPU seconds. The four measurements of one image run back to
        # back, so a load spike from the machine's other users hits all four alike.
        wall = {k: [0.0] * rounds for k in keys}
        cpu = {k: [0.0] * rounds for k in keys}

        def bare(p: Path) -> None:
            with Image.open(p) as im:
                im.load()

        singles = []
        for i, p in enumerate(files):  # one folder per image, so each build covers exactly one source
            (tmp / "one" / str(i)).mkdir(parents=True)
            (tmp / "one" / str(i) / p.name).symlink_to(p.resolve())
            singles.append(tmp / "one" / str(i))
        for r in range(rounds):
            for i, p in enumerate(files):
                for key in keys:
                    out = tmp / f"out-{key}-{r}-{i}"
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", SkippedInputWarning)
                        t, c = time.perf_counter(), time.process_time()
                        if key == "bare":
                            bare(p)
                        elif key == "decode":
                            load_rgb8(p)
                        else:
                            k = 1 if key == "k1" else 4
                            report = build_pairs(singles[i], out, PairSpec(crops_per_image=k), workers=1, progress=False)
                        wall[key][r] += time.perf_counter() - t
                        cpu[key][r] += time.process_time() - c
                    if key in ("k1", "k4"):
                        if report["pairs_total"] != k:
                            raise RuntimeError(f"bench pairs: {p.name}: expected {k} pairs, got {report['pairs_total']}")
                        shutil.rmtree(out)
        measured = {k: [v / n for v in wall[k]] for k in keys}

        def ratio(times: dict, a: str, b: str) -> float:
            return statistics.median(x / y for x, y in zip(times[a], times[b]))

        ratios = {
            "build K=1 / decode": ratio(wall, "k1", "decode"),
            "build K=4 / decode": ratio(wall, "k4", "decode"),
            "build K=1 / bare PIL decode": ratio(wall, "k1", "bare"),
            "decode (load_rgb8) / bare PIL decode": ratio(wall, "decode", "bare"),
            "CPU time: build K=1 / decode": ratio(cpu, "k1", "decode"),
            "CPU time: build K=4 / decode": ratio(cpu, "k4", "decode"),
        }
        names = {
            "bare": "bare PIL decode (open + load)",
            "decode": "decode: load_rgb8 (PIL + EXIF + RGB array)",
            "k1": "whole build, K=1, 1 worker",
            "k4": "whole build, K=4, 1 worker",
        }
        rows = [
            {"variant": names[key], "s_per_image": statistics.median(v), "cpu_s_per_image": statistics.median(cpu[key]) / n,
             "images": n, "rounds": rounds}
            for key, v in measured.items()
        ]
    return {
        "title": f"pair building, seconds per source image ({origin}; HQ 512, target: build K=1 <= 1.3x decode)",
        "rows": rows,
        "ratios": ratios,
    }


BENCHES["pairs"] = bench_pairs
