"""Benchmarks (`python -m ldlib bench ...`): medians after a warm-up, ratios measured in the same run.

Each bench is a function ``bench_<name>(preset_name, quick) -> dict`` with keys ``title``, ``rows`` (list of
dicts, one per measured variant) and ``ratios`` (name -> float), one module each (``degrade``, ``pairs``,
``codec``, ``train_wan``, ``train``; ``common``: what they share); ``run_benches`` writes them to Markdown + JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ...core.files import atomic_write_bytes
from .codec import bench_codec
from .degrade import bench_degrade
from .pairs import bench_pairs
from .train import bench_train_step
from .train_wan import bench_train

BENCHES: dict[str, Callable[[str, bool], dict]] = {
    "degrade": bench_degrade,
    "pairs": bench_pairs,
    "codec": bench_codec,
    "train-wan": bench_train,
    "train": bench_train_step,
}


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
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def run_benches(which: str, out: Path, preset_name: str = "tiny", quick: bool = False,
                train_options: dict | None = None) -> dict:
    """Run one bench or all; write out/<name>.json and out/<name>.md and print the Markdown.

    ``train_options``: keyword arguments of ``bench_train_step`` (batches, rounds, only, vae) for the train bench.
    """
    names = list(BENCHES) if which == "all" else [which]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise ValueError(f"unknown bench {unknown[0]!r}; available: {', '.join(BENCHES) or 'none'} or all")
    results = {}
    for name in names:
        result = BENCHES[name](preset_name, quick, **((train_options or {}) if name == "train" else {}))
        results[name] = result
        md = _markdown(name, result)
        atomic_write_bytes(out / f"{name}.json", json.dumps(result, indent=2).encode())
        atomic_write_bytes(out / f"{name}.md", md.encode())
        print(md)
    return results
