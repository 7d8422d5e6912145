"""Pair sets and latent caches under hostile but realistic use: killed builds, bad OUT folders, concurrent builds,
failed first runs, odd crops, symlinked photo folders and very large photos. Errors are one line, nothing written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_only_folder
from PIL import Image

from ldlib.apps.cli import main
from ldlib.build import codec_of
from ldlib.data.pairs import PairSpec, SkippedInputWarning, build_pairs, read_manifest, source_digest


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
    return ["build-pairs", str(src), str(out), "--preset", "tiny", "--hq-size", "32", "--workers", "1", "--quiet", *extra]


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
    script = ("import sys, ldlib.data.pairs as P; "
              "P.build_pairs(sys.argv[1], sys.argv[2], P.PairSpec(hq_size=32), workers=2, progress=False)")
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


# --- item 9: OUT that is a file or read-only; the loser of two concurrent builds -----------------------------------


def test_build_into_a_file_or_a_read_only_folder_is_one_line(tmp_path, capsys):
    src = _sources(tmp_path / "src")
    target = tmp_path / "out.txt"
    target.write_text("mine")
    assert main(_build_cli(src, target)) == 2
    _one_error_line(capsys.readouterr().err, str(target), "not a folder")
    assert target.read_text() == "mine"
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only_folder(ro):
        for out in (ro, ro / "pairs"):
            assert main(_build_cli(src, out)) == 2
            _one_error_line(capsys.readouterr().err, str(ro), "not writable")
    assert not any(ro.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "ro", "src"]


def test_the_loser_of_two_concurrent_builds_is_one_line(tmp_path, capsys):
    import fcntl

    src = _sources(tmp_path / "src")
    out = tmp_path / "out"
    assert main(_build_cli(src, out)) == 0
    (src / "new.png").write_bytes((src / "p0.png").read_bytes())  # work left for a second build
    before = _tree(out)
    with open(out / "manifest.jsonl", "ab") as winner:  # a build in progress holds this lock
        fcntl.flock(winner.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = subprocess.run([sys.executable, "-m", "ldlib", *_build_cli(src, out)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    _one_error_line(r.stderr, str(out), "another build")
    assert _tree(out) == before


# --- item 10: a zero-pair skeleton, crops the codec cannot encode, failed encodes ---------------------------------


def test_a_folder_without_pairs_does_not_lock_the_spec(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_text("x")
    out = tmp_path / "out"
    assert main(_build_cli(bad, out)) == 1  # no pair built: a skeleton (pairset.json, report.json) stays
    assert (out / "pairset.json").is_file() and read_manifest(out) == []
    capsys.readouterr()
    src = _sources(tmp_path / "src")
    assert main(["build-pairs", str(src), str(out), "--preset", "tiny", "--hq-size", "48", "--workers", "1", "--quiet"]) == 0
    assert json.loads((out / "pairset.json").read_text())["spec"]["hq_size"] == 48
    assert {r["spec"]["hq_size"] for r in read_manifest(out)} == {48} and len(read_manifest(out)) == 2
    # Once it holds pairs, another spec is refused as before.
    assert main(_build_cli(src, out)) == 2
    _one_error_line(capsys.readouterr().err, str(out))


@pytest.mark.parametrize("crop", [100, 36])
def test_crops_the_codec_cannot_encode_are_refused_up_front(tmp_path, capsys, crop):
    src = _sources(tmp_path / "src", size=(300, 300))
    out = tmp_path / "out"
    assert main(_build_cli(src, out, "--preset", "tiny", "--hq-size", str(crop))) == 2
    _one_error_line(capsys.readouterr().err, f"crop size {crop} px", "multiple of 8", "multiple of 16")
    assert not out.exists()
    from ldlib.presets import get_preset

    assert get_preset("tiny").spatial_factor == codec_of(get_preset("tiny")).spatial_factor == 8
    # The nearest encodable size works end to end (build, then encode).
    assert main(_build_cli(src, out, "--preset", "tiny", "--hq-size", "96")) == 0
    assert main(["encode", str(out), "--preset", "tiny", "--device", "cpu", "--quiet"]) == 0


def test_a_failed_first_encode_leaves_no_cache_that_refuses_later(tmp_path, capsys):
    from ldlib.data.latents import LatentCache, encode_pairs
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
    codec = codec_of(get_preset("tiny", seed=7))
    result = encode_pairs(pairs, codec, cache, progress=False, device="cpu")
    assert result["encoded"] == 2 and LatentCache(cache, expect=codec).ids == {r["id"] for r in read_manifest(pairs)}


def test_an_identity_only_cache_is_harmless(tmp_path):
    """A cache folder holding identity.json and no latents (left by older versions) is taken over, not refused."""
    from ldlib.data.latents import LatentCache, encode_pairs
    from ldlib.presets import get_preset

    src = _sources(tmp_path / "src")
    pairs = tmp_path / "pairs"
    build_pairs(src, pairs, SPEC, workers=1, progress=False)
    cache = tmp_path / "lat"
    cache.mkdir()
    (cache / "identity.json").write_text(json.dumps({
        "identity": {"family": "tae", "latent_channels": 32, "spatial_factor": 8, "encoder_sha256": "0" * 64},
        "pairset": {"hq_size": 512}, "dtype": "float32"}))
    codec = codec_of(get_preset("tiny"))
    assert encode_pairs(pairs, codec, cache, progress=False, device="cpu")["encoded"] == 2
    assert LatentCache(cache, expect=codec).identity == codec.identity()
    assert json.loads((cache / "identity.json").read_text())["pairset"]["hq_size"] == 32
    # With latents in it, another codec is refused as before.
    with pytest.raises(ValueError, match="latents of different VAEs are never mixed"):
        encode_pairs(pairs, codec_of(get_preset("tiny", seed=7)), cache, progress=False, device="cpu")


# --- item 10: symlinked photo folders ----------------------------------------------------------------------------


def test_symlinked_folders_are_followed_once_without_loops(tmp_path):
    src = _sources(tmp_path / "src")
    elsewhere = _sources(tmp_path / "elsewhere", n=1)
    (elsewhere / "p0.png").rename(elsewhere / "far.png")
    (src / "linked").symlink_to(elsewhere, target_is_directory=True)  # photos on another disk: followed
    (src / "loop").symlink_to(src, target_is_directory=True)  # a loop: listed once, not followed forever
    (src / "again").symlink_to(elsewhere, target_is_directory=True)  # the same folder twice: once
    (src / "alias.png").symlink_to(src / "p1.png")  # the same file twice: once
    (src / "broken.png").symlink_to(tmp_path / "gone.png")
    with pytest.warns(SkippedInputWarning) as caught:
        report = build_pairs(src, tmp_path / "out", SPEC, workers=1, progress=False)
    warned = sorted(Path(str(w.message).split(": ")[0]).name for w in caught)
    assert warned == ["alias.png", "broken.png", "linked", "loop"]
    # A link never shadows the path it points to; of two links to one folder the first by name is followed.
    assert sorted(r["source"] for r in read_manifest(tmp_path / "out")) == ["again/far.png", "p0.png", "p1.png"]
    skipped = {s["source"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"linked", "loop", "alias.png", "broken.png"}, skipped
    assert "already listed as again" in skipped["linked"] and "already listed as ." in skipped["loop"]
    assert "file already listed as p1.png" in skipped["alias.png"] and "broken symbolic link" in skipped["broken.png"]
    assert report["sources_used"] == 3 and report["sources_skipped"] == 4


def test_unreadable_folders_and_undecodable_names_are_skipped_and_reported(tmp_path, monkeypatch):
    # A photo disk with a folder the user cannot read (lost+found) and a name in Latin-1 bytes (unzipped from an old
    # archive): both are skipped with their reason, the other photos are built.
    src = _sources(tmp_path / "src")
    (src / "lost+found").mkdir()
    _sources(src / "lost+found", n=1)
    Image.fromarray(_photo(100, 120, 7)).save(os.path.join(os.fsencode(src), b"caf\xe9.png"))
    real_iterdir = Path.iterdir

    def iterdir(self):  # as for a user without the rights (the tests may run as root, who has them all)
        if self.name == "lost+found":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.warns(SkippedInputWarning):
        report = build_pairs(src, tmp_path / "out", SPEC, workers=1, progress=False)
    assert {s["source"]: s["reason"] for s in report["skipped"]} == {
        "lost+found": "folder not readable (Permission denied)",
        "caf\\xe9.png": "name is not valid UTF-8 (rename it)"}
    assert sorted(r["source"] for r in read_manifest(tmp_path / "out")) == ["p0.png", "p1.png"]
    json.loads((tmp_path / "out" / "report.json").read_text())  # the report is written, names shown escaped
    # The folder asked for is not skipped: an unreadable one is an error naming it.
    def refused(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", refused)
    with pytest.raises(PermissionError, match="src"):
        build_pairs(src, tmp_path / "out2", SPEC, workers=1, progress=False)


def test_another_photo_under_a_listed_name_is_skipped_and_its_pairs_kept(tmp_path):
    # A second camera's folder built into the same OUT: its p0.png / p1.png are other photos (of the same size in
    # bytes: random pixels compress alike) under the names already listed. They are skipped with their reason, the
    # pairs of the first folder stay byte for byte, and the new name is built. A copy of the first folder (another
    # path, the same files) resumes as complete, and so does a manifest from before the digest.
    first, second = _sources(tmp_path / "cameraA"), tmp_path / "cameraB"
    second.mkdir()
    for i in range(3):
        Image.fromarray(_photo(100, 120, 10 + i)).save(second / f"p{i}.png")
    assert (first / "p0.png").stat().st_size == (second / "p0.png").stat().st_size
    out = tmp_path / "out"
    build_pairs(first, out, SPEC, workers=1, progress=False)
    before = _tree(out / "hq") | {f"lq/{k}": v for k, v in _tree(out / "lq").items()}
    with pytest.warns(SkippedInputWarning, match="not the file its pairs were cut from"):
        report = build_pairs(second, out, SPEC, workers=1, progress=False)
    assert sorted(s["source"] for s in report["skipped"]) == ["p0.png", "p1.png"]
    assert report["sources_already_complete"] == 0 and report["sources_used"] == 1 and report["pairs_built"] == 1
    after = _tree(out / "hq") | {f"lq/{k}": v for k, v in _tree(out / "lq").items()}
    assert {k: v for k, v in after.items() if k in before} == before
    records = read_manifest(out)
    assert sorted(r["source"] for r in records) == ["p0.png", "p1.png", "p2.png"]
    # The digest: sha256 of the size and the first and last 64 KiB, computed here with hashlib.
    import hashlib

    data = (first / "p0.png").read_bytes()
    want = hashlib.sha256(str(len(data)).encode() + data[:65536] + data[max(65536, len(data) - 65536):]).hexdigest()
    assert {r["source_digest"] for r in records if r["source"] == "p0.png"} == {want[:16]}
    Image.fromarray(_photo(300, 300, 5)).save(tmp_path / "big.png")  # over 128 KiB: head and tail, not the middle
    data = (tmp_path / "big.png").read_bytes()
    assert len(data) > 2 * 65536
    want = hashlib.sha256(str(len(data)).encode() + data[:65536] + data[-65536:]).hexdigest()
    assert source_digest(tmp_path / "big.png") == want[:16]

    import shutil

    shutil.copytree(first, tmp_path / "copy")
    report = build_pairs(tmp_path / "copy", out, SPEC, workers=1, progress=False)
    assert report["skipped"] == [] and report["sources_already_complete"] == 2
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "source_digest"}) + "\n"
                                for r in read_manifest(out)))
    report = build_pairs(second, out, SPEC, workers=1, progress=False)
    assert report["skipped"] == [] and report["sources_already_complete"] == 3


# --- item 10: very large photos -----------------------------------------------------------------------------------


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height pixels (its data is a few bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _real_big_png(path: Path, width: int, height: int) -> None:
    """A real, fully decodable 1-bit PNG of width x height (100 Mpx costs ~12 MB of zeros, compressed to ~15 kB)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + bytes((width + 7) // 8)  # filter byte + packed bits: a black image
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_a_100_megapixel_photo_is_a_normal_input(tmp_path):
    from ldlib.core.images import open_image

    src = tmp_path / "src"
    src.mkdir()
    _real_big_png(src / "big.png", 12_000, 8_400)  # 100.8 Mpx, over Pillow's default 89.5 Mpx limit
    with open_image(src / "big.png") as img:
        assert img.size == (12_000, 8_400)
    with pytest.warns(SkippedInputWarning, match="big.png: 1 converted to RGB"):  # a 1-bit PNG
        report = build_pairs(src, tmp_path / "out", SPEC, workers=1, progress=False)
    assert report["skipped"] == [] and report["pairs_total"] == 1
    r = read_manifest(tmp_path / "out")[0]
    assert r["source_size"] == [12_000, 8_400]
    assert not np.asarray(Image.open(tmp_path / "out" / r["hq"])).any()  # black in, black out


@pytest.mark.parametrize("size", [(30_000, 30_000), (100_000, 100_000)])
def test_absurd_pixel_counts_are_still_refused(tmp_path, size):
    from ldlib.core.images import ImageLoadError, open_image

    _png_header_only(tmp_path / "bomb.png", *size)
    mpx = f"{size[0] * size[1] / 1e6:,.0f}"
    with pytest.raises(ImageLoadError, match=rf"bomb.png: too many pixels \({mpx} Mpx, over the 400 Mpx"):
        with open_image(tmp_path / "bomb.png"):
            pass
    with pytest.warns(SkippedInputWarning, match="bomb.png: skipped: too many pixels"):
        report = build_pairs(tmp_path, tmp_path / "out", SPEC, workers=1, progress=False)
    assert [s["source"] for s in report["skipped"]] == ["bomb.png"]
    assert "too many pixels" in report["skipped"][0]["reason"]


# --- issue 28, item 7: a pair set's paths stay inside it ------------------------------------------------------------


def _copy_pairset(tiny_pairset, tmp_path) -> Path:
    import shutil

    pairs = tmp_path / "pairs"
    shutil.copytree(tiny_pairset["pairs"], pairs, ignore=shutil.ignore_patterns("latents"))
    return pairs


@pytest.mark.parametrize("change", ["absolute", "dotdot", "not_a_record", "no_lq"])
def test_manifest_lines_that_reach_outside_or_are_not_records_are_refused(change, tiny_pairset, tmp_path, capsys):
    from ldlib.data.datasets import PairDataset

    pairs = _copy_pairset(tiny_pairset, tmp_path)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (64, 64)).save(outside)  # the right size for tiny's LQ: only the path gives it away
    rec = dict(read_manifest(pairs)[0], id="x" * 16, crop=99)
    line = {"absolute": dict(rec, lq=str(outside)), "dotdot": dict(rec, hq="hq/../../outside.png"),
            "not_a_record": [1, 2], "no_lq": {k: v for k, v in rec.items() if k != "lq"}}[change]
    manifest = pairs / "manifest.jsonl"
    n = len(manifest.read_text().splitlines()) + 1
    with open(manifest, "a") as f:
        f.write(json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=f"manifest.jsonl: line {n}: "):
        PairDataset(pairs)
    code = main(["encode", str(pairs), "--preset", "tiny", "--quiet"])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and f"{manifest}: line {n}" in lines[0], lines
    assert not (pairs / "latents").exists()  # nothing encoded, nothing outside cached


def test_an_lq_image_of_another_size_is_named(tiny_pairset, tmp_path, capsys):
    pairs = _copy_pairset(tiny_pairset, tmp_path)
    victim = pairs / read_manifest(pairs)[1]["lq"]
    Image.new("RGB", (40, 48)).save(victim)
    code = main(["encode", str(pairs), "--preset", "tiny", "--quiet"])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and str(victim) in lines[0] and "40x48" in lines[0], lines
