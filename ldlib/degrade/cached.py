"""Cached teacher outputs as the degradation (``teacher:DIR``): a usable record of each sample's pair, by id."""

from __future__ import annotations

import os
from typing import Sequence

import torch

from ..data.latents import same_codec
from ..data.teacher_data import TeacherSet


class CachedTeacher:
    """Cached teacher outputs as the degradation (``teacher:DIR``, data from ``python -m ldlib teacher``).

    Per sample, one of its pair's teacher records with sigma_min <= sigma <= sigma_max is drawn with the sample's
    generator; the record's own sigma is the sample's sigma. A pair with no such record (e.g. a held-out photo) is
    used clean (sigma 0); ``coverage`` says how many pairs have one. Needs pair ids.
    """

    def __init__(self, folder: str | os.PathLike, sigma_max: float, codec=None, sigma_min: float = 0.0) -> None:
        self.teacher = TeacherSet(folder)
        if codec is not None and not same_codec(self.teacher.info.get("identity", {}), codec.identity()):
            raise ValueError(f"{folder}: teacher data was made from another codec's latents than this preset's")
        self.by_id: dict[str, list[dict]] = {}
        for r in self.teacher.records:
            if sigma_min <= r["sigma"] <= sigma_max:
                self.by_id.setdefault(r["id"], []).append(r)
        if not self.by_id:
            raise ValueError(f"{folder}: no teacher record has sigma in [{sigma_min}, {sigma_max}]")

    def coverage(self, ids: Sequence[str]) -> float:
        """Share of the given pair ids that have at least one usable teacher record."""
        return sum(i in self.by_id for i in ids) / max(1, len(ids))

    def to(self, device: str | torch.device) -> "CachedTeacher":
        """Nothing to move: targets are read per sample and follow the latents' device; returns self."""
        return self

    def degrade(self, latents: torch.Tensor, sigma, generator=None) -> torch.Tensor:
        """Not available: cached outputs belong to pair ids (use degrade_samples)."""
        raise ValueError("cached teacher data is looked up by pair id: call degrade_samples(..., ids=...)")

    def degrade_samples(
        self, latents: torch.Tensor, sigma: torch.Tensor, generators: Sequence[torch.Generator],
        ids: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher outputs, their sigmas): a random usable record per pair id, or the clean latent and 0."""
        if ids is None:
            raise ValueError("the teacher degrader needs pair ids: train on a pair set (PairDataset)")
        outs, used = [], []
        for z, pair, g in zip(latents, ids, generators):
            recs = self.by_id.get(pair)
            if not recs:
                outs.append(z)
                used.append(0.0)
                continue
            r = recs[int(torch.randint(0, len(recs), (), generator=g))]
            outs.append(self.teacher.target(r["key"]).to(z))
            used.append(float(r["sigma"]))
        return torch.stack(outs), torch.tensor(used)
