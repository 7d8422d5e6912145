"""The torch Datasets the training loops read: pairs of a pair set on disk (with their cached latents), in-memory pairs.

``PairDataset(PAIRS, latents=PAIRS/"latents"/PRESET)`` serves ``id``, ``source``, ``hq``, ``lq`` and ``latent`` per pair
(images in [-1, 1]), and ``hq_latent`` with ``hq_latents=`` (a cache of the HQ images' latents);
``.split(val_fraction, seed)`` holds out whole source photos. ``TensorPairs`` holds pairs in
memory (tests, quick experiments); ``collate_pairs`` batches either kind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from ..core.images import area_downsample, load_image, load_rgb8, to_tensor
from ..core.samples import sample_paths
from .latents import LatentCache
from .pairs import PAIRSET_JSON, read_manifest, split_by_source


class PairDataset(torch.utils.data.Dataset):
    """The pairs of a pair set as a torch Dataset.

    ``PairDataset(root, ids=None, latents=None)``; item ``i`` is a dict:
    ``id`` (str), ``source`` (str, path relative to the source folder), ``hq`` (3 x S x S float in [-1, 1]),
    ``lq`` (3 x S/f x S/f float in [-1, 1]) and, when ``latents`` (a folder or LatentCache) is given,
    ``latent`` (C x h x w normalised latent of that LQ); when ``hq_latents`` is given, ``hq_latent`` (the HQ's,
    C x 2h x 2w at lq_factor 2). Each cache must hold latents of its own image of the pairs (LatentCache's
    ``image``). ``records`` holds the manifest lines in item order; ``split(val_fraction, seed)`` returns (train,
    val) datasets split by source image.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        ids: Sequence[str] | None = None,
        latents: "str | os.PathLike | object | None" = None,
        load_images: bool = True,
        hq_latents: "str | os.PathLike | object | None" = None,
    ) -> None:
        self.root = Path(root)
        records = read_manifest(self.root)
        if ids is not None:
            by_id = {r["id"]: r for r in records}
            missing = [i for i in ids if i not in by_id]
            if missing:
                raise KeyError(f"{self.root}: {len(missing)} ids not in the pair set, e.g. {missing[0]!r}")
            records = [by_id[i] for i in ids]
        self.records: list[dict] = records
        self.load_images = load_images
        self.latents = self._cache(latents, "lq")
        self.hq_latents = self._cache(hq_latents, "hq")

    def _cache(self, latents, image: str) -> LatentCache | None:
        """The latent cache of one image of the pairs, checked: that image, this pair set's cut, every pair there."""
        if latents is None:
            return None
        cache = latents if isinstance(latents, LatentCache) else LatentCache(latents, image=image)
        if cache.image != image:  # a LatentCache opened for the other image
            LatentCache(cache.folder, image=image)  # raises, naming both
        cut = cache.info.get("pairset")
        mine = json.loads((self.root / PAIRSET_JSON).read_text())["spec"] if (self.root / PAIRSET_JSON).is_file() else None
        if cut and mine and cut != mine:
            raise ValueError(f"{cache.folder}: latents of pairs cut with {cut}, this pair set is {mine}")
        absent = [r["id"] for r in self.records if r["id"] not in cache]
        if absent:
            raise KeyError(
                f"{cache.folder}: no latents for {len(absent)} of {len(self.records)} pairs "
                f"(e.g. {absent[0]!r}); run `python -m ldlib encode {self.root}{' --image hq' if image == 'hq' else ''}` first"
            )
        return cache

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> list[str]:
        """Pair ids in item order."""
        return [r["id"] for r in self.records]

    @property
    def sources(self) -> list[str]:
        """Distinct source paths (sorted)."""
        return sorted({r["source"] for r in self.records})

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        item: dict = {"id": r["id"], "source": r["source"]}
        if self.load_images:
            item["hq"] = to_tensor(load_rgb8(self.root / r["hq"])[0])[0]
            item["lq"] = to_tensor(load_rgb8(self.root / r["lq"])[0])[0]
        if self.latents is not None:
            item["latent"] = self.latents.get(r["id"])
        if self.hq_latents is not None:
            item["hq_latent"] = self.hq_latents.get(r["id"])
        return item

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple["PairDataset", "PairDataset"]:
        """(train, val) datasets split by source image (see split_by_source)."""
        train, val = split_by_source(self.records, val_fraction, seed)
        return (
            PairDataset(self.root, train, self.latents, self.load_images, self.hq_latents),
            PairDataset(self.root, val, self.latents, self.load_images, self.hq_latents),
        )


class TensorPairs(torch.utils.data.Dataset):
    """In-memory pairs: item i is {"latent": latents[i], "hq": hq[i]} (and "lq" when given)."""

    def __init__(self, latents: torch.Tensor, hq: torch.Tensor, lq: torch.Tensor | None = None) -> None:
        if len(latents) != len(hq) or (lq is not None and len(lq) != len(hq)):
            raise ValueError(f"TensorPairs: {len(latents)} latents but {len(hq)} HQ images")
        self.latents, self.hq, self.lq = latents, hq, lq

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        item = {"latent": self.latents[i], "hq": self.hq[i]}
        if self.lq is not None:
            item["lq"] = self.lq[i]
        return item


@torch.no_grad()
def sample_tensor_pairs(codec, count: int = 8, hq_size: int = 64, seed: int = 0) -> TensorPairs:
    """In-memory pairs from random crops of the bundled sample photos: recipe HQ/LQ (area 0.5x twice), LQ latents."""
    g = torch.Generator().manual_seed(seed)
    paths = sample_paths()
    sources: dict[int, torch.Tensor] = {}
    hqs = []
    for i in range(count):
        k = i % len(paths)
        if k not in sources:
            sources[k] = area_downsample(_even_crop(load_image(paths[k])), 2)
        src = sources[k]
        h, w = src.shape[-2:]
        top = int(torch.randint(0, h - hq_size + 1, (), generator=g)) // 2 * 2
        left = int(torch.randint(0, w - hq_size + 1, (), generator=g)) // 2 * 2
        hqs.append(src[..., top : top + hq_size, left : left + hq_size])
    hq = torch.cat(hqs)
    lq = area_downsample(hq, 2)
    return TensorPairs(codec.encode(lq).float(), hq, lq)


def _even_crop(x: torch.Tensor) -> torch.Tensor:
    return x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]


def collate_pairs(items: list[dict]) -> dict:
    """Stack the tensors of dataset items (latent, hq, hq_latent) into a batch; pair ids (when present) stay a list."""
    out = {k: torch.stack([it[k] for it in items]) for k in ("latent", "hq", "hq_latent") if k in items[0]}
    if "id" in items[0]:
        out["id"] = [it["id"] for it in items]
    return out
