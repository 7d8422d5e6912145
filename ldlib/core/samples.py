"""The real data shipped with ldlib (``ldlib/assets``, licences in its SOURCES.md): six photos, the taef2 weights.

A fresh clone runs the real recipe offline with them: ``make demo``, the tests and the notebooks' defaults.
"""

from __future__ import annotations

from pathlib import Path


ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"


def sample_photos() -> Path:
    """The folder of the shipped real photos (read them in place: a photo folder like a user's own)."""
    folder = ASSETS_DIR / "photos"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: the shipped photos are missing (a broken install of ldlib?)")
    return folder


def sample_paths() -> list[Path]:
    """Paths of the shipped photos, sorted."""
    return sorted(p for p in sample_photos().iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
