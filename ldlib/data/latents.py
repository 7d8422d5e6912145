"""Latent cache: the normalised latents of every LQ (or HQ) of a pair set, in safetensors shards keyed by pair id.

Layout of a cache folder (default ``PAIRS/latents/<preset>``; HQ latents: ``PAIRS/latents_hq/<preset>``)::

    identity.json                     the codec's identity (``Codec.identity()``), the pair set's spec and which
                                      image of each pair was encoded (``image``: lq | hq; absent: lq)
    latents-<tag>-<hash>.safetensors  one file per chunk of pairs: tensor name = pair id, C x h x w float32;
                                      the same identity and image are in each file's metadata

A pair id names the LQ latent in one cache and the HQ latent in the other, so a cache holds one image of the pairs
only: every reader says which one it wants (``LatentCache(folder, image="hq")``; default lq), and a cache, or one
of its files, of the other image is refused, as is encoding one image into the other's cache.

A cache holds latents of one codec only: opening it with another codec's identity, or finding a shard whose
metadata names another codec, raises ValueError. Shards are written to a hidden temporary name and renamed, so a
killed run loses at most the chunk in flight; a rerun encodes only ids that no shard holds. ``--shard i/N`` runs
take the ids with ``sha256(id) % N == i`` and name their files with ``<tag> = i-of-N``, so they never collide.
identity.json is written with the first shard, so a run that fails before it leaves no cache that could refuse
or confuse a later one; a folder with an identity.json but no shard is not a cache and is taken over.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from ..core.files import ShardedTensors, atomic_write_bytes, in_shard, parse_shard, shard_files, write_tensor_shard
from ..core.images import load_image
from ..core.runs import default_device
from .pairs import PAIRSET_JSON, read_manifest


IDENTITY_JSON = "identity.json"
IMAGES = ("lq", "hq")  # which image of a pair a cache holds the latents of
# What must agree for two latents to be interchangeable; "source" (a path or hub id) may differ for the same weights.
IDENTITY_KEYS = ("family", "latent_channels", "spatial_factor", "encoder_sha256")


def same_codec(a: dict, b: dict) -> bool:
    """Whether two codec identities give interchangeable latents."""
    return all(a.get(k) == b.get(k) for k in IDENTITY_KEYS)


def default_cache_dir(pairs_root: str | os.PathLike, preset_name: str, image: str = "lq") -> Path:
    """Where `encode` puts a preset's latents by default: PAIRS/latents/<preset> (HQ: PAIRS/latents_hq/<preset>)."""
    return Path(pairs_root) / ("latents" if _image(image) == "lq" else "latents_hq") / preset_name


def _image(image: str) -> str:
    if image not in IMAGES:
        raise ValueError(f"image must be one of {' | '.join(IMAGES)}, got {image!r}")
    return image


def cache_image(info_or_meta: dict) -> str:
    """Which image of the pairs a cache's identity.json (or a shard's metadata) holds latents of; lq when unsaid."""
    return info_or_meta.get("image") or "lq"


def _other_image(folder: Path, have: str, want: str, fix: str) -> str:
    return (f"{folder}: holds latents of the pairs' {have.upper()} images, not of their {want.upper()} images; "
            f"LQ and HQ latents of a pair set are never mixed: {fix}")


class LatentCache:
    """Read access to a latent cache folder: ``id in cache``, ``cache.get(id)`` -> C x h x w, ``cache.get_many``.

    ``expect`` (a codec identity dict or a Codec) makes opening fail unless the cache holds that codec's latents;
    ``image`` (lq | hq) unless it holds the latents of that image of the pairs. Handles are opened lazily per
    process, so the object can go into DataLoader workers.
    """

    def __init__(self, folder: str | os.PathLike, expect: "dict | object | None" = None, image: str = "lq") -> None:
        self.folder = Path(folder)
        path = self.folder / IDENTITY_JSON
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder}: no {IDENTITY_JSON} (not a latent cache)")
        self.info: dict = json.loads(path.read_text())
        self.identity: dict = self.info["identity"]
        self.image = cache_image(self.info)
        if self.image != _image(image):
            flag = "--hq-latents" if image == "hq" else "--latents"
            raise ValueError(_other_image(self.folder, self.image, image, fix=(
                f"point {flag} at a cache of the {image.upper()} images, or make one with `python -m ldlib encode "
                f"PAIRS --image {image}`")))
        if expect is not None:
            want = expect if isinstance(expect, dict) else expect.identity()
            if not same_codec(self.identity, want):
                # A reader (train-decoder, evaluate, teacher): the fix is the cache it reads, not an output folder.
                raise ValueError(_mismatch(self.folder, self.identity, want, fix=(
                    "point --latents at this VAE's cache, or make one with `python -m ldlib encode PAIRS --preset "
                    "PRESET`")))
        self._shards = ShardedTensors()
        self.refresh()

    def refresh(self) -> None:
        """Re-scan the shard files (headers only)."""

        def check(shard: Path, meta: dict) -> None:
            ident = json.loads(meta.get("identity", "{}"))
            if not same_codec(ident, self.identity):
                raise ValueError(
                    f"{shard}: holds latents of another codec ({_describe(ident)}), this cache is "
                    f"{_describe(self.identity)}; remove the file or use another folder"
                )
            if cache_image(meta) != self.image:
                raise ValueError(_other_image(shard, cache_image(meta), self.image,
                                              fix="remove the file or use another folder"))

        # The first file by name wins; duplicates (a rerun racing a shard) hold the same latent.
        self._shards.scan(shard_files(self.folder), check)

    def __contains__(self, pair_id: object) -> bool:
        return pair_id in self._shards

    def __len__(self) -> int:
        return len(self._shards)

    @property
    def ids(self) -> set[str]:
        """Pair ids with a latent in the cache."""
        return self._shards.names

    def get(self, pair_id: str) -> torch.Tensor:
        """The C x h x w normalised latent of a pair id."""
        if pair_id not in self._shards:
            raise KeyError(f"{self.folder}: no latent for pair {pair_id!r}")
        return self._shards.get(pair_id)

    def get_many(self, ids: Sequence[str]) -> torch.Tensor:
        """N x C x h x w latents of several pair ids, in order."""
        return torch.stack([self.get(i) for i in ids])


