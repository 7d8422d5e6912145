"""Pair sets and latent caches under hostile but realistic use: killed builds, bad OUT folders, concurrent builds,
failed first runs, odd crops, symlinked photo folders and very large photos. Errors are one line, nothing written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldlib.cli import main
from ldlib.pairs import PairSpec, build_pairs, read_manifest

SPEC = PairSpec(hq_size=32, seed=0)  # source region 64 px, LQ 16 px (two tiny-Wan latent cells)


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _sources(folder: Path, n: int = 2, size: tuple[int, int] = (100, 120)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(_photo(*size, i)).save(folder / f"p{i}.png")
    return folder


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(err: str, *needles: str) -> None:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _build_cli(src: Path, out: Path, *extra: str) -> list[str]:
    return ["build-pairs", str(src), str(out), "--crop", "32", "--workers", "1", "--quiet", *extra]


# --- item 6: workers die with a killed build ---------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """Pids whose parent is pid (from /proc)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for init to reap it."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the worker processes")
def test_workers_exit_when_the_build_is_killed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(_photo(400, 400, 0)).save(src / "p0000.png")
    for i in range(1, 1500):  # many sources, cheaply: hard links under other names (other pair ids)
        os.link(src / "p0000.png", src / f"p{i:04d}.png")
    out = tmp_path / "out"
    script = "import sys, ldlib.pairs as P; P.build_pairs(sys.argv[1], sys.argv[2], P.PairSpec(hq_size=32), workers=2, progress=False)"
    proc = subprocess.Popen([sys.executable, "-c", script, str(src), str(out)], start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        deadline = time.time() + 120
        manifest = out / "manifest.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if manifest.is_file() and manifest.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.01)
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)  # what the OOM killer does
        proc.wait()
        assert len(workers) >= 2 and manifest.read_bytes().count(b"\n") < 1500, "the kill should land mid-run"
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.05)
        assert not [p for p in workers if _alive(p)], "worker processes outlived the killed build"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of this test's process group is left
        except ProcessLookupError:
            pass
