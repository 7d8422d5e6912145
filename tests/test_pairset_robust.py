"""Pair sets and latent caches under hostile but realistic use: killed builds, bad OUT folders, concurrent builds,
failed first runs, odd crops, symlinked photo folders and very large photos. Errors are one line, nothing written."""

from __future__ import annotations

import json
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


# --- item 10: crops the codec cannot encode, failed encodes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("crop", [100, 36])
def test_crops_the_codec_cannot_encode_are_refused_up_front(tmp_path, capsys, crop):
    src = _sources(tmp_path / "src", size=(300, 300))
    out = tmp_path / "out"
    assert main(["build-pairs", str(src), str(out), "--preset", "tiny", "--crop", str(crop), "--workers", "1", "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, f"crop size {crop} px", "multiple of 8", "multiple of 16")
    assert not out.exists()
    from ldlib.presets import get_preset

    assert get_preset("tiny").spatial_factor == get_preset("tiny").load_codec().spatial_factor == 8
    # The nearest encodable size works end to end (build, then encode).
    assert main(["build-pairs", str(src), str(out), "--preset", "tiny", "--crop", "96", "--workers", "1", "--quiet"]) == 0
    assert main(["encode", str(out), "--preset", "tiny", "--device", "cpu", "--quiet"]) == 0


def test_a_failed_first_encode_leaves_no_cache_that_refuses_later(tmp_path, capsys):
    from ldlib.latents import LatentCache, encode_pairs
    from ldlib.presets import get_preset

    src = _sources(tmp_path / "src")
    pairs = tmp_path / "pairs"
    build_pairs(src, pairs, SPEC, workers=1, progress=False)
    lq = pairs / read_manifest(pairs)[0]["lq"]
    good = lq.read_bytes()
    lq.write_bytes(good[: len(good) // 2])  # a damaged LQ: the first encode fails on it
    cache = tmp_path / "lat"
    assert main(["encode", str(pairs), "--preset", "tiny", "--out", str(cache), "--device", "cpu", "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, lq.name)
    assert not (cache / "identity.json").exists() and not list(cache.glob("*.safetensors"))
    # The rerun, with the file repaired and another codec (a differently seeded tiny VAE), works.
    lq.write_bytes(good)
    codec = get_preset("tiny", seed=7).load_codec()
    result = encode_pairs(pairs, codec, cache, progress=False, device="cpu")
    assert result["encoded"] == 2 and LatentCache(cache, expect=codec).ids == {r["id"] for r in read_manifest(pairs)}


def test_an_identity_only_cache_is_harmless(tmp_path):
    """A cache folder holding identity.json and no latents (left by older versions) is taken over, not refused."""
    from ldlib.latents import LatentCache, encode_pairs
    from ldlib.presets import get_preset

    src = _sources(tmp_path / "src")
    pairs = tmp_path / "pairs"
    build_pairs(src, pairs, SPEC, workers=1, progress=False)
    cache = tmp_path / "lat"
    cache.mkdir()
    (cache / "identity.json").write_text(json.dumps({
        "identity": {"family": "tae", "latent_channels": 32, "spatial_factor": 8, "encoder_sha256": "0" * 64},
        "pairset": {"hq_size": 512}, "dtype": "float32"}))
    codec = get_preset("tiny").load_codec()
    assert encode_pairs(pairs, codec, cache, progress=False, device="cpu")["encoded"] == 2
    assert LatentCache(cache, expect=codec).identity == codec.identity()
    assert json.loads((cache / "identity.json").read_text())["pairset"]["hq_size"] == 32
    # With latents in it, another codec is refused as before.
    with pytest.raises(ValueError, match="latents of different VAEs are never mixed"):
        encode_pairs(pairs, get_preset("tiny", seed=7).load_codec(), cache, progress=False, device="cpu")


