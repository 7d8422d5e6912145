"""Training loops: the shared machinery (accelerate, checkpoints, resume, logging, NaN skip) and ``train_decoder``.

Shared pieces, for every loop in ldlib (the decoder here, the proxy later):

- ``make_accelerator``: CPU, one GPU with bf16 autocast, or DDP / multi-node under ``accelerate launch`` with no
  code change (accelerate reads the launcher's environment).
- ``GlobalBatchSampler``: the global batch of step k is a fixed function of (seed, k); rank r takes its slice. So
  resuming needs no sampler state, and N processes at batch B see exactly what one process sees at batch N*B.
- ``sample_generator``: per-sample randomness (sigma, degradation noise) seeded by (seed, step, global index), for
  the same reason.
- ``CheckpointManager``: checkpoints written into a temporary folder and renamed into place (atomic), a
  ``latest.json`` pointer, per-rank RNG states, old checkpoints pruned.
- ``all_finite``: a NaN/inf loss on any rank makes every rank skip the step (a one-sided skip would hang DDP).
- ``RunLogger``: tqdm bar and TensorBoard scalars/images on the main process only.

Run folder layout (``train_decoder``)::

    OUT/config.json          the TrainConfig (and preset) of the run
    OUT/checkpoints/step_000100/{decoder,ema,discriminator}.safetensors, optim.pt, state.json, rng_<rank>.pt
    OUT/checkpoints/latest.json
    OUT/tb/                  TensorBoard scalars and validation grids (LQ-decode + bicubic | ours | HQ)
    OUT/history.jsonl        one line of losses per step (main process)
    OUT/summary.json         what the run did: steps, skipped steps, final losses, validation metrics, timings
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .images import atomic_write_bytes, atomic_write_file
from .losses import DecoderLoss, LossConfig, PatchDiscriminator

# ------------------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Decoder training settings; defaults are the recipe's (DESIGN.md step 7)."""

    preset: str = "tiny"
    taef2_dir: str | None = None  # taef2 weights folder (preset taef2), else $LDLIB_TAEF2_DIR or ../shared
    steps: int = 20000  # optimiser steps
    batch: int = 4  # samples per process per micro-step (global batch = batch * processes * grad_accum)
    grad_accum: int = 1
    lr: float = 1e-4
    disc_lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)  # LDM autoencoder Adam betas (GAN-friendly)
    weight_decay: float = 0.0  # fine-tuning a pretrained decoder: no decay towards zero
    lr_schedule: str = "constant_with_warmup"  # any diffusers get_scheduler name
    warmup_steps: int = 500
    max_grad_norm: float = 1.0
    sigma_min: float = 0.0
    sigma_max: float = 0.12  # sigma ~ U[sigma_min, sigma_max] per sample
    degrader: str = "noise"  # none | noise | proxy:DIR | teacher
    ema_decay: float = 0.999
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    val_every: int = 500
    val_count: int = 4  # validation images in the grid / metrics
    val_sigma: float = 0.06  # fixed sigma of the validation grid (half the training range)
    val_fraction: float = 0.1  # held-out share of source images (pair sets)
    log_every: int = 10
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | no | bf16 | fp16
    grad_checkpointing: bool = False
    compile: bool = False
    num_workers: int = 0
    seed: int = 0
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        self.betas = tuple(self.betas)
        for name in ("steps", "batch", "grad_accum", "checkpoint_every", "log_every", "val_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.sigma_min <= self.sigma_max:
            raise ValueError(f"need 0 <= sigma_min <= sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be auto | no | bf16 | fp16, got {self.mixed_precision!r}")

    def to_dict(self) -> dict:
        """JSON-ready dict (nested LossConfig included)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Inverse of to_dict; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {', '.join(unknown)}")
        return cls(**d)


# ------------------------------------------------------------------------------------------------------------
# shared machinery
# ------------------------------------------------------------------------------------------------------------


def make_accelerator(mixed_precision: str = "auto", grad_accum: int = 1):
    """An Accelerator for this process: bf16 autocast on CUDA by default, fp32 on CPU; DDP when launched so."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from accelerate.state import AcceleratorState

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed_precision:
        # accelerate keeps one precision per process and refuses another; a notebook that trains twice with
        # different settings needs a fresh state (the process group, PartialState, is kept).
        AcceleratorState._reset_state(reset_partial_state=False)
    # The scheduler is stepped by hand once per optimiser step (accelerate would step it once per process).
    acc = Accelerator(
        # accelerate only sets up CPU DDP (gloo) under torchrun when told it is on CPU.
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        step_scheduler_with_optimizer=False,
        # Wan's decoder has parameters that a single frame never uses (temporal upsampling convs): DDP must be
        # told, or it waits for their gradients forever.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=True, find_unused_parameters=True)],
    )
    return acc


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and runs)."""
    h = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def sample_generator(seed: int, step: int, index: int, stream: int = 0) -> torch.Generator:
    """The CPU generator of one sample's randomness at one step (same on every rank and in every run)."""
    return torch.Generator().manual_seed(_mix_seed(seed, step, index, stream))


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Batches of indices for steps start..steps-1: step k's global batch is a pure function of (seed, k).

    The index stream is a concatenation of seeded permutations of range(n); the global batch of micro-step k is
    ``stream[k*G:(k+1)*G]`` with G = batch * world, and rank r takes ``[r*batch:(r+1)*batch]`` of it.
    """

    def __init__(self, n: int, batch: int, world: int, rank: int, seed: int, start: int, stop: int) -> None:
        if n < 1:
            raise ValueError("GlobalBatchSampler: the dataset is empty")
        self.n, self.batch, self.world, self.rank, self.seed = n, batch, world, rank, seed
        self.start, self.stop = start, stop
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(_mix_seed(self.seed, epoch, 7)))}
        return self._perms[epoch]

    def global_batch(self, k: int) -> list[int]:
        """Dataset indices of micro-step k's global batch (all ranks)."""
        g = self.batch * self.world
        return [int(self._perm(j // self.n)[j % self.n]) for j in range(k * g, (k + 1) * g)]

    def __iter__(self) -> Iterator[list[int]]:
        for k in range(self.start, self.stop):
            yield self.global_batch(k)[self.rank * self.batch : (self.rank + 1) * self.batch]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def all_finite(accelerator, value: torch.Tensor) -> bool:
    """Whether value is finite on every process (so that all ranks skip a bad step together)."""
    bad = (~torch.isfinite(value.detach().float())).any().float().reshape(1).to(accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bool(bad.item() == 0)


def rng_states() -> dict[str, torch.Tensor]:
    """This process's global torch RNG states (CPU and CUDA)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def set_rng_states(states: dict[str, torch.Tensor]) -> None:
    """Restore states from rng_states()."""
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(k for k in states if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_file(path, lambda tmp: save_file(sd, str(tmp)))  # the umask's mode, not save_file's 0600


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file missing")
    return load_file(str(path))


class CheckpointManager:
    """Atomic checkpoints under ``folder``: ``step_NNNNNN/`` folders plus a ``latest.json`` pointer.

    A checkpoint is written into a hidden temporary folder (main process: tensors as safetensors, optimiser and
    scheduler states with torch.save; every rank: its RNG states), then renamed into place and only then named in
    latest.json, so a crash mid-write never leaves a checkpoint that looks complete.
    """

    def __init__(self, folder: str | os.PathLike, accelerator=None, keep: int = 2) -> None:
        self.folder = Path(folder)
        self.acc = accelerator
        self.keep = keep

    @property
    def _main(self) -> bool:
        return self.acc is None or self.acc.is_main_process

    def _barrier(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, or None."""
        pointer = self.folder / "latest.json"
        if not pointer.is_file():
            return None
        try:
            name = json.loads(pointer.read_text())["checkpoint"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"{pointer}: unreadable checkpoint pointer ({e})") from e
        path = self.folder / name
        if not (path / "state.json").is_file():
            raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint")
        return path

    def save(
        self,
        step: int,
        tensors: dict[str, dict[str, torch.Tensor]],
        objects: dict[str, Any],
        state: dict,
    ) -> Path:
        """Write tensors (name -> state dict, as safetensors), objects (torch.save), state (JSON), per-rank RNG."""
        final = self.folder / f"step_{step:06d}"
        tmp = self.folder / f".tmp_step_{step:06d}"
        if self._main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        rank = 0 if self.acc is None else self.acc.process_index
        torch.save(rng_states(), tmp / f"rng_{rank}.pt")
        if self._main:
            for name, sd in tensors.items():
                _save_safetensors(sd, tmp / f"{name}.safetensors")
            torch.save(objects, tmp / "optim.pt")
            (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        self._barrier()
        if self._main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_bytes(self.folder / "latest.json", json.dumps({"checkpoint": final.name, "step": step}).encode())
            done = sorted(p for p in self.folder.glob("step_*") if p.is_dir())
            for old in done[: max(0, len(done) - self.keep)]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def load(self, path: Path, tensor_names: Sequence[str]) -> tuple[dict, dict, dict]:
        """(tensors by name, objects, state) of a checkpoint; restores this rank's RNG states when saved."""
        tensors = {name: _load_safetensors(path / f"{name}.safetensors") for name in tensor_names}
        objects = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / "state.json").read_text())
        rank = 0 if self.acc is None else self.acc.process_index
        rng = path / f"rng_{rank}.pt"
        if rng.is_file():
            set_rng_states(torch.load(rng, map_location="cpu", weights_only=True))
        return tensors, objects, state


def open_run(out: Path, accelerator, resume: bool, keep: int, config: dict) -> tuple[CheckpointManager, Path | None]:
    """Set up a run folder: its checkpoints and the one to resume from; refuses to overwrite a run unless resuming."""
    ckpts = CheckpointManager(out / "checkpoints", accelerator, keep=keep)
    latest = ckpts.latest() if resume else None
    if not resume and accelerator.is_main_process and (out / "checkpoints" / "latest.json").is_file():
        raise ValueError(f"{out}: holds a run already; pass resume=True (--resume) or choose another folder")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.json", json.dumps(config, indent=2).encode())
    accelerator.wait_for_everyone()
    return ckpts, latest


class RunLogger:
    """tqdm progress bar + TensorBoard writer + history.jsonl, active on the main process only."""

    def __init__(self, out: Path, accelerator, total: int, initial: int = 0, desc: str = "train") -> None:
        self.main = accelerator.is_main_process
        self.out = out
        self.bar = None
        self.tb = None
        if self.main:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
            self.tb = SummaryWriter(str(out / "tb"))
            self._hist = open(out / "history.jsonl", "a")

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        """Log scalars to TensorBoard."""
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def history(self, record: dict) -> None:
        """Append one line to history.jsonl (flushed: a crash keeps what was logged)."""
        if self.main:
            self._hist.write(json.dumps(record) + "\n")
            self._hist.flush()

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """Log one 3 x H x W image in [-1, 1]."""
        if self.tb is not None:
            self.tb.add_image(tag, ((image.float().clamp(-1, 1) + 1) / 2).cpu(), step)

    def advance(self, n: int = 1, postfix: dict | None = None) -> None:
        """Move the bar."""
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        """Flush and close everything."""
        if self.main:
            self.bar.close()
            self.tb.close()
            self._hist.close()


# ------------------------------------------------------------------------------------------------------------
# decoder training
# ------------------------------------------------------------------------------------------------------------


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
    from .images import area_downsample, load_image
    from .samples import sample_paths

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


def _collate(items: list[dict]) -> dict:
    out = {k: torch.stack([it[k] for it in items]) for k in ("latent", "hq") if k in items[0]}
    if "id" in items[0]:
        out["id"] = [it["id"] for it in items]
    return out


class TwoXDecoder(nn.Module):
    """The trainable module: ``forward(latents) = codec.decode(latents, clamp=False)`` of a 2x codec.

    Owns the codec (encoder frozen), so accelerate/DDP wrap one module whose trainable parameters are exactly
    ``codec.decoder_parameters()``.
    """

    def __init__(self, codec) -> None:
        super().__init__()
        if codec.upscale != 2:
            raise ValueError(f"TwoXDecoder needs a 2x codec (codec.to_2x()), got upscale {codec.upscale}")
        self.codec = codec
        codec.requires_grad_(False)
        for p in codec.decoder_parameters():
            p.requires_grad_(True)
        self._checkpointing = False

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward (diffusers' own switch for VAEs; per-block for TAESD decoders)."""
        vae = getattr(self.codec, "vae", None)
        if self.codec.family == "wan":
            # diffusers refuses enable_gradient_checkpointing() for AutoencoderKLWan; ldlib's image-mode decoder
            # reads the same flag per block.
            if not getattr(self.codec, "image_mode", False):
                raise ValueError("gradient checkpointing of a Wan decoder needs WanCodec(image_mode=True)")
            vae.decoder.gradient_checkpointing = True
        elif vae is not None:
            vae.enable_gradient_checkpointing()
        self._checkpointing = True

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw (unclamped) 2x decode."""
        codec = self.codec
        if self._checkpointing and codec.family == "tae" and self.training:
            # TAESD decoders are plain Sequentials: checkpoint them in 4 segments.
            from torch.utils.checkpoint import checkpoint_sequential

            z = codec.denormalise(latents).to(codec.decoder[1].weight.dtype)
            out = checkpoint_sequential(codec.decoder, 4, z, use_reentrant=False) * 2.0 - 1.0
            return F.pixel_shuffle(out, 2)
        return codec.decode(latents, clamp=False)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Name -> tensor of the trainable (decoder) parameters."""
        return {n: p for n, p in self.codec.named_parameters() if p.requires_grad}

    def load_trainable_state(self, sd: dict[str, torch.Tensor], origin: str = "checkpoint") -> None:
        """Copy decoder parameters in by name; a missing or extra name is an error naming it."""
        own = self.trainable_state()
        missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or extra:
            raise ValueError(f"{origin}: decoder weights do not match this codec (missing {missing[:3]}, extra {extra[:3]})")
        with torch.no_grad():
            for n, p in own.items():
                if p.shape != sd[n].shape:
                    raise ValueError(f"{origin}: {n} has shape {tuple(sd[n].shape)}, expected {tuple(p.shape)}")
                p.copy_(sd[n].to(p))


class TeacherLatents:
    """Cached teacher outputs as the degradation (``--degrader teacher:DIR``, data from `python -m ldlib teacher`).

    Per sample, one of its pair's teacher records with sigma <= sigma_max is drawn (seeded); the record's own sigma
    is the sample's sigma. A pair with no such record is used clean (sigma 0); how many pairs are covered is in
    ``coverage``. Needs pair ids, so it works with pair-set datasets (items with "id").
    """

    def __init__(self, folder: str | os.PathLike, sigma_max: float, codec=None) -> None:
        from .teacher_data import TeacherSet

        self.teacher = TeacherSet(folder)
        if codec is not None:
            from .latents import same_codec

            if not same_codec(self.teacher.info.get("identity", {}), codec.identity()):
                raise ValueError(f"{folder}: teacher data was made from another codec's latents than this preset's")
        self.by_id: dict[str, list[dict]] = {}
        for r in self.teacher.records:
            if r["sigma"] <= sigma_max:
                self.by_id.setdefault(r["id"], []).append(r)
        if not self.by_id:
            raise ValueError(f"{folder}: no teacher record has sigma <= {sigma_max}")

    def coverage(self, ids: Sequence[str]) -> float:
        """Share of the given pair ids that have at least one usable teacher record."""
        return sum(i in self.by_id for i in ids) / max(1, len(ids))

    def pick(self, pair_id: str, latent: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, float]:
        """(degraded latent, sigma) for one sample: a random usable teacher record, or the clean latent."""
        recs = self.by_id.get(pair_id)
        if not recs:
            return latent, 0.0
        r = recs[int(torch.randint(0, len(recs), (), generator=generator))]
        return self.teacher.target(r["key"]).to(latent), float(r["sigma"])


def parse_degrader(spec: str, preset=None, sigma_max: float = 0.12, codec=None):
    """``none`` | ``noise`` | ``proxy:DIR`` | ``teacher:DIR`` -> a degrader (None for no degradation)."""
    from .degrade import NoiseDegrader

    if spec in ("none", "", None):
        return None
    if spec == "noise":
        return NoiseDegrader()
    if spec.startswith("proxy:"):
        folder = Path(spec.split(":", 1)[1])
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: proxy folder not found (train one with notebook 03 / train-proxy)")
        from . import degrade

        loader = getattr(degrade, "load_proxy", None)
        if loader is None:
            raise ValueError("proxy degrader: ldlib.degrade has no load_proxy(DIR) yet (the proxy issue adds it)")
        return degrade.ProxyDegrader(loader(folder))
    if spec == "teacher":
        raise ValueError("degrader 'teacher' needs the teacher data folder: --degrader teacher:DIR "
                         "(made by `python -m ldlib teacher PAIRS DIR`)")
    if spec.startswith("teacher:"):
        folder = Path(spec.split(":", 1)[1])
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: teacher data folder not found (run `python -m ldlib teacher`)")
        return TeacherLatents(folder, sigma_max, codec)
    raise ValueError(f"unknown degrader {spec!r}; choose none | noise | proxy:DIR | teacher:DIR")


def degrade_batch(
    degrader, latents: torch.Tensor, indices: Sequence[int], step: int, cfg: TrainConfig,
    ids: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(degraded latents, sigmas): each sample's sigma ~ U[sigma_min, sigma_max] and noise from its own generator.

    Per-sample generators keyed by (seed, step, dataset index) make the degradation independent of how the global
    batch is split across processes (DDP == one process at the same global batch) and of resumption.
    """
    sig, outs = [], []
    for j, idx in enumerate(indices):
        g = sample_generator(cfg.seed, step, int(idx), stream=1)
        z = latents[j : j + 1]
        if isinstance(degrader, TeacherLatents):
            if ids is None:
                raise ValueError("the teacher degrader needs pair ids: train on a pair set (PairDataset)")
            zt, s = degrader.pick(ids[j], z[0], g)
            sig.append(s)
            outs.append(zt.unsqueeze(0))
            continue
        s = cfg.sigma_min + (cfg.sigma_max - cfg.sigma_min) * torch.rand((), generator=g).item()
        sig.append(s)
        if degrader is not None and s > 0:
            if z.device.type != "cpu":
                dg = torch.Generator(device=z.device).manual_seed(int(torch.randint(0, 2**62, (), generator=g)))
            else:
                dg = g
            z = degrader.degrade(z, s, dg)
        outs.append(z)
    return torch.cat(outs), torch.tensor(sig)


def _preset_and_codec(cfg: TrainConfig):
    from .presets import get_preset

    preset = get_preset(cfg.preset, taef2_path=cfg.taef2_dir)
    return preset, preset.load_codec()


def _grid(lq_up: torch.Tensor, ours: torch.Tensor, hq: torch.Tensor) -> torch.Tensor:
    """Rows of [LQ-decode + bicubic | ours | HQ] stacked vertically: one 3 x H x 3W image."""
    rows = [torch.cat([a, b, c], dim=-1) for a, b, c in zip(lq_up, ours, hq)]
    return torch.cat(rows, dim=-2)


@torch.no_grad()
def validation_images(
    original, model2x: nn.Module, val_batch: dict, sigma: float, degrader, seed: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """The validation grid and metrics at a fixed sigma: original decoder + bicubic vs ours vs HQ."""
    from .metrics import psnr

    z, hq = val_batch["latent"], val_batch["hq"]
    zd = z
    if degrader is not None and sigma > 0:
        zd = degrader.degrade(z, sigma, torch.Generator(device=z.device).manual_seed(seed))
    base = F.interpolate(original.decode(zd.to(z.device)).float(), scale_factor=2, mode="bicubic", align_corners=False)
    ours = model2x(zd).float()
    base, ours = base.clamp(-1, 1), ours.clamp(-1, 1)
    hq = hq.float()
    metrics = {
        "psnr_ours": psnr(ours, hq).mean().item(),
        "psnr_bicubic": psnr(base, hq).mean().item(),
        "mean_colour_err": (ours.mean((0, 2, 3)) - hq.mean((0, 2, 3))).abs().mean().item(),
    }
    return _grid(base.cpu(), ours.cpu(), hq.cpu()), metrics


def _build_optim(params, cfg: TrainConfig, lr: float, steps: int):
    from diffusers.optimization import get_scheduler

    opt = torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps)
    return opt, sched


def _mean_terms(records: list[dict]) -> dict[str, float]:
    """Mean of each float term over the records that have it."""
    keys = {k for r in records for k, v in r.items() if isinstance(v, float)}
    return {k: sum(r[k] for r in records if k in r) / sum(k in r for r in records) for k in sorted(keys)}


@dataclass
class TrainResult:
    """What train_decoder returns: run folder, steps done, skipped steps, per-step history, the live 2x codec."""

    out: Path
    step: int
    skipped: list[int]
    history: list[dict]
    summary: dict
    codec2x: Any = None  # the trained 2x codec with this process's live (not EMA) weights


def train_decoder(
    cfg: TrainConfig,
    out: str | os.PathLike,
    train_set: torch.utils.data.Dataset | None = None,
    val_set: torch.utils.data.Dataset | None = None,
    pairs: str | os.PathLike | None = None,
    latents: str | os.PathLike | None = None,
    resume: bool = False,
    codec=None,
    degrader: Any = "config",
    loss_fn: DecoderLoss | None = None,
    stop_at: int | None = None,
    accelerator=None,
) -> TrainResult:
    """Train the 2x decoder on (latent, HQ) pairs; checkpoints, TensorBoard and summary.json under out.

    Data: ``train_set``/``val_set`` (items with "latent" and "hq"), or ``pairs`` (+ ``latents``) for a pair set on
    disk, split by source image. ``codec``: the preset's 1x codec unless given. ``degrader``: an object with
    ``degrade(latents, sigma, generator)``, None for none, or "config" to parse ``cfg.degrader``. ``stop_at``
    ends the run early at that step (a simulated interruption; the schedule still targets ``cfg.steps``).
    """
    t_start = time.time()
    out = Path(out)
    acc = accelerator or make_accelerator(cfg.mixed_precision, cfg.grad_accum)
    device = acc.device
    if codec is None:
        _, codec = _preset_and_codec(cfg)
    degrader_from_config = isinstance(degrader, str) and degrader == "config"
    if degrader_from_config:
        degrader = parse_degrader(cfg.degrader, sigma_max=cfg.sigma_max, codec=codec)
    if train_set is None:
        if pairs is None:
            raise ValueError("train_decoder: give train_set or pairs")
        from .latents import LatentCache, default_cache_dir
        from .pairs import PairDataset

        cache = LatentCache(latents or default_cache_dir(pairs, cfg.preset), expect=codec)
        full = PairDataset(pairs, latents=cache)
        train_set, val_set = full.split(cfg.val_fraction, cfg.seed)
        if len(train_set) == 0:
            raise ValueError(f"{pairs}: no training pairs after the held-out split")

    if isinstance(getattr(degrader, "net", None), nn.Module):
        degrader.net.to(device).eval()  # a proxy runs where the latents are
    if isinstance(degrader, TeacherLatents):
        ids = getattr(train_set, "ids", None)
        if ids is None:
            raise ValueError("the teacher degrader needs a pair-set dataset (items with pair ids)")
        acc.print(f"teacher data: {degrader.coverage(ids):.0%} of {len(ids)} training pairs have a record with "
                  f"sigma <= {cfg.sigma_max} (the rest train clean)")

    ckpts, latest = open_run(out, acc, resume, cfg.keep_checkpoints, cfg.to_dict())

    # --- models -------------------------------------------------------------------------------------------
    original = codec.eval().to(device)  # frozen 1x decoder for the baseline column of the grid
    model = TwoXDecoder(codec.to_2x()).to(device)
    model.train()
    if cfg.grad_checkpointing:
        model.enable_gradient_checkpointing()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_mix_seed(cfg.seed, 11))
        disc = PatchDiscriminator(3, cfg.loss.disc_channels, cfg.loss.disc_layers).to(device)
    if loss_fn is None:
        loss_fn = DecoderLoss(cfg.loss)
    loss_fn = loss_fn.to(device)

    from diffusers.training_utils import EMAModel

    dec_names = list(model.trainable_state())
    dec_params = [model.trainable_state()[n] for n in dec_names]
    ema = EMAModel(dec_params, decay=cfg.ema_decay)
    ema.to(device)
    opt_g, sched_g = _build_optim(dec_params, cfg, cfg.lr, cfg.steps)
    opt_d, sched_d = _build_optim(disc.parameters(), cfg, cfg.disc_lr, cfg.steps)

    step, skipped = 0, []
    if latest is not None:
        tensors, objects, state = ckpts.load(latest, ["decoder", "ema", "discriminator"])
        model.load_trainable_state(tensors["decoder"], str(latest))
        disc.load_state_dict(tensors["discriminator"])
        ema_state = dict(state["ema"])
        ema_state["shadow_params"] = [tensors["ema"][n] for n in dec_names]
        ema.load_state_dict(ema_state)
        ema.to(device)
        opt_g.load_state_dict(objects["opt_g"])
        opt_d.load_state_dict(objects["opt_d"])
        sched_g.load_state_dict(objects["sched_g"])
        sched_d.load_state_dict(objects["sched_d"])
        step, skipped = int(state["step"]), list(state.get("skipped", []))
        acc.print(f"resumed from {latest} at step {step}")

    fwd = torch.compile(model) if cfg.compile else model
    fwd, disc_w, opt_g, opt_d = acc.prepare(fwd, disc, opt_g, opt_d)
    disc_raw = acc.unwrap_model(disc_w)
    last_layer = model.codec.conv_out.weight
    reduce = (lambda t: acc.reduce(t, reduction="mean")) if acc.num_processes > 1 else None

    sampler_args = dict(n=len(train_set), batch=cfg.batch, world=acc.num_processes, rank=acc.process_index, seed=cfg.seed)
    micro_start = step * cfg.grad_accum
    stop = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    sampler = GlobalBatchSampler(**sampler_args, start=micro_start, stop=stop * cfg.grad_accum)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=_collate)

    val_batch = None
    if val_set is not None and len(val_set) > 0 and acc.is_main_process:
        items = [val_set[i] for i in range(min(cfg.val_count, len(val_set)))]
        val_batch = {k: v.to(device) for k, v in _collate(items).items() if torch.is_tensor(v)}

    log = RunLogger(out, acc, total=stop, initial=step, desc="train-decoder")
    history: list[dict] = []
    val_metrics: dict[str, float] = {}
    window_bad = False
    window_terms: list[dict[str, float]] = []
    t_loop, samples = time.time(), 0

    def save_checkpoint() -> None:
        sd_ema = {n: t for n, t in zip(dec_names, ema.shadow_params)}
        ema_meta = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        ckpts.save(
            step,
            {"decoder": model.trainable_state(), "ema": sd_ema, "discriminator": disc_raw.state_dict()},
            {"opt_g": opt_g.optimizer.state_dict(), "opt_d": opt_d.optimizer.state_dict(),
             "sched_g": sched_g.state_dict(), "sched_d": sched_d.state_dict()},
            {"skipped": skipped, "ema": ema_meta, "preset": cfg.preset, "family": codec.family},
        )

    def validate() -> None:
        nonlocal val_metrics
        if val_batch is None:
            return
        ema.store(dec_params)
        ema.copy_to(dec_params)
        model.eval()
        try:
            with acc.autocast():
                # Teacher data exists for training pairs only: the grid shows the noise-only degradation then.
                from .degrade import NoiseDegrader

                val_deg = NoiseDegrader() if isinstance(degrader, TeacherLatents) else degrader
                grid, val_metrics = validation_images(original, model, val_batch, cfg.val_sigma, val_deg, cfg.seed)
        finally:
            model.train()
            ema.restore(dec_params)
        log.image(step, "val/lq-decode+bicubic | ours (EMA) | HQ", grid)
        log.scalars(step, val_metrics, prefix="val")

    micro = micro_start
    scoped = contextlib.ExitStack()
    if cfg.compile:
        import torch._functorch.config as functorch_config

        # The adaptive GAN weight differentiates the same graph twice (retain_graph=True), which compiled backward
        # graphs with donated buffers refuse; switch donation off for this loop only.
        scoped.enter_context(functorch_config.patch(donated_buffer=False))
    for batch in loader:
        global_idx = sampler.global_batch(micro)
        mine = global_idx[acc.process_index * cfg.batch : (acc.process_index + 1) * cfg.batch]
        z = batch["latent"].to(device, non_blocking=True)
        hq = batch["hq"].to(device, non_blocking=True)
        zd, sig = degrade_batch(degrader, z, mine, step, cfg, batch.get("id"))
        with acc.accumulate(fwd, disc_w):
            with acc.autocast():
                pred = fwd(zd)
            loss, terms = loss_fn.generator(pred, hq, step, disc_raw, last_layer, reduce)
            ok = all_finite(acc, loss)
            if ok:
                acc.backward(loss)
            else:
                window_bad = True
            d_active = loss_fn.gan_active(step)
            d_ok = True
            if d_active:
                with acc.autocast():
                    d_loss, d_terms = loss_fn.discriminator_loss(disc_w, pred, hq)
                d_ok = all_finite(acc, d_loss)
                if d_ok and ok:
                    acc.backward(d_loss)
                terms.update(d_terms)
                window_bad = window_bad or not d_ok
            window_terms.append({k: float(v.detach()) for k, v in terms.items()} | {"sigma_mean": sig.mean().item()})
            if acc.sync_gradients:
                if window_bad:
                    # NaN/inf anywhere in the window: drop its gradients, leave weights and optimiser states alone.
                    opt_g.zero_grad(set_to_none=True)
                    opt_d.zero_grad(set_to_none=True)
                    skipped.append(step)
                    acc.print(f"step {step}: non-finite loss, step skipped")
                else:
                    if cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(dec_params, cfg.max_grad_norm)
                    opt_g.step()
                    opt_g.zero_grad(set_to_none=True)
                    if d_active:
                        if cfg.max_grad_norm > 0:
                            acc.clip_grad_norm_(disc_w.parameters(), cfg.max_grad_norm)
                        opt_d.step()
                    opt_d.zero_grad(set_to_none=True)
                    ema.step(dec_params)
                with warnings.catch_warnings():
                    # Schedules follow the step count even on skipped steps / before the GAN starts (torch warns).
                    warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*", category=UserWarning)
                    sched_g.step()
                    sched_d.step()
                rec = {k: sum(t[k] for t in window_terms if k in t) / max(1, sum(k in t for t in window_terms))
                       for k in window_terms[-1]}
                rec.update(step=step, lr=sched_g.get_last_lr()[0], skipped=window_bad)
                history.append(rec)
                log.history(rec)
                if step % cfg.log_every == 0:
                    log.scalars(step, {k: v for k, v in rec.items() if isinstance(v, float)})
                window_bad, window_terms = False, []
                step += 1
                samples += cfg.batch * cfg.grad_accum * acc.num_processes
                log.advance(1, {"rec": rec.get("rec", float("nan"))})
                if step % cfg.val_every == 0 and acc.is_main_process:
                    validate()
                if step % cfg.checkpoint_every == 0 or step == stop:
                    save_checkpoint()
        micro += 1
    scoped.close()
    if acc.is_main_process and (step % cfg.val_every != 0 or not val_metrics):
        validate()
    acc.wait_for_everyone()
    elapsed = time.time() - t_loop
    last = history[-min(len(history), 20):]
    summary = {
        "out": str(out),
        "preset": cfg.preset,
        "family": codec.family,
        "degrader": cfg.degrader if degrader_from_config else type(degrader).__name__ if degrader is not None else "none",
        "steps_done": step,
        "steps_target": cfg.steps,
        "finished": step >= cfg.steps,
        "skipped_steps": skipped,
        "processes": acc.num_processes,
        "device": str(device),
        "mixed_precision": acc.mixed_precision,
        "global_batch": cfg.batch * cfg.grad_accum * acc.num_processes,
        "samples_per_s_this_run": samples / elapsed if elapsed > 0 else None,
        "train_seconds_this_run": elapsed,
        "wall_seconds_this_run": time.time() - t_start,
        "final_losses_mean_last_steps": _mean_terms(last),
        "validation": val_metrics,
        "lpips_backbone_pretrained": bool(getattr(loss_fn.lpips, "backbone_pretrained", False)),
        "checkpoint": str(ckpts.latest()) if ckpts.latest() else None,
        "config": cfg.to_dict(),
    }
    if acc.is_main_process:
        atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    log.close()
    return TrainResult(out, step, skipped, history, summary, model.codec)


# ------------------------------------------------------------------------------------------------------------
# loading a trained run
# ------------------------------------------------------------------------------------------------------------


def load_run_codec(run: str | os.PathLike, ema: bool = True, checkpoint: str | os.PathLike | None = None):
    """The trained 2x codec of a run folder (EMA weights by default) and its TrainConfig."""
    run = Path(run)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run}: not a training run (no config.json)")
    cfg = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
    path = Path(checkpoint) if checkpoint else CheckpointManager(run / "checkpoints").latest()
    if path is None:
        raise FileNotFoundError(f"{run}: no checkpoint yet (checkpoints/latest.json missing)")
    _, codec = _preset_and_codec(cfg)
    model = TwoXDecoder(codec.to_2x())
    model.load_trainable_state(_load_safetensors(path / ("ema.safetensors" if ema else "decoder.safetensors")), str(path))
    return model.codec.requires_grad_(False).eval(), cfg


# ------------------------------------------------------------------------------------------------------------
# proxy training
# ------------------------------------------------------------------------------------------------------------


@dataclass
class ProxyTrainConfig:
    """Proxy training settings (plain regression on teacher targets)."""

    steps: int = 3000
    batch: int = 16
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"  # any diffusers get_scheduler name
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    width: int = 64  # ProxyNet size knobs
    blocks: int = 4
    sigma_floor: float = 0.01  # the loss divides by max(sigma, floor): error measured relative to the step size
    val_fraction: float = 0.2  # held-out share of source images
    eval_bins: int = 6
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    mixed_precision: str = "auto"
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("steps", "batch", "checkpoint_every", "log_every", "width", "blocks"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ProxyTrainConfig.{name} must be >= 1, got {getattr(self, name)}")


def proxy_loss(pred: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, floor: float = 0.01) -> torch.Tensor:
    """MSE in velocity units: ((P - T) / sigma)^2, so small-sigma samples count as much as large ones.

    The proxy and the teacher both move x_sigma by sigma * velocity; dividing by sigma weighs every sample by the
    error relative to its own degradation, which is the quantity evaluate_proxy reports (plain MSE would be ruled
    by the largest sigmas and leave the decoder's range, sigma <= 0.12, poorly fitted).
    """
    scale = sigma.float().clamp_min(floor).view(-1, *([1] * (pred.dim() - 1)))
    return (((pred.float() - target.float()) / scale) ** 2).mean()


def train_proxy(
    cfg: ProxyTrainConfig,
    teacher: str | os.PathLike,
    out: str | os.PathLike,
    latents: str | os.PathLike | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    accelerator=None,
) -> dict:
    """Train a ProxyNet on a teacher folder (held-out split by source image); writes the proxy, eval.json, summary."""
    from .degrade import ProxyNet, save_proxy
    from .pairs import split_by_source
    from .teacher_data import TeacherDataset, TeacherSet, evaluate_proxy, plot_proxy_eval

    t_start = time.time()
    out = Path(out)
    acc = accelerator or make_accelerator(cfg.mixed_precision)
    device = acc.device
    ts = TeacherSet(teacher)
    if len(ts) == 0:
        raise ValueError(f"{teacher}: no teacher records; run `python -m ldlib teacher` first")
    train_ids, val_ids = split_by_source(ts.records, cfg.val_fraction, cfg.seed)
    train_set = TeacherDataset(ts, latents, sorted(set(train_ids)))
    val_set = TeacherDataset(ts, train_set.latents, sorted(set(val_ids)))
    channels = int(train_set.latents.identity["latent_channels"])

    ckpts, latest = open_run(out, acc, resume, cfg.keep_checkpoints, {**asdict(cfg), "teacher": str(teacher)})

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_mix_seed(cfg.seed, 23))
        net = ProxyNet(channels=channels, width=cfg.width, blocks=cfg.blocks).to(device)
    opt, sched = _build_optim(net.parameters(), cfg, cfg.lr, cfg.steps)
    step, skipped = 0, []
    if latest is not None:
        tensors, objects, state = ckpts.load(latest, ["proxy"])
        net.load_state_dict(tensors["proxy"])
        opt.load_state_dict(objects["opt"])
        sched.load_state_dict(objects["sched"])
        step, skipped = int(state["step"]), list(state.get("skipped", []))
        acc.print(f"resumed from {latest} at step {step}")
    net_w, opt = acc.prepare(net, opt)

    stop = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    sampler = GlobalBatchSampler(len(train_set), cfg.batch, acc.num_processes, acc.process_index, cfg.seed, step, stop)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.num_workers)
    log = RunLogger(out, acc, total=stop, initial=step, desc="train-proxy")
    history: list[dict] = []
    for batch in loader:
        x_sigma, target = batch["x_sigma"].to(device), batch["target"].to(device)
        sigma = batch["sigma"].to(device)
        with acc.autocast():
            pred = net_w(x_sigma, sigma)
        loss = proxy_loss(pred, target, sigma, cfg.sigma_floor)
        if all_finite(acc, loss):
            acc.backward(loss)
            if cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(net_w.parameters(), cfg.max_grad_norm)
            opt.step()
        else:
            skipped.append(step)
            acc.print(f"step {step}: non-finite loss, step skipped")
        opt.zero_grad(set_to_none=True)
        sched.step()
        rec = {"step": step, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0]}
        history.append(rec)
        log.history(rec)
        if step % cfg.log_every == 0:
            log.scalars(step, {"loss": rec["loss"], "lr": rec["lr"]})
        step += 1
        log.advance(1, {"loss": rec["loss"]})
        if step % cfg.checkpoint_every == 0 or step == stop:
            ckpts.save(step, {"proxy": acc.unwrap_model(net_w).state_dict()},
                       {"opt": opt.optimizer.state_dict(), "sched": sched.state_dict()}, {"skipped": skipped})
    log.close()
    acc.wait_for_everyone()
    trained = acc.unwrap_model(net_w)
    summary: dict = {"out": str(out), "teacher": str(teacher), "steps_done": step, "steps_target": cfg.steps,
                     "finished": step >= cfg.steps, "skipped_steps": skipped, "device": str(device),
                     "train_sources": len({r["source"] for r in train_set.records}),
                     "val_sources": len({r["source"] for r in val_set.records}),
                     "train_records": len(train_set), "val_records": len(val_set),
                     "final_loss_mean_last_steps": sum(h["loss"] for h in history[-20:]) / max(1, len(history[-20:])),
                     "wall_seconds_this_run": time.time() - t_start, "config": asdict(cfg)}
    if acc.is_main_process:
        save_proxy(trained, out, extra={"teacher": ts.info.get("teacher"), "spec": ts.info["spec"], "identity": ts.info["identity"]})
        if len(val_set):
            result = evaluate_proxy(trained, val_set, bins=cfg.eval_bins, device=device)
            atomic_write_bytes(out / "eval.json", json.dumps(result, indent=2).encode())
            plot_proxy_eval(result, out / "eval.png")
            summary["eval"] = result["overall"]
            summary["beats_baselines"] = result["beats_baselines"]
        atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    summary["history"] = history
    return summary