def _describe(ident: dict) -> str:
    sha = str(ident.get("encoder_sha256", "?"))[:12]
    return f"{ident.get('family')} {ident.get('latent_channels')}ch encoder {sha} from {ident.get('source')!r}"


def _mismatch(folder: Path, have: dict, want: dict, fix: str = "use another --out folder") -> str:
    """One line: the cache holds another codec's latents; ``fix`` says what to do (encode writes: another --out)."""
    return (
        f"{folder}: holds latents of {_describe(have)}, not of the codec given ({_describe(want)}); "
        f"latents of different VAEs are never mixed: {fix}"
    )


def open_cache(folder: str | os.PathLike, identity: dict, pairset: dict, image: str = "lq") -> LatentCache | None:
    """The cache at folder to add latents of identity to, or None when it holds no latent yet (nothing to keep).

    Refuses a cache holding latents of another codec, pair set or image (lq | hq). An identity.json without any
    latent file (a first run that failed before its first shard, with versions that wrote it first) is not a cache:
    it is replaced.
    """
    folder = Path(folder)
    path = folder / IDENTITY_JSON
    if not path.is_file() or not shard_files(folder):
        return None
    info = json.loads(path.read_text())
    if not same_codec(info["identity"], identity):
        raise ValueError(_mismatch(folder, info["identity"], identity))
    if cache_image(info) != image:
        raise ValueError(_other_image(folder, cache_image(info), image, fix="use another --out folder"))
    if info.get("pairset") != pairset:
        raise ValueError(f"{folder}: holds latents of pairs cut with {info.get('pairset')}, not {pairset}")
    return LatentCache(folder, image=image)


def encode_pairs(
    pairs_root: str | os.PathLike,
    codec,
    out: str | os.PathLike,
    batch_size: int = 16,
    shard_size: int = 512,
    shard: tuple[int, int] | str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    image: str = "lq",
) -> dict:
    """Encode every LQ (``image="hq"``: every HQ) of a pair set that the cache at out lacks; returns counts
    (encoded, already cached, total).

    Batched, without gradients, on ``device`` (default: CUDA when present; the codec is moved there). Every ``shard_size`` pairs become one
    safetensors file, written atomically: a killed run resumes at the first chunk not on disk.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    image = _image(image)
    pairs_root = Path(pairs_root)
    shard = parse_shard(shard)
    records = [r for r in read_manifest(pairs_root) if in_shard(r["id"], shard)]
    pairset = json.loads((pairs_root / PAIRSET_JSON).read_text())["spec"] if (pairs_root / PAIRSET_JSON).is_file() else {}
    identity = codec.identity()
    cache = open_cache(out, identity, pairset, image)
    todo = [r for r in records if cache is None or r["id"] not in cache]
    device = torch.device(device) if device is not None else default_device()
    codec = codec.to(device).eval()
    meta = {"identity": json.dumps(identity, sort_keys=True), "pairset": json.dumps(pairset, sort_keys=True),
            "image": image}

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"encode {image.upper()}", unit="pair", disable=not progress)
    written = []
    for start in range(0, len(todo), shard_size):
        chunk = todo[start : start + shard_size]
        tensors: dict[str, torch.Tensor] = {}
        for b in range(0, len(chunk), batch_size):
            batch = chunk[b : b + batch_size]
            images = [load_image(pairs_root / r[image]) for r in batch]
            side = pairset["hq_size"] // (pairset["lq_factor"] if image == "lq" else 1) if pairset else None
            want = images[0].shape[-2:] if not pairset else (side, side)
            for r, im in zip(batch, images):  # a replaced PNG of another size: name it, not torch.cat's shapes
                if im.shape[-2:] != want:
                    raise ValueError(f"{pairs_root / r[image]}: {image.upper()} image is {im.shape[-1]}x{im.shape[-2]} "
                                     f"px, the pair set's {image.upper()} size is {want[1]}x{want[0]}")
            lq = torch.cat(images).to(device)
            with torch.inference_mode():
                z = codec.encode(lq).float().cpu()
            for r, zi in zip(batch, z):
                tensors[r["id"]] = zi.contiguous()
            bar.update(len(batch))
        if cache is None and not written:  # with the first shard: a run that fails before it leaves no cache behind
            info = {"identity": identity, "pairset": pairset, "dtype": "float32", "image": image}
            atomic_write_bytes(Path(out) / IDENTITY_JSON, json.dumps(info, indent=2, sort_keys=True).encode() + b"\n")
        prefix = "latents" if image == "lq" else "latents-hq"
        written.append(write_tensor_shard(out, prefix, shard, tensors, meta).name)
    bar.close()
    if cache is None and written:
        cache = LatentCache(out, image=image)
    elif cache is not None:
        cache.refresh()
    return {
        "out": str(out),
        "identity": identity,
        "image": image,
        "device": str(device),
        "shard": list(shard),
        "pairs_in_shard": len(records),
        "already_cached": len(records) - len(todo),
        "encoded": len(todo),
        "files_written": written,
        "cached_total": len(cache) if cache is not None else 0,
    }
