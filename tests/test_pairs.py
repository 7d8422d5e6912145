"""Pair builder: the recipe's pixels (checked in numpy), determinism, resume after kill -9, bad inputs, shards, Dataset."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldlib.apps.cli import main
from ldlib.core.images import load_rgb8
from ldlib.data.datasets import PairDataset
from ldlib.data.pairs import (PairSpec, SkippedInputWarning, build_pairs, crop_box, pair_id, read_manifest,
                              split_by_source)


SPEC = PairSpec(hq_size=32, crops_per_image=2, seed=3)  # source region 64 px, LQ 16 px


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth-plus-noise RGB image (so box averages are not trivially constant)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
    return np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def _make_sources(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(_photo(90 + 7 * i, 120 - 5 * i, i)).save(folder / f"img{i}.png")
    (folder / "sub").mkdir(exist_ok=True)
    Image.fromarray(_photo(100, 80, 99)).save(folder / "sub" / "deep.jpg", quality=95)
    return folder


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _box_mean(a: np.ndarray, f: int) -> np.ndarray:
    h, w, c = a.shape
    return a.reshape(h // f, f, w // f, f, c).astype(np.float64).mean(axis=(1, 3))


def test_spec_defaults_are_the_recipe_and_presets_set_sizes():
    spec = PairSpec()
    assert (spec.pre_downsample, spec.hq_size, spec.lq_factor, spec.crops_per_image) == (2, 512, 2, 1)
    assert spec.lq_size == 256 and spec.source_crop == 1024
    tiny = PairSpec.from_preset("tiny", crops_per_image=3)
    assert (tiny.hq_size, tiny.lq_size, tiny.crops_per_image) == (128, 64, 3)
    with pytest.raises(ValueError, match="divisible"):
        PairSpec(hq_size=33)


def test_pixels_follow_the_recipe(tmp_path):
    src = _make_sources(tmp_path / "src")
    report = build_pairs(src, tmp_path / "out", SPEC, workers=1, progress=False)
    records = read_manifest(tmp_path / "out")
    assert report["pairs_built"] == len(records) == 4 * SPEC.crops_per_image
    for r in records:
        source, _ = load_rgb8(src / r["source"])
        assert r["source_size"] == [source.shape[1], source.shape[0]]
        left, top, right, bottom = r["box"]
        assert right - left == bottom - top == SPEC.source_crop and left % 2 == 0 and top % 2 == 0
        hq = np.asarray(Image.open(tmp_path / "out" / r["hq"]))
        lq = np.asarray(Image.open(tmp_path / "out" / r["lq"]))
        assert hq.shape == (32, 32, 3) and lq.shape == (16, 16, 3)
        # HQ is the area-downsampled source (whole image, cropped to an even size) at the recorded box.
        h2, w2 = source.shape[0] // 2 * 2, source.shape[1] // 2 * 2
        area = _box_mean(source[:h2, :w2], 2)
        np.testing.assert_array_equal(hq, np.round(area[top // 2 : bottom // 2, left // 2 : right // 2]))
        # LQ is the exact 2x2 box average of HQ, to within one 8-bit level after rounding.
        assert np.abs(lq.astype(np.float64) - _box_mean(hq, 2)).max() <= 1.0
        # ... and exactly the 4x4 mean of the source (LQ is averaged from the unrounded HQ).
        np.testing.assert_array_equal(lq, np.round(_box_mean(source[top:bottom, left:right], 4)))
        assert r["id"] == pair_id(r["source"], r["crop"], SPEC.seed)
    # Different crops of one source differ; the ids differ with the seed.
    assert len({tuple(r["box"]) for r in records}) == len(records)
    assert pair_id("a.png", 0, 0) != pair_id("a.png", 0, 1) != pair_id("a.png", 1, 0)


def test_same_inputs_and_seed_give_identical_bytes_serial_and_parallel(tmp_path):
    src = _make_sources(tmp_path / "src")
    build_pairs(src, tmp_path / "a", SPEC, workers=1, progress=False)
    build_pairs(src, tmp_path / "b", SPEC, workers=2, progress=False)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a and a == b
    assert (tmp_path / "a" / "manifest.jsonl").read_bytes() == (tmp_path / "b" / "manifest.jsonl").read_bytes()
    other = build_pairs(src, tmp_path / "c", PairSpec(hq_size=32, crops_per_image=2, seed=4), workers=1, progress=False)
    assert other["pairs_built"] == 8 and set(_files(tmp_path / "c")).isdisjoint(a)


def test_crop_boxes_stay_inside_and_aligned():
    spec = PairSpec(pre_downsample=4, hq_size=16, seed=1)
    for k in range(50):
        left, top, right, bottom = crop_box((131, 70), spec, "x.png", k)
        assert left % 4 == 0 and top % 4 == 0 and right <= 131 // 4 * 4 and bottom <= 70 // 4 * 4
    with pytest.raises(ValueError, match="too small"):
        crop_box((60, 200), spec, "x.png", 0)


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import ldlib.data.pairs as P
    save = P.save_image
    def slow_save(*args, **kwargs):  # slow writes so the kill lands mid-run, possibly between two files
        time.sleep(0.05)
        save(*args, **kwargs)
    P.save_image = slow_save
    P.build_pairs(sys.argv[1], sys.argv[2], P.PairSpec(hq_size=32, crops_per_image=3, seed=3), workers=1, progress=False)
    """
)


