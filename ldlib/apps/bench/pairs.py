"""``bench pairs``: seconds per source image of the whole pair build against a bare decode."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from ... import presets
from ...core.images import list_images, load_rgb8
from ...data.pairs import PairSpec, SkippedInputWarning, build_pairs
from .common import generate_photos, shared_photos


def bench_pairs(preset_name: str, quick: bool) -> dict:
    """Seconds per source image: bare decode vs the whole pair build (recipe spec, K=1 and K=4, one worker).

    Sources: ../shared/data/photos when present, else generated 4k JPEGs. For every image, bare decode, load_rgb8,
    and one-image builds at K=1 and K=4 run back to back (each build pays its own listing, manifest and report,
    so this is an upper bound on a folder build); ratios are per round, median over rounds, wall and CPU time.
    ``preset_name`` does not apply: building is measured at the recipe's sizes (512 px HQ), what real runs use.
    """
    from PIL import Image

    photos = shared_photos()
    with tempfile.TemporaryDirectory(prefix="ldlib-bench-pairs-") as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        src.mkdir()
        if photos:
            origin = str(presets.SHARED_DIR / "data" / "photos")
            for p in photos[: 3 if quick else None]:  # links, so a subset can be built without copying the photos
                (src / p.name).symlink_to(p)
        else:
            origin = "generated 3840x2160 JPEGs (../shared/data/photos absent)"
            generate_photos(src, 2 if quick else 4)
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
