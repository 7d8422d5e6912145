"""Teacher data: what the diffusion degrader makes of cached clean latents, stored for training the proxy.

For every (pair id, draw m) a record seed ``sha256(seed/id/m)`` fixes sigma ~ U[0, sigma_max] and the noise eps,
so ``x_sigma = (1 - s) x0 + s eps`` is regenerated from the clean latent instead of stored; only the teacher's
output (the target) is stored. Layout of a teacher folder::

    teacher.json                      spec, codec identity, teacher description (model, steps, prompt), and the
                                      pair set and latent cache it was made from
    teacher-<tag>-<hash>.safetensors  targets, tensor name "<id>#<m>"; metadata "records": JSON list of
                                      {key, id, source, m, seed, sigma, grid}

Shard files are written atomically; a rerun computes only the records no file holds; ``--shard i/N`` takes the
pair ids with ``sha256(id) % N == i`` (the pair builder's rule) and tags its files, so machines never collide.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..core.config import check_finite
from ..core.files import ShardedTensors, atomic_write_bytes, in_shard, parse_shard, shard_files, write_tensor_shard
from ..core.runs import default_device
from .latents import LatentCache
from .pairs import read_manifest


TEACHER_DATA_JSON = "teacher.json"  # a teacher data folder (models.teacher.TEACHER_MODEL_JSON is another file)


@dataclass(frozen=True)
class TeacherSpec:
    """How teacher data is drawn: sigma range (wider than the decoder's), draws per latent, teacher steps, seed."""

    sigma_max: float = field(default=0.3, metadata={"help": "sigma ~ U[0, sigma-max] (wider than the decoder's 0.12)"})
    per_latent: int = field(default=1, metadata={"help": "(sigma, noise) draws per latent"})
    steps: int = field(default=1, metadata={"help": "teacher Euler steps from sigma to 0"})
    prompt: str = field(default="negative", metadata={"help": "negative (Wan's generic negative prompt) | empty | TEXT; "
                                                          "not for a trained teacher (taef2): it has one fixed embedding"})
    seed: int = field(default=0, metadata={"help": "seeds every record's sigma and noise"})

    def __post_init__(self) -> None:
        check_finite(self)
        if not 0.0 < self.sigma_max <= 1.0:
            raise ValueError(f"sigma_max must be in (0, 1], got {self.sigma_max}")
        if self.per_latent < 1 or self.steps < 1:
            raise ValueError(f"per_latent and steps must be >= 1, got {self.per_latent} and {self.steps}")


def record_key(pair_id: str, m: int) -> str:
    """Name of draw m of a pair id in the teacher shards."""
    return f"{pair_id}#{m}"


def record_seed(pair_id: str, m: int, seed: int) -> int:
    """The 63-bit seed of draw m of a pair id: fixes its sigma and noise."""
    digest = hashlib.sha256(f"{seed}/{pair_id}/{m}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def draw_noise(latent: torch.Tensor, rec_seed: int, sigma_max: float) -> tuple[float, torch.Tensor]:
    """(sigma, eps) of a record: sigma ~ U[0, sigma_max] then eps ~ N(0, 1) shaped like latent, from rec_seed."""
    g = torch.Generator().manual_seed(rec_seed)
    sigma = float(torch.rand((), generator=g)) * sigma_max
    eps = torch.randn(latent.shape, generator=g, dtype=torch.float32)
    return sigma, eps


def noised(latent: torch.Tensor, rec_seed: int, sigma_max: float) -> tuple[float, torch.Tensor]:
    """(sigma, x_sigma) of a record, regenerated from the clean latent (C x h x w)."""
    sigma, eps = draw_noise(latent, rec_seed, sigma_max)
    x0 = latent.float().cpu()
    return sigma, (1 - sigma) * x0 + sigma * eps


def describe_teacher(degrader, preset_name: str) -> dict:
    """What produced the targets: preset, transformer source, steps, guidance."""
    model = getattr(degrader, "transformer", None)
    cfg = getattr(model, "config", None)
    return {
        "preset": preset_name,
        "transformer": getattr(cfg, "_name_or_path", None) or preset_name,
        "steps": getattr(degrader, "steps", None),
        "guidance_scale": getattr(degrader, "guidance_scale", None),
    }


class TeacherSet:
    """Read access to a teacher folder: ``records`` (dicts with key, id, m, seed, sigma), ``target(key)``."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        path = self.folder / TEACHER_DATA_JSON
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder}: no {TEACHER_DATA_JSON} (not a teacher data folder)")
        self.info: dict = json.loads(path.read_text())
        self.spec = TeacherSpec(**self.info["spec"])
        self.refresh()

    def refresh(self) -> None:
        """Re-scan the shard files (headers only)."""
        self._targets = ShardedTensors()
        metas = self._targets.scan(shard_files(self.folder, "teacher-*.safetensors"))
        seen: set[str] = set()
        self.records: list[dict] = []
        for meta in metas:
            for rec in json.loads(meta.get("records", "[]")):
                if rec["key"] not in seen:  # the first file holding a key wins, as for its tensor
                    seen.add(rec["key"])
                    self.records.append(rec)
        self.records.sort(key=lambda r: r["key"])

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, key: object) -> bool:
        return key in self._targets

    def target(self, key: str) -> torch.Tensor:
        """The teacher's output (C x h x w) for a record key."""
        if key not in self._targets:
            raise KeyError(f"{self.folder}: no teacher record {key!r}")
        return self._targets.get(key)


class TeacherDataset(torch.utils.data.Dataset):
    """Items ``{key, id, sigma, x0, x_sigma, target}`` of a teacher folder, x_sigma regenerated from the latents."""

    def __init__(self, teacher: TeacherSet | str | os.PathLike, latents=None, ids: Sequence[str] | None = None) -> None:
        self.teacher = teacher if isinstance(teacher, TeacherSet) else TeacherSet(teacher)
        if latents is None:  # the cache the teacher data was made from
            latents = self.teacher.info["latents"]
        self.latents = latents if isinstance(latents, LatentCache) else LatentCache(latents)
        if self.latents.identity.get("encoder_sha256") != self.teacher.info["identity"].get("encoder_sha256"):
            raise ValueError(f"{self.teacher.folder}: teacher data was made from another codec's latents than {self.latents.folder}")
        keep = None if ids is None else set(ids)
        self.records = [r for r in self.teacher.records if keep is None or r["id"] in keep]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        x0 = self.latents.get(r["id"]).float()
        sigma, x_sigma = noised(x0, r["seed"], self.teacher.spec.sigma_max)
        return {
            "key": r["key"],
            "id": r["id"],
            "sigma": torch.tensor(sigma, dtype=torch.float32),
            "x0": x0,
            "x_sigma": x_sigma,
            "target": self.teacher.target(r["key"]).float(),
        }


def generate_teacher(
    pairs_root: str | os.PathLike,
    latents: str | os.PathLike,
    degrader,
    out: str | os.PathLike,
    spec: TeacherSpec = TeacherSpec(),
    teacher_info: dict | None = None,
    batch_size: int = 8,
    shard_size: int = 256,
    shard: tuple[int, int] | str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Run the degrader's denoiser on regenerated x_sigma for every record out lacks; returns counts."""
    from tqdm.auto import tqdm


    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    shard = parse_shard(shard)
    cache = LatentCache(latents)
    source_of = {r["id"]: r["source"] for r in read_manifest(pairs_root) if in_shard(r["id"], shard)}
    ids = list(source_of)
    missing = [i for i in ids if i not in cache]
    if missing:
        raise KeyError(f"{cache.folder}: no latents for {len(missing)} pairs (e.g. {missing[0]!r}); run `encode` first")
    out = Path(out)
    info = {"spec": asdict(spec), "identity": cache.identity, "teacher": teacher_info or {},
            "latents": str(Path(latents).resolve()), "pairs": str(Path(pairs_root).resolve())}
    path = out / TEACHER_DATA_JSON
    if path.is_file():
        have = json.loads(path.read_text())
        if have["spec"] != info["spec"] or have["identity"].get("encoder_sha256") != cache.identity.get("encoder_sha256"):
            raise ValueError(f"{out}: holds teacher data of another spec or codec ({have['spec']}); use another folder")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(info, indent=2, sort_keys=True).encode() + b"\n")
    done = TeacherSet(out)
    todo = [(i, m) for i in ids for m in range(spec.per_latent) if record_key(i, m) not in done]
    device = torch.device(device) if device is not None else default_device()

    bar = tqdm(total=len(todo), desc="teacher", unit="latent", disable=not progress)
    written = []
    for start in range(0, len(todo), shard_size):
        chunk = todo[start : start + shard_size]
        tensors: dict[str, torch.Tensor] = {}
        records: list[dict] = []
        for b in range(0, len(chunk), batch_size):
            batch = chunk[b : b + batch_size]
            seeds = [record_seed(i, m, spec.seed) for i, m in batch]
            drawn = [noised(cache.get(i), s, spec.sigma_max) for (i, _), s in zip(batch, seeds)]
            sigma = torch.tensor([d[0] for d in drawn], dtype=torch.float32, device=device)
            x_sigma = torch.stack([d[1] for d in drawn]).to(device)
            target = degrader.denoise(x_sigma, sigma).float().cpu()
            grid = getattr(degrader, "last_grid", None)
            for k, ((i, m), s) in enumerate(zip(batch, seeds)):
                key = record_key(i, m)
                tensors[key] = target[k].contiguous()
                records.append({"key": key, "id": i, "source": source_of[i], "m": m, "seed": s, "sigma": float(sigma[k]),
                                "grid": grid[k].tolist() if grid is not None else None})
            bar.update(len(batch))
        written.append(write_tensor_shard(out, "teacher", shard, tensors, {"records": json.dumps(records)}).name)
    bar.close()
    return {"out": str(out), "records_in_shard": len(ids) * spec.per_latent, "computed": len(todo),
            "already_done": len(ids) * spec.per_latent - len(todo), "files_written": written}