def test_resume_after_kill_9(tmp_path):
    src = _make_sources(tmp_path / "src", n=5)
    out = tmp_path / "out"
    spec = PairSpec(hq_size=32, crops_per_image=3, seed=3)
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(src), str(out)])
    manifest = out / "manifest.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if manifest.is_file() and manifest.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines_after_kill = manifest.read_bytes().count(b"\n")
    assert 2 <= lines_after_kill < 6 * 3, "the kill should land mid-run"
    # A torn last line, as a kill during the append would leave it.
    with open(manifest, "ab") as f:
        f.write(b'{"id": "torn')
    assert len(read_manifest(out)) == lines_after_kill  # readers ignore it

    report = build_pairs(src, out, spec, workers=1, progress=False)
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    ids = [r["id"] for r in lines]
    assert len(ids) == len(set(ids)) == 6 * 3 == report["pairs_total"]
    assert report["pairs_built"] == 6 * 3 - lines_after_kill
    ds = PairDataset(out)
    for i in range(len(ds)):
        item = ds[i]
        assert item["hq"].shape == (3, 32, 32) and item["lq"].shape == (3, 16, 16)
    assert not list(out.rglob("*.tmp"))
    # The result equals an uninterrupted build.
    build_pairs(src, tmp_path / "clean", spec, workers=1, progress=False)
    assert _files(out) == _files(tmp_path / "clean")
    # A rerun does nothing, and a missing PNG of a listed pair is rewritten without a second manifest line.
    (out / lines[0]["hq"]).unlink()
    again = build_pairs(src, out, spec, workers=1, progress=False)
    assert again["pairs_built"] == 0 and (out / lines[0]["hq"]).is_file()
    assert manifest.read_text().count("\n") == 18


