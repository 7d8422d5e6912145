"""Training the 2x decoder: ``TrainConfig`` (the recipe's defaults) and ``train_decoder``, read top to bottom.

One optimiser step: each latent is degraded to its own sigma ~ U[sigma_min, sigma_max] (``degrade_batch``), the 2x
decoder decodes it (unclamped), L1 + LPIPS (+ the adaptive hinge GAN once it is on) against HQ, backward, then the
discriminator's step, AdamW, EMA. Everything random is a pure function of (seed, step, sample index), so a resumed
run and a DDP run reproduce a single uninterrupted process.

Run folder layout::

    OUT/config.json          the TrainConfig (and preset) of the run
    OUT/checkpoints/step_000100/{decoder,ema,discriminator}.safetensors, optim.pt, state.json, rng_<rank>.pt
    OUT/checkpoints/latest.json
    OUT/tb/                  TensorBoard scalars and validation grids (LQ-decode + bicubic | ours | HQ)
    OUT/history.jsonl        one line of losses per step (written by the main process; under DDP the mean of all)
    OUT/summary.json         what the run did: steps, skipped steps, final losses, validation metrics, timings
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..build import VOCABULARY, codec_of, run_degrader
from ..core.config import check_finite
from ..core.files import atomic_write_bytes
from ..core.metrics import psnr
from ..core.profiling import NO_TIMINGS, StepTimings
from ..core.runs import (CheckpointManager, GlobalBatchSampler, RunLogger, all_finite, build_ema, build_optimizer,
                         check_optimiser_settings, holds_run_lock, json_bytes, load_optimizer_state, loader_workers,
                         make_accelerator, mean_terms, mix_seed, open_run, reused_cpu_memory, sample_generator,
                         write_config)
from ..data.datasets import PairDataset, collate_pairs
from ..data.latents import LatentCache, default_cache_dir
from ..models.codecs import HEAD_INITS
from ..models.decoder import TwoXDecoder
from ..models.losses import DecoderLoss, LossConfig, PatchDiscriminator
from ..presets import PRESET_HELP, PRESETS, get_preset, vae_overrides
from .loop import (PendingRecords, Progress, Update, accumulation_windows, apply_update, restore_progress,
                   resume_progress, run_steps)


@dataclass
class TrainConfig:
    """Decoder training settings; the defaults are the recipe's (README, "The recipe")."""

    # The real offline recipe by default; tiny (random models, 128 px) only where asked: it is plumbing.
    preset: str = field(default="taef2", metadata={"help": PRESET_HELP, "choices": PRESETS})
    taef2_dir: str | None = field(default=None, metadata={"help": "taef2 weights folder (default: packaged / $LDLIB_TAEF2_DIR)"})
    vae: str | None = field(default=None, metadata={"help": "local VAE replacing the preset's: a diffusers folder or "
                                                            "one .safetensors/.pth (original Wan layout for wan2.1-*, qwen-image)"})
    vae_config: str | None = field(default=None, metadata={"help": "architecture of a single-file --vae: a diffusers VAE "
                                                                   "folder or config.json (default: the published one)"})
    steps: int = field(default=20000, metadata={"help": "optimiser steps"})
    batch: int = field(default=4, metadata={"help": "samples per process per micro-step (global batch = batch x processes x grad_accum)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimiser step"})
    lr: float = field(default=1e-4, metadata={"help": "decoder learning rate (AdamW)"})
    disc_lr: float = field(default=1e-4, metadata={"help": "discriminator learning rate"})
    betas: tuple[float, float] = field(default=(0.5, 0.9), metadata={"help": "Adam betas (the LDM autoencoder's, GAN-friendly)"})
    weight_decay: float = field(default=0.0, metadata={"help": "fine-tuning a pretrained decoder: no decay towards zero"})
    lr_schedule: str = field(default="constant_with_warmup", metadata={"help": "any diffusers get_scheduler name"})
    warmup_steps: int = field(default=500, metadata={"help": "learning-rate warm-up steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    sigma_min: float = field(default=0.0, metadata={"help": "sigma ~ U[sigma_min, sigma_max] per sample"})
    sigma_max: float = field(default=0.12, metadata={"help": "sigma ~ U[sigma_min, sigma_max] per sample"})
    degrader: str = field(default="noise", metadata={"help": VOCABULARY})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA of the decoder weights (what export uses)"})
    checkpoint_every: int = field(default=1000, metadata={"help": "steps between checkpoints"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    val_every: int = field(default=500, metadata={"help": "steps between validation grids"})
    val_count: int = field(default=4, metadata={"help": "validation images in the grid and metrics"})
    val_sigma: float = field(default=0.06, metadata={"help": "fixed sigma of the validation grid"})
    val_fraction: float = field(default=0.1, metadata={"help": "held-out share of source photos (pair sets)"})
    split_seed: int | None = field(default=None, metadata={"help": "seed of the held-out split (default: seed)"})
    log_every: int = field(default=10, metadata={"help": "steps between TensorBoard scalars"})
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(default="auto", metadata={"help": "auto: bf16 on CUDA, fp32 on CPU"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute decoder activations in backward"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the decoder"})
    channels_last: bool = field(default=False, metadata={"help": "channels-last memory format for decoder, LPIPS and discriminator"})
    # AdamW and the EMA are a few hundred element-wise ops on small tensors: with several threads each op waits for
    # all of them, which costs seconds per step on a busy CPU (bench train); one thread does them in ~0.1 s.
    update_threads: int = field(default=1, metadata={"help": "CPU threads of the AdamW and EMA updates (element-wise, same "
                                                             "result on any count); 0: all (no effect on GPU)"})
    # Each step frees and reallocates GBs of activations; glibc's defaults hand them back to the system and fault
    # them in again every step (a fifth to a quarter of a taef2 step on 2 cores: bench train). Same results bit for
    # bit either way.
    reuse_cpu_memory: bool = field(default=True, metadata={"help": "CPU: keep the memory a step frees for the next "
                                                                   "step (glibc; same results, 1.25-1.3x faster taef2 "
                                                                   "step on 2 cores); --no-reuse-cpu-memory: the "
                                                                   "allocator's defaults"})
    # On a GPU, reading and converting the 512 px pairs in the main process was half of a Wan decoder step (bench
    # train, H200); on a CPU it is a few % of the step and workers would compete with the model for the cores.
    num_workers: int | None = field(default=None, metadata={"help": "DataLoader workers (default: 0 on CPU, on CUDA "
                                                                     "min(8, CPUs per process - 1); same batches either way)"})
    # Measured on held-out photos (README, "The 2x head's start"): the fitted head starts above decoder+bicubic,
    # the nearest copy about 1 dB below it.
    head_init: str = field(default="least-squares", metadata={"help": "start of the 12-channel head: least-squares "
                                                                      "(fitted on training latents and HQ) | nearest "
                                                                      "(the original head repeated: nearest 2x)"})
    head_fit_pairs: int = field(default=64, metadata={"help": "training pairs the least-squares head is fitted on"})
    head_fit_degraded: bool = field(default=True, metadata={"help": "fit the head on latents degraded like the "
                                                                     "training ones (sigma ~ U[sigma_min, sigma_max])"})
    head_ridge: float = field(default=1e-4, metadata={"help": "ridge of the head fit, relative to the normal "
                                                               "equations' mean diagonal"})
    seed: int = field(default=0, metadata={"help": "seeds weights of new layers, batches, sigmas and noise"})
    init_from: str | None = field(default=None, metadata={"help": "start from another run's checkpoint folder "
                                                          "(RUN/checkpoints/step_N): weights, EMA, optimiser "
                                                          "moments, step; lr, betas, weight decay, EMA decay are "
                                                          "this run's"})
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        self.betas = tuple(self.betas)
        check_finite(self)
        for name in ("steps", "batch", "grad_accum", "checkpoint_every", "log_every", "val_every", "val_count"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.sigma_min <= self.sigma_max:
            raise ValueError(f"need 0 <= sigma_min <= sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be auto | no | bf16 | fp16, got {self.mixed_precision!r}")
        check_optimiser_settings("TrainConfig", self.lr, self.betas, self.weight_decay, self.warmup_steps,
                                 self.keep_checkpoints, disc_lr=self.disc_lr)
        # 1 would freeze the EMA at the initial weights; export uses the EMA, so a silent "off" must not exist.
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1) (0: EMA = live weights), got {self.ema_decay}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"TrainConfig.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"TrainConfig.num_workers must be >= 0 or none (by device), got {self.num_workers}")
        if self.sigma_max > 1:
            raise ValueError(f"TrainConfig.sigma_max must be <= 1 (pure noise), got {self.sigma_max}")
        # Checked here: a live teacher would only refuse it at the first validation, after val_every steps.
        if not 0 <= self.val_sigma <= 1:
            raise ValueError(f"TrainConfig.val_sigma must be in [0, 1], got {self.val_sigma}")
        if self.max_grad_norm < 0:  # the loop clips only when > 0: a negative value would silently mean "off"
            raise ValueError(f"TrainConfig.max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"TrainConfig.head_init must be one of {' | '.join(HEAD_INITS)}, got {self.head_init!r}")
        if self.head_fit_pairs < 1:
            raise ValueError(f"TrainConfig.head_fit_pairs must be >= 1, got {self.head_fit_pairs}")
        if self.head_ridge < 0:
            raise ValueError(f"TrainConfig.head_ridge must be >= 0, got {self.head_ridge}")

    @property
    def held_out_seed(self) -> int:
        """The seed of the held-out split."""
        return self.seed if self.split_seed is None else self.split_seed

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


@dataclass
class TrainResult:
    """What train_decoder returns: run folder, steps done, skipped steps, per-step history, the live 2x codec."""

    out: Path
    step: int
    skipped: list[int]
    history: list[dict]
    summary: dict
    codec2x: Any = None  # the trained 2x codec with this process's live (not EMA) weights


# ------------------------------------------------------------------------------------------------------------
# the pieces of one step
# ------------------------------------------------------------------------------------------------------------


def degrade_batch(degrader, latents: torch.Tensor, indices: Sequence[int], step: int, seed: int,
                  sigma_range: tuple[float, float], ids: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(degraded latents, sigmas): sample i's sigma ~ U[sigma_range] and noise from its own generator.

    Generators keyed by (seed, step, dataset index) make the degradation independent of how the global batch is
    split across processes (DDP == one process at the same global batch) and of resumption.
    """
    if degrader is None:
        return latents, torch.zeros(len(indices))
    gens = [sample_generator(seed, step, int(i), stream=1) for i in indices]
    lo, hi = sigma_range
    sigma = torch.tensor([lo + (hi - lo) * torch.rand((), generator=g).item() for g in gens])
    return degrader.degrade_samples(latents, sigma, gens, ids)


def _grid(lq_up: torch.Tensor, ours: torch.Tensor, hq: torch.Tensor) -> torch.Tensor:
    """Rows of [LQ-decode + bicubic | ours | HQ] stacked vertically: one 3 x H x 3W image."""
    rows = [torch.cat([a, b, c], dim=-1) for a, b, c in zip(lq_up, ours, hq)]
    return torch.cat(rows, dim=-2)


@torch.no_grad()
def validation_images(
    original, model2x, val_batch: dict, sigma: float, degrader, seed: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """The validation grid and metrics at a fixed sigma: original decoder + bicubic vs ours vs HQ."""
    z, hq = val_batch["latent"], val_batch["hq"]
    zd = z
    if degrader is not None and sigma > 0:
        gens = [sample_generator(seed, 0, i, stream=3) for i in range(len(z))]
        zd, _ = degrader.degrade_samples(z, torch.full((len(z),), float(sigma)), gens, val_batch.get("id"))
    base = F.interpolate(original.decode(zd).float(), scale_factor=2, mode="bicubic", align_corners=False)
    ours = model2x(zd).float()
    base, ours = base.clamp(-1, 1), ours.clamp(-1, 1)
    hq = hq.float()
    metrics = {
        "psnr_ours": psnr(ours, hq).mean().item(),
        "psnr_bicubic": psnr(base, hq).mean().item(),
        "mean_colour_err": (ours.mean((0, 2, 3)) - hq.mean((0, 2, 3))).abs().mean().item(),
    }
    return _grid(base.cpu(), ours.cpu(), hq.cpu()), metrics


@dataclass
class DecoderModels:
    """Everything a decoder step touches: the 2x decoder (wrapped and raw), discriminator, loss, EMA, optimisers."""

    original: nn.Module  # the frozen 1x codec (baseline column of the validation grid)
    model: TwoXDecoder
    fwd: nn.Module  # model as accelerate prepared it (DDP, compile)
    disc: nn.Module  # discriminator as prepared
    disc_raw: nn.Module
    loss_fn: DecoderLoss
    ema: Any
    names: list[str]  # decoder parameter names, in the order of params
    params: list[nn.Parameter]
    opt_g: Any
    sched_g: Any
    opt_d: Any
    sched_d: Any


def head_fit_batches(cfg: TrainConfig, train_set, degrader, device: torch.device, batch: int = 2
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(latents, HQ) batches of cfg.head_fit_pairs seeded training pairs, degraded as training degrades them."""
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(mix_seed(cfg.seed, 12)))
    chosen = order[: cfg.head_fit_pairs].tolist()
    for start in range(0, len(chosen), batch):
        idx = chosen[start : start + batch]
        items = [train_set[i] for i in idx]
        z = torch.stack([it["latent"] for it in items]).float().to(device)
        if degrader is not None and cfg.head_fit_degraded:
            gens = [sample_generator(cfg.seed, 0, i, stream=4) for i in idx]
            lo, hi = cfg.sigma_min, cfg.sigma_max
            sigma = torch.tensor([lo + (hi - lo) * torch.rand((), generator=g).item() for g in gens])
            z = degrader.degrade_samples(z, sigma, gens, [it.get("id") for it in items])[0]
        yield z, torch.stack([it["hq"] for it in items]).float()


def build_models(cfg: TrainConfig, codec, acc, loss_fn: DecoderLoss | None, fit_data=None) -> DecoderModels:
    """The 2x decoder (its head as cfg.head_init, fitted on fit_data), discriminator, loss, EMA and optimisers."""
    device = acc.device
    original = codec.eval().to(device)
    # The fit only for a new run: a resumed or continued run loads its head from the checkpoint.
    model = TwoXDecoder(codec.to_2x(cfg.head_init if fit_data is not None else "nearest", fit_data, cfg.head_ridge))
    model = model.to(device)
    model.train()
    if cfg.grad_checkpointing:
        model.enable_gradient_checkpointing()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(cfg.seed, 11))
        disc = PatchDiscriminator(3, cfg.loss.disc_channels, cfg.loss.disc_layers).to(device)
    loss_fn = (loss_fn or DecoderLoss(cfg.loss)).to(device)
    if cfg.channels_last:
        for module in (model, disc, loss_fn):
            for conv in module.modules():  # 2-D convolutions only (Wan's VAE also holds 3-D ones)
                if isinstance(conv, nn.Conv2d):
                    conv.to(memory_format=torch.channels_last)
    names = list(model.trainable_state())
    params = [model.trainable_state()[n] for n in names]
    # A multi-tensor update instead of a Python loop over parameters, which cost ~5 ms of launches per step on a GPU
    # (bench train); the same update to float rounding.
    ema = build_ema(params, cfg.ema_decay)
    ema.to(device)
    opt_g, sched_g = build_optimizer(params, cfg.lr, cfg.betas, cfg.weight_decay, cfg.lr_schedule, cfg.warmup_steps, cfg.steps)
    opt_d, sched_d = build_optimizer(disc.parameters(), cfg.disc_lr, cfg.betas, cfg.weight_decay, cfg.lr_schedule,
                                     cfg.warmup_steps, cfg.steps)
    return DecoderModels(original, model, model, disc, disc, loss_fn, ema, names, params, opt_g, sched_g, opt_d, sched_d)


CHECKPOINT_TENSORS = ("decoder", "ema", "discriminator")


def _start_from(m: DecoderModels, cfg: TrainConfig, acc) -> Progress:
    """A new run continuing cfg.init_from's checkpoint (weights, EMA, optimiser moments, step) with cfg's settings."""
    path = Path(cfg.init_from)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path}: init_from must be a checkpoint folder (RUN/checkpoints/step_N)")
    found = (path, *CheckpointManager(path.parent, acc).load(path, CHECKPOINT_TENSORS))
    progress = restore_progress(acc, found, partial(_restore, m, acc))
    _use_own_settings(m, cfg)
    return progress


def _use_own_settings(m: DecoderModels, cfg: TrainConfig) -> None:
    """Make restored optimisers, schedules and EMA use cfg's lr, disc_lr, betas, weight_decay and ema_decay."""
    # The other run's states carry its own settings (param_groups, the schedules' base_lrs, the EMA's decay), which
    # would win over the ones this run's config.json records; its moments, step counts and weights are what continues.
    for opt, sched, lr in ((m.opt_g, m.sched_g, cfg.lr), (m.opt_d, m.sched_d, cfg.disc_lr)):
        sched.base_lrs = [lr] * len(opt.param_groups)
        for group, factor in zip(opt.param_groups, sched.lr_lambdas):
            # The schedule's own formula at the restored step: the lr its next step() would keep computing.
            group.update(initial_lr=lr, lr=lr * factor(sched.last_epoch), betas=tuple(cfg.betas),
                         weight_decay=cfg.weight_decay)
        sched._last_lr = [group["lr"] for group in opt.param_groups]
    m.ema.decay = cfg.ema_decay


def _restore(m: DecoderModels, acc, path: Path, tensors: dict, objects: dict, state: dict) -> None:
    """Load a checkpoint's decoder, discriminator, EMA, optimisers and schedules into m."""
    device = acc.device
    m.model.load_trainable_state(tensors["decoder"], str(path))
    m.disc_raw.load_state_dict(tensors["discriminator"])
    ema_state = dict(state["ema"])
    ema_state["shadow_params"] = [tensors["ema"][n] for n in m.names]
    m.ema.load_state_dict(ema_state)
    m.ema.to(device)
    load_optimizer_state(m.opt_g, objects["opt_g"])
    load_optimizer_state(m.opt_d, objects["opt_d"])
    m.sched_g.load_state_dict(objects["sched_g"])
    m.sched_d.load_state_dict(objects["sched_d"])


def _save_checkpoint(m: DecoderModels, ckpts: CheckpointManager, step: int, skipped: list[int], preset: str, family: str) -> None:
    """Write the decoder, EMA, discriminator, optimiser and schedule states at a step (finite weights only)."""
    _check_weights_finite(m, ckpts.folder.parent, step, ckpts)
    ema_meta = {k: v for k, v in m.ema.state_dict().items() if k != "shadow_params"}
    ckpts.save(
        step,
        {"decoder": m.model.trainable_state(), "ema": dict(zip(m.names, m.ema.shadow_params)),
         "discriminator": m.disc_raw.state_dict()},
        {"opt_g": m.opt_g.optimizer.state_dict(), "opt_d": m.opt_d.optimizer.state_dict(),
         "sched_g": m.sched_g.state_dict(), "sched_d": m.sched_d.state_dict()},
        {"skipped": skipped, "ema": ema_meta, "preset": preset, "family": family},
    )


def _check_weights_finite(m: DecoderModels, out: Path, step: int, ckpts: CheckpointManager) -> None:
    """Stop the run (ValueError, nothing saved) when the decoder's live or EMA weights hold a NaN or inf.

    Skipping steps cannot repair such weights (every later loss is NaN), and saving them would make a checkpoint
    that export and upscale would turn into black images.
    """
    tensors = [p.detach() for p in m.params] + list(m.ema.shadow_params)
    flags = torch.stack([torch.isfinite(t).all() for t in tensors])
    if not bool(flags.all()):  # one host read; the names only when something is wrong
        names = m.names + [f"EMA of {n}" for n in m.names]
        bad = [n for n, ok in zip(names, flags.tolist()) if not ok]
        latest = ckpts.latest()
        kept = f"the last checkpoint, {latest}, is from before" if latest else "no checkpoint was written"
        raise ValueError(f"{out}: the decoder's weights stopped being finite by step {step} ({bad[0]}; lr too "
                         f"high, or a loss weight out of scale): run stopped, {kept}")


def _nan_probe(value: torch.Tensor) -> torch.Tensor:
    """0 where value is finite, NaN where it is not (inf * 0 is NaN): a device-side flag, nothing read back."""
    return (value.detach().float() * 0).sum()


def micro_step(m: DecoderModels, acc, zd: torch.Tensor, hq: torch.Tensor, step: int, reduce,
               timer=NO_TIMINGS) -> tuple[dict, torch.Tensor, bool]:
    """Forward, losses and backward of one micro-batch: (loss terms, finiteness probe, GAN on).

    Nothing is read back to the host here: the probe is 0 when the losses are finite and NaN when not; the loop sums
    it over the window and reads it once per optimiser step, which then drops the whole window on every process.
    A non-finite loss is back-propagated like any other (its gradients are dropped with the window's).
    """
    with acc.autocast():
        pred = m.fwd(zd)
    timer.split("decoder forward")
    loss, terms = m.loss_fn.generator(pred, hq, step, m.disc_raw, m.model.codec.conv_out.weight, reduce)
    timer.split("losses")
    probe = _nan_probe(loss)
    d_active = m.loss_fn.gan_active(step)
    if timer.active and pred.requires_grad and not d_active:
        # The gradient at pred is complete once the loss side (LPIPS) is done: the decoder's part starts. (With the
        # GAN on, the loss side is differentiated inside generator, and that time is in "losses".)
        pred.register_hook(lambda grad: timer.split("loss backward"))
    acc.backward(loss)
    timer.split("decoder backward")
    if d_active:
        with acc.autocast():
            d_loss, d_terms = m.loss_fn.discriminator_loss(m.disc, pred, hq)
        probe = probe + _nan_probe(d_loss)
        acc.backward(d_loss)
        terms.update(d_terms)
        timer.split("discriminator")
    return terms, probe, d_active


def optimizer_step(m: DecoderModels, acc, cfg: TrainConfig, skip: bool, d_active: bool) -> None:
    """Apply the accumulated gradients (or drop them when the window had a non-finite loss), step the schedules."""
    apply_update(acc, not skip, [Update(m.opt_g, m.sched_g, m.params),
                                 Update(m.opt_d, m.sched_d, m.disc.parameters(), d_active)],
                 cfg.max_grad_norm, after_update=lambda: m.ema.step(m.params),
                 threads=cfg.update_threads if acc.device.type == "cpu" else 0)


def _validate(m: DecoderModels, val_batch: dict, cfg: TrainConfig, degrader) -> tuple[torch.Tensor, dict[str, float]]:
    """The validation grid and metrics with the EMA weights."""
    m.ema.store(m.params)
    m.ema.copy_to(m.params)
    m.model.eval()
    try:
        return validation_images(m.original, m.model, val_batch, cfg.val_sigma, degrader, cfg.seed)
    finally:
        m.model.train()
        m.ema.restore(m.params)


def _decoder_data(cfg: TrainConfig, codec, pairs, latents, train_set, val_set):
    """(train, held-out) datasets: the ones given, or a pair set on disk with its latent cache split by source photo."""
    if train_set is not None:
        return train_set, val_set
    if pairs is None:
        raise ValueError("train_decoder: give train_set or pairs")
    cache = LatentCache(latents or default_cache_dir(pairs, cfg.preset), expect=codec)
    train_set, val_set = PairDataset(pairs, latents=cache).split(cfg.val_fraction, cfg.held_out_seed)
    if len(train_set) == 0:
        raise ValueError(f"{pairs}: no training pairs after the held-out split")
    return train_set, val_set


# ------------------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------------------


@holds_run_lock
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
    timings: StepTimings | None = None,
) -> TrainResult:
    """Train the 2x decoder on (latent, HQ) pairs; checkpoints, TensorBoard and summary.json under out.

    Data: ``train_set``/``val_set`` (items with "latent" and "hq", and "id" for cached teacher data), or ``pairs``
    (+ ``latents``) for a pair set on disk, split by source photo. ``codec``: the preset's 1x codec unless given.
    ``degrader``: a ``ldlib.degrade`` degrader, None for none, or "config" to parse ``cfg.degrader``.
    ``stop_at`` ends the run early at that step (a simulated interruption; the schedule still targets ``cfg.steps``).
    ``timings``: a ``ldlib.core.profiling.StepTimings`` to fill with each step's pieces (``python -m ldlib bench train``).
    """
    t_start = time.time()
    out = Path(out)
    acc = accelerator or make_accelerator(cfg.mixed_precision, cfg.grad_accum)
    device = acc.device
    preset = get_preset(cfg.preset, taef2_path=cfg.taef2_dir, **vae_overrides(cfg))
    if codec is None:
        codec = codec_of(preset)
    degrader, degrader_name = run_degrader(degrader, cfg, preset, codec, device)
    train_set, val_set = _decoder_data(cfg, codec, pairs, latents, train_set, val_set)
    ids = getattr(train_set, "ids", None)
    if cfg.loss.gan_weight > 0 and cfg.loss.gan_start >= cfg.steps:
        acc.print(f"the GAN never turns on in this run: gan_start {cfg.loss.gan_start} >= steps {cfg.steps} "
                  f"(set gan_start below steps, or gan_weight 0 to say so)")
    if degrader is not None and ids is not None and degrader.coverage(ids) < 1:
        acc.print(f"{degrader_name}: {degrader.coverage(ids):.0%} of {len(ids)} training pairs can be degraded "
                  f"(a record with sigma in [{cfg.sigma_min}, {cfg.sigma_max}]); the rest train clean")

    checked = cfg.to_dict()
    prior = out / "config.json"
    if resume and prior.is_file():
        with contextlib.suppress(ValueError):  # open_run names an unreadable config.json
            if "head_init" not in json.loads(prior.read_text()):
                # A run from before the head choice: it started from the nearest copy and has no head_* settings.
                cfg = dataclasses.replace(cfg, head_init="nearest")
                checked = {k: v for k, v in cfg.to_dict().items() if not k.startswith("head_")}
    ckpts, found = open_run(out, acc, resume, cfg.keep_checkpoints, checked, type(cfg)().to_dict())
    fit_data = None
    if cfg.head_init == "least-squares" and found is None and not cfg.init_from:
        acc.print(f"fitting the 2x head on {min(cfg.head_fit_pairs, len(train_set))} training pairs (least squares)")
        fit_data = head_fit_batches(cfg, train_set, degrader, device)
    m = build_models(cfg, codec, acc, loss_fn, fit_data)
    progress = resume_progress(ckpts, acc, CHECKPOINT_TENSORS, partial(_restore, m, acc)) if resume else Progress()
    if progress.step == 0 and cfg.init_from:
        progress = _start_from(m, cfg, acc)
    start = progress.step
    write_config(out, acc, cfg.to_dict())  # only now: every setting was accepted and the resume worked
    m.fwd, m.disc, m.opt_g, m.opt_d = acc.prepare(torch.compile(m.model) if cfg.compile else m.model, m.disc_raw,
                                                  m.opt_g, m.opt_d)
    m.disc_raw = acc.unwrap_model(m.disc)
    reduce = (lambda t: acc.reduce(t, reduction="mean")) if acc.num_processes > 1 else None

    stop = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    sampler = GlobalBatchSampler(len(train_set), cfg.batch, acc.num_processes, acc.process_index, cfg.seed,
                                 start=start * cfg.grad_accum, stop=stop * cfg.grad_accum)
    # Pinned batches make the host-to-GPU copies asynchronous (non_blocking below).
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_pairs,
                                         num_workers=loader_workers(cfg.num_workers, device, acc.num_processes),
                                         pin_memory=device.type == "cuda")
    val_batch = None
    if val_set is not None and len(val_set) > 0 and acc.is_main_process:
        items = collate_pairs([val_set[i] for i in range(min(cfg.val_count, len(val_set)))])
        val_batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in items.items()}

    log = RunLogger(out, acc, total=stop, initial=start, desc="train-decoder")
    val_metrics: dict[str, float] = {}
    if start > 0 and start % cfg.val_every == 0 and val_batch is not None:
        # The run that reached this step validated here, and this logger hides its events from this step on
        # (purge_step): log it again, the same numbers (the EMA is the checkpoint's), outside the RNG streams the
        # run goes on with.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            val_metrics = _log_validation(m, log, start, val_batch, cfg, degrader)
    # Loss terms stay on the device and are read every log_every steps (and before checkpoints and at the end):
    # no host sync per step but the one that decides whether the optimiser step is skipped.
    pending = PendingRecords(device, reduce)
    timer = timings if timings is not None else NO_TIMINGS

    def one_step(window, step: int) -> None:
        probe = None
        for i, batch in enumerate(window):
            micro = step * cfg.grad_accum + i
            mine = sampler.global_batch(micro)[acc.process_index * cfg.batch : (acc.process_index + 1) * cfg.batch]
            z, hq = batch["latent"].to(device, non_blocking=True), batch["hq"].to(device, non_blocking=True)
            timer.split("data")
            zd, sigma = degrade_batch(degrader, z, mine, step, cfg.seed, (cfg.sigma_min, cfg.sigma_max), batch.get("id"))
            timer.split("degradation")
            with acc.accumulate(m.fwd, m.disc):
                terms, p, d_active = micro_step(m, acc, zd, hq, step, reduce, timer)
            probe = p if probe is None else probe + p
            pending.add_micro(terms | {"sigma_mean": sigma.mean()})
            timer.split("logging")
        # The one host read per optimiser step: an exact skip must know before the optimiser and EMA move.
        window_ok = all_finite(acc, probe)
        lr = m.opt_g.param_groups[0]["lr"]  # the one this step uses: optimizer_step moves the schedule on
        optimizer_step(m, acc, cfg, skip=not window_ok, d_active=d_active)
        timer.split("optimiser + EMA")
        if not window_ok:
            _check_weights_finite(m, out, step, ckpts)  # a NaN loss from NaN weights is not one bad batch
            progress.record_skip(acc)
        pending.end_step(step=step, lr=lr, skipped=not window_ok)

    def validate(step: int) -> None:
        nonlocal val_metrics
        if step % cfg.val_every == 0 and val_batch is not None:
            val_metrics = _log_validation(m, log, step, val_batch, cfg, degrader)
            timer.split("validation", in_step=False)

    def save() -> None:
        _save_checkpoint(m, ckpts, progress.step, progress.skipped, cfg.preset, codec.family)

    t_loop = time.time()
    with contextlib.ExitStack() as scope:
        if cfg.compile:
            import torch._functorch.config as functorch_config

            # The adaptive GAN weight differentiates the same graph twice (retain_graph=True), which compiled
            # backward graphs with donated buffers refuse; switch donation off for this loop only.
            scope.enter_context(functorch_config.patch(donated_buffer=False))
        if timer.active and m.loss_fn.lpips is not None:
            lpips_hooks = (m.loss_fn.lpips.register_forward_pre_hook(lambda *_: timer.split("losses")),
                           m.loss_fn.lpips.register_forward_hook(lambda *_: timer.split("lpips forward")))
            scope.callback(lambda: [h.remove() for h in lpips_hooks])
        # (DataLoader workers, when asked for on CPU, are forked inside: they keep reusing their memory too.)
        scope.enter_context(reused_cpu_memory(cfg.reuse_cpu_memory and device.type == "cpu"))
        run_steps(accumulation_windows(loader, cfg.grad_accum), progress, stop, one_step, log, cfg.log_every,
                  cfg.checkpoint_every, save, pending=pending, between_steps=validate, bar_key="rec", timer=timer)
    step, skipped, history = progress.step, progress.skipped, progress.history
    samples = (step - start) * cfg.batch * cfg.grad_accum * acc.num_processes
    if val_batch is not None and (step % cfg.val_every != 0 or not val_metrics):
        val_metrics = _log_validation(m, log, step, val_batch, cfg, degrader)
    acc.wait_for_everyone()
    elapsed = time.time() - t_loop
    summary = {
        "out": str(out),
        "preset": cfg.preset,
        "family": codec.family,
        "degrader": degrader_name,
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
        "final_losses_mean_last_steps": mean_terms(history, last=20),
        "validation": val_metrics,
        "lpips_backbone_pretrained": bool(getattr(m.loss_fn.lpips, "backbone_pretrained", False)),
        "checkpoint": str(ckpts.latest()) if ckpts.latest() else None,
        "config": cfg.to_dict(),
    }
    if acc.is_main_process:
        atomic_write_bytes(out / "summary.json", json_bytes(summary))
    log.close()
    return TrainResult(out, step, skipped, history, summary, m.model.codec)


def _log_validation(m: DecoderModels, log: RunLogger, step: int, val_batch: dict, cfg: TrainConfig, degrader) -> dict:
    """Validate with the EMA weights and log the grid and metrics; returns the metrics."""
    grid, metrics = _validate(m, val_batch, cfg, degrader)
    log.image(step, "val/lq-decode+bicubic | ours (EMA) | HQ", grid)
    log.scalars(step, metrics, prefix="val")
    return metrics
