"""Pair sets: source photos -> (HQ, LQ) crops on disk, exactly the recipe (the torch Dataset is ldlib.data.datasets).

The recipe (README, "The recipe"): source -> area 1/``pre_downsample`` -> random ``hq_size`` crop (HQ) ->
area 1/``lq_factor`` (LQ). For speed only the source region under the crop is averaged: with the crop offset a
multiple of ``pre_downsample`` in source pixels, ``area(source)[box] == area(source[pre * box])`` exactly.

Layout of a pair set folder OUT::

    pairset.json                      the spec fields that define the pixels (a rerun with another spec is refused)
    hq/<id>.png, lq/<id>.png          8-bit RGB
    manifest.jsonl                    one JSON line per complete pair (unsharded runs): id, source (path relative
                                      to the source folder), crop (index), source_size [w, h] and box [left, top,
                                      right, bottom] in source pixels after EXIF orientation, source_digest (of
                                      the file it was cut from: ``source_digest``), spec, seed, note
    manifest.shard-I-of-N.jsonl       the same, one file per shard of a ``--shard I/N`` run
    report.json / report.shard-I-of-N.json   counts, skipped files with reasons, conversions, timings

Sharding: every shard owns its own manifest and report file, so shards running on several machines write into
one OUT without collisions (PNG names are ids, and ids are unique per source file); readers merge all manifest
files. A source file belongs to shard ``sha256(relative path) % N``, independent of listing order.

Kill safety: every PNG is written to a hidden temporary name and renamed; a manifest line is appended (one
``write`` of whole lines, flushed) only after both PNGs are in place; readers ignore a torn last line and a
rerun cuts it off before appending. A rerun skips pairs already listed (re-writing their PNGs if they went
missing) and never appends a second line for an id. A source that is not the file its pairs were cut from
(another photo under the same relative path: a second camera's IMG_0001.jpg, a re-edit) is skipped and reported,
its pairs kept as they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

import numpy as np
import torch

from ..core.files import atomic_write_bytes, in_shard, lock_exclusive, parse_shard, writable_folder
from ..core.images import ImageLoadError, area_downsample, load_rgb8, open_image, rgb8, save_image, walk_files
from ..presets import get_preset


MANIFEST = "manifest.jsonl"
MAX_CROPS_PER_IMAGE = 10_000
PAIRSET_JSON = "pairset.json"
FORMAT_VERSION = 1


class SkippedInputWarning(UserWarning):
    """A source file was skipped (or converted) while building a pair set; the message names the file."""


# ------------------------------------------------------------------------------------------------------------
# spec
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairSpec:
    """How pairs are cut from a source photo; the defaults are the recipe (area 0.5x, 512 crop, area 0.5x, K=1)."""

    pre_downsample: int = field(default=2, metadata={"help": "area downsample of the source before cropping"})
    hq_size: int = field(default=512, metadata={"help": "HQ crop in px, after pre-downsample"})
    lq_factor: int = field(default=2, metadata={"help": "LQ = area downsample of HQ by this factor"})
    crops_per_image: int = field(default=1, metadata={"help": "crops per source photo (its decode is paid once)"})
    min_source_size: int = field(default=0, metadata={"help": "skip sources whose short side is below this (px)"})
    seed: int = field(default=0, metadata={"help": "seeds every crop position (with the source path and crop index)"})

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"PairSpec.{f.name} must be an int, got {v!r}")
        for name in ("pre_downsample", "hq_size", "lq_factor", "crops_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"PairSpec.{name} must be >= 1, got {getattr(self, name)}")
        # A build lists every crop's id of every photo up front: a count in the billions fills memory silently.
        if self.crops_per_image > MAX_CROPS_PER_IMAGE:
            raise ValueError(f"PairSpec.crops_per_image must be <= {MAX_CROPS_PER_IMAGE} (crops of one photo overlap "
                             f"long before that), got {self.crops_per_image}")
        for name in ("pre_downsample", "lq_factor"):  # a factor larger than any photo leaves nothing to crop
            if getattr(self, name) > 64:
                raise ValueError(f"PairSpec.{name} must be <= 64, got {getattr(self, name)}")
        if self.hq_size % self.lq_factor:
            raise ValueError(f"PairSpec: hq_size {self.hq_size} is not divisible by lq_factor {self.lq_factor}")

    @property
    def lq_size(self) -> int:
        """LQ size (px)."""
        return self.hq_size // self.lq_factor

    @property
    def source_crop(self) -> int:
        """Side of the source region (px) under one HQ crop."""
        return self.hq_size * self.pre_downsample

    @property
    def min_side(self) -> int:
        """Smallest short side (px) a source must have to be used."""
        return max(self.source_crop, self.min_source_size)

    def pixel_key(self) -> dict:
        """The fields that decide the pixels of a pair with a given id (K and the size floor do not)."""
        return {"pre_downsample": self.pre_downsample, "hq_size": self.hq_size, "lq_factor": self.lq_factor, "seed": self.seed}

    @classmethod
    def from_preset(cls, preset: str | object = "tiny", **overrides) -> "PairSpec":
        """The recipe spec at a preset's sizes (a Preset or its name); keyword overrides replace fields.

        Refuses a size whose LQ the preset's VAE cannot encode (not a multiple of its pixels per latent cell).
        """
        if isinstance(preset, str):
            preset = get_preset(preset)
        base = dict(pre_downsample=preset.pre_downsample, hq_size=preset.hq_size, lq_factor=preset.lq_factor)
        base.update({k: v for k, v in overrides.items() if v is not None})
        spec = cls(**base)
        spec.check_encodable(preset.spatial_factor, f"the {preset.name} VAE")
        return spec

    def check_encodable(self, factor: int, vae: str = "the VAE") -> None:
        """ValueError unless the LQ side is a multiple of factor (the VAE's pixels per latent cell)."""
        if self.lq_size % factor:
            step = factor * self.lq_factor
            near = " or ".join(str(v) for v in (self.hq_size // step * step, (self.hq_size // step + 1) * step) if v)
            raise ValueError(
                f"crop size {self.hq_size} px gives LQ {self.lq_size} px, not a multiple of {factor} ({vae}'s pixels "
                f"per latent), so it cannot be encoded; use a multiple of {step}, e.g. {near}"
            )


def manifest_name(shard: tuple[int, int]) -> str:
    """Manifest file name of a shard ('manifest.jsonl' when unsharded)."""
    return MANIFEST if shard[1] == 1 else f"manifest.shard-{shard[0]}-of-{shard[1]}.jsonl"


def report_name(shard: tuple[int, int]) -> str:
    """Report file name of a shard ('report.json' when unsharded)."""
    return "report.json" if shard[1] == 1 else f"report.shard-{shard[0]}-of-{shard[1]}.json"


def pair_id(source_rel: str, crop_index: int, seed: int) -> str:
    """Deterministic id of crop ``crop_index`` of a source (path relative to the source folder) under a seed."""
    h = hashlib.sha256(f"{source_rel}\0{crop_index}\0{seed}".encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", Path(source_rel).stem).strip("_")[:40] or "img"
    return f"{stem}-{crop_index}-{h}"


def folder_tag(folder: str | os.PathLike) -> str:
    """A short name for a photo folder, unique to it: its name and 8 hex digits of its resolved path's sha256."""
    # The name alone is not enough: two cameras' DCIM folders, or '.', would share a work folder and mix their pairs.
    path = Path(folder).expanduser().resolve()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name).strip("._") or "photos"
    return f"{name}-{hashlib.sha256(str(path).encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def source_digest(path: str | os.PathLike) -> str:
    """A file's fingerprint for telling two photos under one name apart: sha256 of its size, first and last 64 KiB.

    Two reads per file, however large: a rerun over thousands of photos stays quick. A copy or a move keeps it.
    """
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 16))
        if size > 1 << 16:
            f.seek(max(1 << 16, size - (1 << 16)))
            h.update(f.read(1 << 16))
    return h.hexdigest()[:16]


def crop_box(source_size: tuple[int, int], spec: PairSpec, source_rel: str, crop_index: int) -> tuple[int, int, int, int]:
    """Crop box (left, top, right, bottom) in source pixels of crop ``crop_index``; offsets aligned to pre_downsample."""
    w, h = source_size
    f, s = spec.pre_downsample, spec.hq_size
    wd, hd = w // f, h // f  # size of the area-downsampled source
    if wd < s or hd < s:
        raise ValueError(f"{source_rel}: {w}x{h} is too small for a {s} px crop after {f}x area downsample")
    digest = hashlib.sha256(f"crop\0{spec.seed}\0{source_rel}\0{crop_index}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    top, left = int(rng.integers(0, hd - s + 1)), int(rng.integers(0, wd - s + 1))
    return (left * f, top * f, (left + s) * f, (top + s) * f)


def cut_pair(source: np.ndarray, box: tuple[int, int, int, int], spec: PairSpec) -> tuple[np.ndarray, np.ndarray]:
    """HQ and LQ uint8 arrays of one crop box of an H x W x 3 uint8 source (the recipe, exact box averages)."""
    left, top, right, bottom = box
    region = torch.from_numpy(source[top:bottom, left:right].copy()).permute(2, 0, 1)[None]  # source may be read-only
    # Averaging 0..255 integers in float32 is exact (sums of <= 2**16 terms of <= 255, power-of-two divisors),
    # so HQ is round(mean) exactly; LQ is averaged from the unrounded HQ: the exact mean over the source.
    hq = area_downsample(region.float(), spec.pre_downsample)
    lq = area_downsample(hq, spec.lq_factor)

    def u8(x: torch.Tensor) -> np.ndarray:
        return x[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()

    return u8(hq), u8(lq)


# ------------------------------------------------------------------------------------------------------------
# manifest
# ------------------------------------------------------------------------------------------------------------


def _inside(value: object, folder: str) -> bool:
    """Whether a manifest path is a plain relative path under folder/ of the pair set (no absolute path, no ..)."""
    if not isinstance(value, str) or "\\" in value:
        return False
    parts = PurePosixPath(value).parts
    return len(parts) >= 2 and parts[0] == folder and not PurePosixPath(value).is_absolute() and ".." not in parts


def check_record(rec: object, where: str) -> dict:
    """rec when it is a pair record whose image paths stay inside the pair set; else ValueError naming where.

    Readers open ``root / rec["hq"]``: an absolute path or one with ``..`` would read a file outside the pair set.
    """
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: not a pair record (a JSON {type(rec).__name__}, not an object)")
    for key, kind in (("id", str), ("source", str), ("crop", int), ("hq", str), ("lq", str)):
        if not isinstance(rec.get(key), kind) or isinstance(rec.get(key), bool):
            raise ValueError(f"{where}: not a pair record ({key!r} missing or not a {kind.__name__})")
    for key in ("hq", "lq"):
        if not _inside(rec[key], key):
            raise ValueError(f"{where}: {key} path {rec[key]!r} is not inside the pair set's {key}/ folder; "
                             "refusing to read it")
    return rec


def _parse_lines(path: Path) -> list[dict]:
    """Records of one manifest file; a torn last line (no newline, or not JSON) is ignored.

    A complete line that is JSON but not a pair record, or names an image outside the pair set, is an error.
    """
    data = path.read_bytes()
    records = []
    lines = data.split(b"\n")
    complete = lines[:-1]  # the part after the last newline is either empty or a torn write
    for n, line in enumerate(complete):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{path}: line {n + 1} is not valid JSON; ignored", SkippedInputWarning, stacklevel=3)
            continue
        records.append(check_record(rec, f"{path}: line {n + 1}"))
    return records


def manifest_files(root: str | os.PathLike) -> list[Path]:
    """All manifest files of a pair set (unsharded first, then shards by name)."""
    root = Path(root)
    return [p for p in [root / MANIFEST] if p.is_file()] + sorted(root.glob("manifest.shard-*-of-*.jsonl"))


def read_manifest(root: str | os.PathLike) -> list[dict]:
    """Every pair record of a pair set (all shards merged, one per id), sorted by (source, crop index)."""
    root = Path(root)
    files = manifest_files(root)
    if not files:
        raise FileNotFoundError(f"{root}: no manifest.jsonl (not a pair set, or nothing built yet)")
    seen: dict[str, dict] = {}
    for path in files:
        for rec in _parse_lines(path):
            seen.setdefault(rec["id"], rec)
    return sorted(seen.values(), key=lambda r: (r["source"], r["crop"]))


def _repair_tail(path: Path) -> None:
    """Cut a torn last line (left by a kill mid-append) so the next append starts on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


class _ManifestWriter:
    """Appends whole lines to one manifest file, holding an exclusive lock so two runs of a shard never interleave."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = open(path, "ab")

        def busy() -> str:
            self.f.close()
            return (f"{path}: another build is writing this pair set right now; wait for it to finish or use "
                    "another OUT folder")

        # Not POSIX: no lock, the per-shard files still keep machines apart.
        lock_exclusive(self.f, busy)
        _repair_tail(path)

    def append(self, records: Iterable[dict]) -> None:
        data = b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in records)
        if data:
            # One write of whole lines, flushed: a kill -9 keeps it (the kernel has it). No fsync: the PNGs are
            # not fsynced either, so it would cost time without making a power cut safe.
            self.f.write(data)
            self.f.flush()

    def close(self) -> None:
        self.f.close()


# ------------------------------------------------------------------------------------------------------------
# builder
# ------------------------------------------------------------------------------------------------------------


@dataclass
class _Task:
    src_root: str
    rel: str
    out: str
    spec: PairSpec
    crops: list[int]  # crop indices whose PNGs to write
    new: list[int]  # of those, the ones that still need a manifest line
    digest: str | None  # source_digest of the file when listed (None: unreadable; the decode reports why)


def _cut_and_write(img, size: tuple[int, int], task: "_Task", result: dict) -> None:
    """Cut the task's crops out of a decoded source and write their PNGs; manifest records go into result."""
    w, h = size
    out = Path(task.out)
    for k in task.crops:
        t1 = time.perf_counter()
        box = crop_box((w, h), task.spec, task.rel, k)
        # Only the crop's region leaves Pillow (no full-image array): the cut costs little next to the decode.
        region, note = rgb8(img, box)
        hq, lq = cut_pair(region, (0, 0, box[2] - box[0], box[3] - box[1]), task.spec)
        t2 = time.perf_counter()
        result["note"] = note
        pid = pair_id(task.rel, k, task.spec.seed)
        save_image(hq, out / "hq" / f"{pid}.png")
        save_image(lq, out / "lq" / f"{pid}.png")
        result["cut_s"] += t2 - t1
        result["write_s"] += time.perf_counter() - t2
        if k in task.new:
            result["records"].append({
                "id": pid, "source": task.rel, "crop": k, "source_size": [w, h], "box": list(box),
                "source_digest": task.digest, "hq": f"hq/{pid}.png", "lq": f"lq/{pid}.png",
                "spec": asdict(task.spec), "seed": task.spec.seed, "note": note,
            })


def _process_source(task: _Task) -> dict:
    """Decode one source and write its missing crops; never raises for bad input (returns a reason)."""
    t0 = time.perf_counter()
    result: dict = {"source": task.rel, "records": [], "skipped": None, "note": "", "decode_s": 0.0, "cut_s": 0.0, "write_s": 0.0}
    try:
        with open_image(Path(task.src_root) / task.rel) as img:
            result["decode_s"] = time.perf_counter() - t0
            w, h = img.size
            if min(h, w) < task.spec.min_side:
                result["skipped"] = f"too small: {w}x{h}, the spec needs a short side of at least {task.spec.min_side} px"
                return result
            _cut_and_write(img, (w, h), task, result)
    except ImageLoadError as e:
        prefix = f"{Path(task.src_root) / task.rel}: "
        result["skipped"] = str(e)[len(prefix):] if str(e).startswith(prefix) else str(e)  # the report names the file
    except Exception as e:  # a batch job never stops on one file; the reason names the error
        result["skipped"] = f"unexpected error while processing ({type(e).__name__}: {e})"
    return result


def _exit_with_parent(parent: int) -> None:
    """End this worker process as soon as the build process that started it dies (kill -9, the OOM killer).

    Otherwise a worker waits for tasks forever, holding a decoded photo's memory (GBs at 100 Mpx).
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1  # SIGKILL when the thread that started us ends: build_pairs' thread, until the pool closes
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    else:
        import threading

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="ldlib-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _worker_init(parent: int) -> None:
    _exit_with_parent(parent)
    # Parallelism is across processes; one intra-op thread each avoids oversubscribing the cores.
    torch.set_num_threads(1)


@contextlib.contextmanager
def _single_thread():
    """Run torch on one intra-op thread inside the block, then restore the caller's setting.

    The per-crop ops are small (about 1 M elements): on a busy machine two OpenMP threads make them ~10x slower
    (measured 120 ms vs 12 ms per 512 px crop), so the in-process build uses one thread like the worker processes.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _other_build_running(out: Path, own: Path) -> bool:
    """Whether another build holds the lock of one of OUT's manifest files (other than own)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locks to ask
        return False
    for path in manifest_files(out):
        if path == own:
            continue
        with open(path, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
    return False


def _check_pairset(out: Path, spec: PairSpec, own_manifest: Path) -> None:
    """Record the spec's pixel key in OUT, or refuse when OUT holds pairs (or a running build) of another one.

    A folder that lists no pair (the skeleton of a build that found no usable photo) takes the new spec.
    """
    path = out / PAIRSET_JSON
    want = {"format": FORMAT_VERSION, "spec": spec.pixel_key()}
    if path.is_file():
        have = json.loads(path.read_text())
        if have.get("spec") == want["spec"]:
            return
        holds_pairs = bool(manifest_files(out)) and bool(read_manifest(out))
        if holds_pairs or _other_build_running(out, own_manifest):
            raise ValueError(
                f"{out} holds pairs built with {have.get('spec')}, not {want['spec']}; use another OUT folder"
            )
    atomic_write_bytes(path, json.dumps(want, indent=2, sort_keys=True).encode() + b"\n")


def _remove_stale_temps(out: Path) -> int:
    """Delete hidden temporary files a killed run left in hq/ and lq/ (only safe while no other shard writes)."""
    n = 0
    for sub in ("hq", "lq"):
        for p in (out / sub).glob(".*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
    return n


def build_pairs(
    src: str | os.PathLike,
    out: str | os.PathLike,
    spec: PairSpec = PairSpec(),
    workers: int | None = None,
    shard: tuple[int, int] | str | None = None,
    progress: bool = True,
) -> dict:
    """Build (or resume) a pair set from a folder of photos into out; returns the report (also in report.json).

    ``workers``: processes (None: CPU count; 1: in this process). ``shard``: (i, N) or 'i/N'. Bad files are
    skipped with a reason and a SkippedInputWarning; the caller decides what zero pairs means.
    """
    t_start = time.perf_counter()
    src, out = Path(src).resolve(), Path(out).resolve()
    shard = parse_shard(shard)
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    files, not_listed = walk_files(src)  # raises FileNotFoundError naming src
    files = [p for p in files if out not in p.resolve().parents]  # never read our own output as sources
    rels = [p.relative_to(src).as_posix() for p in files]
    mine = [r for r in rels if in_shard(r, shard)]
    not_listed = [s for s in not_listed if in_shard(s["source"], shard)]
    for item in not_listed:
        warnings.warn(f"{src / item['source']}: skipped: {item['reason']}", SkippedInputWarning, stacklevel=2)

    writable_folder(out)  # one line naming OUT when it is a file or not writable
    manifest = out / manifest_name(shard)
    new_manifest = not manifest.exists()
    writer = _ManifestWriter(manifest)  # first: the loser of two builds stops here, having written nothing
    try:
        _check_pairset(out, spec, manifest)
    except BaseException:
        writer.close()
        if new_manifest and manifest.stat().st_size == 0:
            manifest.unlink()
        raise
    for sub in ("hq", "lq"):
        (out / sub).mkdir(exist_ok=True)
    try:
        stale = _remove_stale_temps(out) if shard[1] == 1 else 0
        records = {r["id"]: r for r in read_manifest(out)} if manifest_files(out) else {}
        listed = set(records)
        tasks, complete, changed = [], 0, []
        for rel in mine:
            ids = [pair_id(rel, k, spec.seed) for k in range(spec.crops_per_image)]
            try:
                digest = source_digest(src / rel)
            except OSError:
                digest = None
            # Ids come from the relative path: a different file under the same path would pass for the one whose
            # pairs are listed, and a missing crop would be cut from it. (Manifests before the digest have none.)
            then = {records[p].get("source_digest") for p in ids if p in records} - {None}
            if digest is not None and then and then != {digest}:
                changed.append({"source": rel, "reason": "not the file its pairs were cut from (another photo under "
                                "this name, or edited since); its pairs are kept: build it into another OUT folder"})
                warnings.warn(f"{src / rel}: skipped: {changed[-1]['reason']}", SkippedInputWarning, stacklevel=2)
                continue
            have = [
                pid in listed and (out / "hq" / f"{pid}.png").is_file() and (out / "lq" / f"{pid}.png").is_file()
                for pid in ids
            ]
            if all(have):
                complete += 1
                continue
            crops = [k for k in range(spec.crops_per_image) if not have[k]]
            new = [k for k in crops if ids[k] not in listed]
            tasks.append(_Task(str(src), rel, str(out), spec, crops, new, digest))

        from tqdm.auto import tqdm

        n_workers = max(1, min(workers, len(tasks)))
        bar = tqdm(total=len(tasks), desc=f"pairs {shard[0]}/{shard[1]}" if shard[1] > 1 else "pairs", unit="img", disable=not progress)
        not_listed += changed  # skipped before any work, like the files never listed
        skipped, converted = list(not_listed), []
        built = 0
        timings = {"decode_s": 0.0, "cut_s": 0.0, "write_s": 0.0}

        def consume(res: dict) -> None:
            nonlocal built
            writer.append(res["records"])  # only after both PNGs of every record are in place
            built += len(res["records"])
            for k in timings:
                timings[k] += res[k]
            if res["skipped"]:
                skipped.append({"source": res["source"], "reason": res["skipped"]})
                warnings.warn(f"{src / res['source']}: skipped: {res['skipped']}", SkippedInputWarning, stacklevel=3)
            elif res["note"]:
                converted.append({"source": res["source"], "note": res["note"]})
                warnings.warn(f"{src / res['source']}: {res['note']}", SkippedInputWarning, stacklevel=3)
            bar.update(1)

        if n_workers == 1:
            with _single_thread():
                for task in tasks:
                    consume(_process_source(task))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: forking a process that already runs torch's thread pools can deadlock.
            ctx = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),))
            with pool:
                for res in pool.map(_process_source, tasks):  # ordered: the manifest order is deterministic
                    consume(res)
        bar.close()
    finally:
        writer.close()

    total = len(read_manifest(out))
    used = len(tasks) - (len(skipped) - len(not_listed))
    report = {
        "source_folder": str(src),
        "out": str(out),
        "spec": asdict(spec),
        "shard": list(shard),
        "workers": n_workers,
        "files_listed": len(rels),
        "files_in_shard": len(mine),
        "sources_already_complete": complete,
        "sources_used": used,
        "sources_skipped": len(skipped),
        "pairs_built": built,
        "pairs_total": total,
        "stale_temp_files_removed": stale,
        "skipped": skipped,
        "converted": converted,
        "alpha": "composited on white",
        "timings": {
            "total_s": round(time.perf_counter() - t_start, 4),
            **{k: round(v, 4) for k, v in timings.items()},
            "per_source_s": round((time.perf_counter() - t_start) / max(1, len(tasks)), 4),
        },
    }
    atomic_write_bytes(out / report_name(shard), json.dumps(report, indent=2).encode() + b"\n")
    return report


def format_report(report: dict, max_lines: int = 12) -> str:
    """One screen of text summarising a build report."""
    t = report["timings"]
    lines = [
        f"pair set {report['out']}  (shard {report['shard'][0]}/{report['shard'][1]}, {report['workers']} worker(s))",
        f"  spec: {report['spec']}",
        f"  files: {report['files_listed']} listed, {report['files_in_shard']} in this shard, "
        f"{report['sources_already_complete']} already complete, {report['sources_used']} used, "
        f"{report['sources_skipped']} skipped",
        f"  pairs: {report['pairs_built']} built now, {report['pairs_total']} in the set",
        f"  time: {t['total_s']:.1f} s (decode {t['decode_s']:.1f} s, cut {t['cut_s']:.1f} s, write {t['write_s']:.1f} s)",
    ]
    for kind, key, what in (("skipped", "skipped", "reason"), ("converted", "converted", "note")):
        items = report[key]
        if items:
            lines.append(f"  {kind}:")
            lines += [f"    {it['source']}: {it[what]}" for it in items[:max_lines]]
            if len(items) > max_lines:
                lines.append(f"    ... and {len(items) - max_lines} more (see report.json)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# splitting and looking
# ------------------------------------------------------------------------------------------------------------


def split_by_source(records: Sequence[dict], val_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train ids, val ids): whole source images go to validation, never single crops; deterministic from seed.

    The sorted source list is permuted with ``seed``; the first ``round(val_fraction * n)`` sources (at least one
    when ``0 < val_fraction`` and there are two or more sources) are held out.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    sources = sorted({r["source"] for r in records})
    n_val = int(round(val_fraction * len(sources)))
    if val_fraction > 0 and len(sources) >= 2:
        n_val = min(max(n_val, 1), len(sources) - 1)
    order = np.random.default_rng(seed).permutation(len(sources))
    val_sources = {sources[i] for i in order[:n_val]}
    train = [r["id"] for r in records if r["source"] not in val_sources]
    val = [r["id"] for r in records if r["source"] in val_sources]
    return train, val


def plot_pairs(root: str | os.PathLike, source_root: str | os.PathLike, n: int = 4, thumb: int = 256):
    """A matplotlib figure, one row per pair: source thumbnail with the crop box drawn, HQ, LQ."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    root, source_root = Path(root), Path(source_root)
    records = read_manifest(root)
    # One pair per source first, so the rows show different photos.
    firsts = [r for r in records if r["crop"] == 0] or records
    picked = (firsts + [r for r in records if r not in firsts])[:n]
    fig, axes = plt.subplots(len(picked), 3, figsize=(9, 3 * len(picked)), squeeze=False)
    for row, r in zip(axes, picked):
        source, _ = load_rgb8(source_root / r["source"])
        step = max(1, max(source.shape[:2]) // thumb)  # a strided thumbnail is enough to see where the crop is
        row[0].imshow(source[::step, ::step])
        left, top, right, bottom = r["box"]
        row[0].add_patch(Rectangle((left / step, top / step), (right - left) / step, (bottom - top) / step,
                                   fill=False, edgecolor="red", linewidth=2))
        row[0].set_title(f"{r['source']} {r['source_size'][0]}x{r['source_size'][1]}", fontsize=8)
        for ax, key in zip(row[1:], ("hq", "lq")):
            img = load_rgb8(root / r[key])[0]
            ax.imshow(img, interpolation="nearest")
            ax.set_title(f"{key.upper()} {img.shape[1]}x{img.shape[0]}", fontsize=8)
        for ax in row:
            ax.set_axis_off()
    fig.tight_layout()
    return fig