def _bomb_png(path: Path, side: int = 30000) -> None:
    """A tiny PNG whose header claims side x side pixels (over ldlib's 400 Mpx decompression-bomb limit)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _bad_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    good = _photo(80, 96, 1)
    Image.fromarray(good).save(folder / "good.png")
    jpeg = folder / "full.jpg"
    Image.fromarray(good).save(jpeg, quality=90)
    (folder / "truncated.jpg").write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    jpeg.unlink()
    (folder / "notes.txt").write_text("not an image")
    Image.fromarray(good[:40, :50]).save(folder / "small.png")
    _bomb_png(folder / "bomb.png")
    Image.fromarray(good).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    Image.fromarray((good[..., 0].astype(np.uint16) * 257)).save(folder / "grey16.png")  # mode I;16
    Image.fromarray(good).quantize(16).save(folder / "palette.png")
    rgba = np.dstack([good, np.where(np.arange(96)[None, :] < 48, 0, 255).repeat(80, 0).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    return folder


def test_bad_inputs_are_skipped_or_converted_with_reasons(tmp_path):
    src = _bad_folder(tmp_path / "src")
    before = sorted(p.name for p in tmp_path.iterdir()), _files(src)
    spec = PairSpec(hq_size=32, seed=0)
    with pytest.warns(SkippedInputWarning) as caught:
        report = build_pairs(src, tmp_path / "out", spec, workers=1, progress=False)
    skipped = {s["source"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"truncated.jpg", "notes.txt", "small.png", "bomb.png"}
    assert "truncated" in skipped["truncated.jpg"] or "decodable" in skipped["truncated.jpg"]
    assert "not a decodable image" in skipped["notes.txt"]
    assert "too small" in skipped["small.png"] and "50x40" in skipped["small.png"]
    assert "decompression bomb" in skipped["bomb.png"]
    converted = {c["source"]: c["note"] for c in report["converted"]}
    assert converted["alpha.png"] == "alpha composited on white"
    assert "CMYK" in converted["cmyk.jpg"] and "16-bit" in converted["grey16.png"] and "P converted" in converted["palette.png"]
    assert report["pairs_total"] == 5 and report["sources_used"] == 5
    assert any("bomb.png" in str(w.message) for w in caught)
    # Alpha: transparent pixels became white; 16-bit grey keeps its 8-bit values (x257 undone).
    records = {r["source"]: r for r in read_manifest(tmp_path / "out")}
    r = records["alpha.png"]
    hq = np.asarray(Image.open(tmp_path / "out" / r["hq"]))
    left = r["box"][0] // 2
    assert left < 24  # every crop of this 96 px wide source covers transparent columns (source x < 48)
    assert (hq[:, : 24 - left] == 255).all() and (hq[:, 24 - left :] < 255).any()
    g = records["grey16.png"]
    g_hq = np.asarray(Image.open(tmp_path / "out" / g["hq"]))
    l, t, rr, b = g["box"]
    red = _photo(80, 96, 1)[..., :1]  # grey16.png holds the red channel x 257
    np.testing.assert_array_equal(g_hq, np.repeat(np.round(_box_mean(red[t:b, l:rr], 2)), 3, axis=2))
    # Nothing was written outside OUT.
    assert (sorted(p.name for p in tmp_path.iterdir()), _files(src)) == (sorted(before[0] + ["out"]), before[1])
    assert json.loads((tmp_path / "out" / "report.json").read_text())["skipped"] == report["skipped"]


def test_cli_exit_codes_and_summary(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_text("x")
    Image.fromarray(_photo(20, 20, 0)).save(bad / "tiny.png")
    assert main(["build-pairs", str(bad), str(tmp_path / "o1"), "--preset", "tiny", "--hq-size", "32", "--workers", "1", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "no pair was built" in captured.err and "tiny.png: skipped: too small" in captured.err
    src = _make_sources(tmp_path / "src", n=1)
    assert main(["build-pairs", str(src), str(tmp_path / "o2"), "--preset", "tiny", "--hq-size", "32",
                 "--crops-per-image", "2", "--seed", "5", "--workers", "1", "--quiet"]) == 0
    assert "4 built now" in capsys.readouterr().out
    spec = read_manifest(tmp_path / "o2")[0]["spec"]
    assert (spec["hq_size"], spec["crops_per_image"], spec["seed"]) == (32, 2, 5)
    # Another spec into the same OUT is refused (its ids would name different pixels).
    assert main(["build-pairs", str(src), str(tmp_path / "o2"), "--preset", "tiny", "--hq-size", "48", "--seed", "5", "--workers", "1", "--quiet"]) == 2


def test_shards_fill_one_folder_like_a_single_run(tmp_path):
    src = _make_sources(tmp_path / "src", n=6)
    out = tmp_path / "sharded"
    reports = [build_pairs(src, out, SPEC, workers=1, shard=f"{i}/3", progress=False) for i in range(3)]
    assert sum(r["files_in_shard"] for r in reports) == 7
    assert sorted(p.name for p in out.glob("manifest*.jsonl")) == [f"manifest.shard-{i}-of-3.jsonl" for i in range(3)]
    assert sorted(p.name for p in out.glob("report*.json")) == [f"report.shard-{i}-of-3.json" for i in range(3)]
    build_pairs(src, tmp_path / "single", SPEC, workers=1, progress=False)
    assert _files(out) == _files(tmp_path / "single")
    assert read_manifest(out) == read_manifest(tmp_path / "single")


def test_dataset_items_and_split_by_source(tmp_path):
    src = _make_sources(tmp_path / "src", n=5)
    build_pairs(src, tmp_path / "out", SPEC, workers=1, progress=False)
    ds = PairDataset(tmp_path / "out")
    assert len(ds) == 12 and len(ds.sources) == 6
    item = ds[0]
    r = ds.records[0]
    hq = np.asarray(Image.open(tmp_path / "out" / r["hq"])).astype(np.float32)
    torch.testing.assert_close(item["hq"], torch.from_numpy(hq / 127.5 - 1).permute(2, 0, 1))
    assert item["lq"].shape == (3, 16, 16) and item["lq"].min() >= -1 and item["lq"].max() <= 1
    train, val = ds.split(val_fraction=0.34, seed=7)
    assert len(val.sources) == 2 and not set(train.sources) & set(val.sources)
    assert sorted(train.ids + val.ids) == sorted(ds.ids)
    assert split_by_source(ds.records, 0.34, 7) == (train.ids, val.ids)  # deterministic
    assert any(split_by_source(ds.records, 0.34, s)[1] != val.ids for s in range(8, 12))  # and seeded
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=4)))
    assert batch["hq"].shape == (4, 3, 32, 32) and len(batch["id"]) == 4


def test_16_bit_rgb_png_keeps_the_high_byte(tmp_path):
    """Pillow reads 48-bit RGB PNGs as 8-bit RGB (the high byte; load_rgb8 records no note for it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rgb16 = np.random.default_rng(0).integers(0, 65536, (70, 72, 3)).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in rgb16)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "rgb16.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 72, 70, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    build_pairs(tmp_path / "src", tmp_path / "out", PairSpec(hq_size=32), workers=1, progress=False)
    (r,) = read_manifest(tmp_path / "out")
    l, t, rr, b = r["box"]
    hq = np.asarray(Image.open(tmp_path / "out" / r["hq"])).astype(np.float64)
    region = rgb16[t:b, l:rr].astype(np.int64)
    np.testing.assert_array_equal(hq, np.round(_box_mean(region >> 8, 2)))  # Pillow keeps the high byte
    assert np.abs(hq - _box_mean(region / 257.0, 2)).max() < 1.5  # so HQ is within 1.5 levels of the 16-bit mean


def test_folder_tag_tells_photo_folders_of_one_name_apart(tmp_path, monkeypatch):
    # Two cameras' DCIM folders get two work folders; '.' is named after what it resolves to; the hash is the
    # resolved path's sha256.
    import hashlib

    from ldlib.data.pairs import folder_tag

    a, b = tmp_path / "a" / "DCIM", tmp_path / "b" / "DCIM"
    for folder in (a, b):
        folder.mkdir(parents=True)
    assert folder_tag(a) == f"DCIM-{hashlib.sha256(str(a.resolve()).encode()).hexdigest()[:8]}" != folder_tag(b)
    monkeypatch.chdir(a)
    assert folder_tag(".") == folder_tag(a) == folder_tag(b / ".." / ".." / "a" / "DCIM")


# --- issue 28, item 6 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1000000000000", "10001"])
def test_absurd_crop_counts_are_refused_naming_the_flag(value, tmp_path, capsys):
    from ldlib.apps.cli import main

    out = tmp_path / "pairs"
    assert main(["build-pairs", str(tmp_path), str(out), "--preset", "tiny", "--crops-per-image", value]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --crops-per-image must be <= 10000"), lines
    assert not out.exists()
