"""Embedded sample photos for demos and CI: scikit-image's bundled colour photos (no download, nothing committed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Colour photos that ship inside the scikit-image wheel (skimage/data), all at least 300 px on the short side.
SAMPLE_NAMES = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg")


def sample_paths() -> list[Path]:
    """Paths of the bundled sample photos inside the installed scikit-image package."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    paths = [folder / name for name in SAMPLE_NAMES]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"scikit-image sample photos missing: {', '.join(map(str, missing))}")
    return paths


def sample_folder(dest: str | os.PathLike) -> Path:
    """Copy the sample photos into dest (once) and return it: a photo folder like a user's own."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for p in sample_paths():
        if not (dest / p.name).is_file():
            shutil.copyfile(p, dest / p.name)
    return dest
