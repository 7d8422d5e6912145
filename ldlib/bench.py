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
