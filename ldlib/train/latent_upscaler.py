"""Training the latent 2x upscaler on a pair set: ``enc(LQ)``, degraded like a diffusion model's output -> ``enc(HQ)``.

One step: each LQ latent is degraded to its own sigma ~ U[sigma_min, sigma_max] by the run's degrader (the preset's
teacher live by default: what a diffusion model hands the upscaler in a hires fix), cut to a random ``crop`` (the
HQ latent at the same place, twice the size), upscaled, and pulled to the HQ latent with L1 (or MSE) in latent
space, plus, with ``image_weight`` / ``lpips_weight`` > 0, L1 / LPIPS of its decode through the frozen decoder
against the HQ pixels (the decoder's reconstruction loss, ``models.losses.DecoderLoss``, without the GAN).
Everything random is a function of (seed, step, sample index), so a resumed run and a DDP run reproduce one
uninterrupted process; the loop is ``train/loop.py``'s (resume, non-finite skip, checkpoints, history, summary).

Run folder: ``config.json``, ``checkpoints/``, ``tb/``, ``history.jsonl``, ``summary.json`` like every ldlib loop,
and the model in ``OUT/upscaler`` (``latent_upscaler.safetensors`` + ``config.json``, written whole at the end of
the run). HQ latents are encoded on first use into their own cache (``PAIRS/latents_hq/<preset>``).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from ..build import UPSCALER_SUBDIR, VOCABULARY, codec_of, load_latent_upscaler, run_degrader
from ..core.config import check_finite
from ..core.files import atomic_write_bytes, replaced_folder
from ..core.metrics import check_lpips_net, relative_error
from ..core.runs import (GlobalBatchSampler, RunLogger, build_optimizer, check_optimiser_settings, holds_run_lock,
                         json_bytes, load_optimizer_state, make_accelerator, mix_seed, open_run, sample_generator,
                         write_config)
from ..data.datasets import PairDataset, collate_pairs
from ..data.latents import LatentCache, default_cache_dir, encode_pairs
from ..models.latent_upscaler import CONFIG, LatentUpscaler, nearest_2x, save_latent_upscaler
from ..models.losses import DecoderLoss, LossConfig
from ..presets import PRESET_HELP, PRESETS, get_preset
from .decoder import degrade_batch
from .loop import Progress, guarded_update, resume_progress, run_steps, summary_fields

TRAIN_COMMAND = "python -m ldlib train-latent-upscaler"


@dataclass
class LatentUpscalerConfig:
    """Latent upscaler size and training settings."""

    preset: str = field(default="taef2", metadata={"help": f"whose latent space (its VAE): {PRESET_HELP}",
                                                   "choices": PRESETS})
    taef2_dir: str | None = field(default=None, metadata={"help": "taef2 weights folder (default: packaged / $LDLIB_TAEF2_DIR)"})
    # 192 (4.3M parameters): on held-out taef2 pairs +0.9 dB PSNR and +0.03 HaarPSI over 96 after the same 1,000 steps.
    width: int = field(default=192, metadata={"help": "channels of the residual blocks"})
    depth: int = field(default=6, metadata={"help": "residual blocks (each two 3x3 convs at the input's resolution)"})
    steps: int = field(default=1000, metadata={"help": "optimiser steps"})
    batch: int = field(default=8, metadata={"help": "latents per process and step (global batch = batch x processes)"})
    crop: int = field(default=16, metadata={"help": "side of the random LQ-latent crop trained on, in latent pixels "
                                                    "(0: whole latents); the HQ latent's crop is twice that"})
    lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    lr_schedule: str = field(default="cosine", metadata={"help": "any diffusers get_scheduler name"})
    warmup_steps: int = field(default=50, metadata={"help": "learning-rate warm-up steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    loss: Literal["l1", "mse"] = field(default="l1", metadata={"help": "latent-space loss against enc(HQ)"})
    image_weight: float = field(default=0.0, metadata={"help": "weight of L1 between the frozen decoder's decode of "
                                                               "the upscaled latent and the HQ pixels (0: off; costs "
                                                               "a decode and its backward per step; a decoder with "
                                                               "GroupNorm, such as taef2's, needs --crop 0)"})
    lpips_weight: float = field(default=0.0, metadata={"help": "weight of LPIPS between that decode and the HQ "
                                                               "pixels (the decoder's perceptual term; 0: off)"})
    lpips_net: Literal["alex", "vgg", "squeeze"] = field(default="vgg", metadata={"help": "LPIPS backbone (as the "
                                                                                   "decoder's --lpips-net)"})
    degrader: str = field(default="diffusion", metadata={"help": f"how the LQ latents are degraded: {VOCABULARY}"})
    sigma_min: float = field(default=0.0, metadata={"help": "sigma ~ U[sigma_min, sigma_max] per sample"})
    sigma_max: float = field(default=0.12, metadata={"help": "sigma ~ U[sigma_min, sigma_max] per sample"})
    val_fraction: float = field(default=0.1, metadata={"help": "held-out share of source photos (0: train on all; "
                                                               "evaluate on a separate test set)"})
    split_seed: int | None = field(default=None, metadata={"help": "seed of the held-out split (default: seed)"})
    val_every: int = field(default=200, metadata={"help": "steps between held-out checks (relative latent error)"})
    val_count: int = field(default=16, metadata={"help": "held-out latents of the check"})
    val_sigma: float = field(default=0.08, metadata={"help": "sigma of the degraded held-out check"})
    checkpoint_every: int = field(default=250, metadata={"help": "steps between checkpoints"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    log_every: int = field(default=10, metadata={"help": "steps between TensorBoard scalars"})
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(default="auto", metadata={"help": "auto: bf16 on CUDA, fp32 on CPU"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers"})
    seed: int = field(default=0, metadata={"help": "seeds the weights, batches, crops, sigmas and noise"})
    init_from: str | None = field(default=None, metadata={"help": "start from a trained latent upscaler of this "
                                                            "preset (its folder or run; same width and depth): its "
                                                            "weights, this run's optimiser and schedule"})

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        check_finite(self)
        for name in ("width", "steps", "batch", "checkpoint_every", "log_every", "val_every", "val_count"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"LatentUpscalerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.depth < 0 or self.crop < 0 or self.num_workers < 0:
            raise ValueError(f"LatentUpscalerConfig: depth, crop and num_workers must be >= 0, got {self.depth}, "
                             f"{self.crop}, {self.num_workers}")
        if not 0 <= self.sigma_min <= self.sigma_max <= 1 or not 0 <= self.val_sigma <= 1:
            raise ValueError(f"LatentUpscalerConfig: need 0 <= sigma_min <= sigma_max <= 1 and val_sigma in [0, 1], "
                             f"got {self.sigma_min}, {self.sigma_max}, {self.val_sigma}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"LatentUpscalerConfig.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.image_weight < 0 or self.lpips_weight < 0 or self.max_grad_norm < 0:
            raise ValueError(f"LatentUpscalerConfig: image_weight, lpips_weight and max_grad_norm must be >= 0, got "
                             f"{self.image_weight}, {self.lpips_weight}, {self.max_grad_norm}")
        check_lpips_net(self.lpips_net, "LatentUpscalerConfig.lpips_net")
        if self.loss not in ("l1", "mse"):
            raise ValueError(f"LatentUpscalerConfig.loss must be l1 or mse, got {self.loss!r}")
        check_optimiser_settings("LatentUpscalerConfig", self.lr, self.betas, self.weight_decay, self.warmup_steps,
                                 self.keep_checkpoints)

    @property
    def decodes(self) -> bool:
        """Whether a step decodes the upscaled latent (an image term is on)."""
        return self.image_weight > 0 or self.lpips_weight > 0

    @property
    def held_out_seed(self) -> int:
        """The seed of the held-out split."""
        return self.seed if self.split_seed is None else self.split_seed


def has_group_norm(modules) -> bool:
    """Whether any of the modules holds a GroupNorm (its statistics span the whole feature map)."""
    return any(isinstance(m, torch.nn.GroupNorm) for mod in modules for m in mod.modules())


def random_crops(z: torch.Tensor, z_hq: torch.Tensor, hq: torch.Tensor | None, crop: int, gens,
                 pixels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The same random place of each (LQ latent, HQ latent, HQ image): ``crop`` LQ-latent pixels, twice that in the
    HQ latent, ``2 * pixels * crop`` HQ pixels (``pixels``: image pixels per latent pixel). ``crop`` 0: whole."""
    h, w = z.shape[-2:]
    if crop == 0 or crop >= min(h, w):
        return z, z_hq, hq
    zs, hs, ims = [], [], []
    for k, g in enumerate(gens):
        top = int(torch.randint(0, h - crop + 1, (), generator=g))
        left = int(torch.randint(0, w - crop + 1, (), generator=g))
        zs.append(z[k, :, top : top + crop, left : left + crop])
        hs.append(z_hq[k, :, 2 * top : 2 * (top + crop), 2 * left : 2 * (left + crop)])
        if hq is not None:
            s = 2 * pixels
            ims.append(hq[k, :, s * top : s * (top + crop), s * left : s * (left + crop)])
    return torch.stack(zs), torch.stack(hs), torch.stack(ims) if hq is not None else None


def pairs_with_hq_latents(pairs: str | os.PathLike, codec, preset_name: str, latents=None, hq_latents=None,
                          load_images: bool = True, progress: bool = True, acc=None) -> PairDataset:
    """A pair set with its LQ and HQ latents (``latent``, ``hq_latent``); the HQ latents its cache lacks are encoded
    first (resumable, into their own cache: ``PAIRS/latents_hq/<preset>`` by default; by the main process only)."""
    lq = LatentCache(latents or default_cache_dir(pairs, preset_name), expect=codec)
    hq_dir = Path(hq_latents or default_cache_dir(pairs, preset_name, image="hq"))
    if acc is None or acc.is_main_process:
        encode_pairs(pairs, codec, hq_dir, batch_size=4, progress=progress, image="hq",
                     device=next(codec.parameters()).device)
    if acc is not None:
        acc.wait_for_everyone()
    hq = LatentCache(hq_dir, expect=codec, image="hq")
    return PairDataset(pairs, latents=lq, hq_latents=hq, load_images=load_images)


@holds_run_lock
def train_latent_upscaler(
    cfg: LatentUpscalerConfig,
    pairs: str | os.PathLike,
    out: str | os.PathLike,
    latents: str | os.PathLike | None = None,
    hq_latents: str | os.PathLike | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    accelerator=None,
    codec=None,
    degrader: object = "config",
    progress: bool = True,
) -> dict:
    """Train a LatentUpscaler on a pair set; writes the run (OUT) and the model (OUT/upscaler); returns the summary.

    ``degrader``: a ``ldlib.degrade`` degrader, None, or "config" to parse ``cfg.degrader``. ``stop_at`` ends the
    run early at that step (an interruption; the schedule still targets ``cfg.steps``).
    """
    t_start = time.time()
    out = Path(out)
    acc = accelerator or make_accelerator(cfg.mixed_precision)
    device = acc.device
    preset = get_preset(cfg.preset, taef2_path=cfg.taef2_dir)
    codec = (codec if codec is not None else codec_of(preset)).eval().requires_grad_(False)
    identity = codec.identity()
    if cfg.decodes and cfg.crop > 0 and has_group_norm(codec.decoder_modules()):
        raise ValueError(f"an image loss (image_weight or lpips_weight > 0) with crop {cfg.crop}: {preset.name}'s "
                         "decoder has GroupNorm layers, so a decoded crop is normalised with its own statistics, not "
                         "the whole image's, and the image loss would train the upscaler to undo that; use --crop 0 "
                         "(whole latents)")
    degrader, degrader_name = run_degrader(degrader, cfg, preset, codec, device)
    config = {**asdict(cfg), "pairs": str(pairs)}
    ckpts, _ = open_run(out, acc, resume, cfg.keep_checkpoints, config, asdict(type(cfg)()))
    data = pairs_with_hq_latents(pairs, codec.to(device), cfg.preset, latents, hq_latents,
                                 load_images=cfg.decodes, progress=progress, acc=acc)
    train_set, val_set = data.split(cfg.val_fraction, cfg.held_out_seed)
    if len(train_set) == 0:
        raise ValueError(f"{pairs}: no training pairs after the held-out split")
    channels = int(identity["latent_channels"])
    # The decoder's reconstruction loss (L1 + LPIPS, no GAN) on the decode of the upscaled latent.
    image_loss = (DecoderLoss(LossConfig(l1_weight=cfg.image_weight, lpips_weight=cfg.lpips_weight,
                                         lpips_net=cfg.lpips_net, gan_weight=0.0)).to(device) if cfg.decodes else None)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(cfg.seed, 31))
        net = LatentUpscaler(channels, cfg.width, cfg.depth).to(device)
    if cfg.init_from:  # a resumed run's checkpoint replaces these weights below
        start, _ = load_latent_upscaler(cfg.init_from, preset, codec)
        if start.config != net.config:
            raise ValueError(f"{cfg.init_from}: a latent upscaler of {start.config}, this run's is {net.config}; "
                             "set --width and --depth to its own")
        net.load_state_dict(start.state_dict())
    n_params = sum(p.numel() for p in net.parameters())
    opt, sched = build_optimizer(net.parameters(), cfg.lr, cfg.betas, cfg.weight_decay, cfg.lr_schedule,
                                 cfg.warmup_steps, cfg.steps)

    def restore(path: Path, tensors: dict, objects: dict, state: dict) -> None:
        net.load_state_dict(tensors["upscaler"])
        load_optimizer_state(opt, objects["opt"])
        sched.load_state_dict(objects["sched"])

    progress_ = resume_progress(ckpts, acc, ["upscaler"], restore) if resume else Progress()
    write_config(out, acc, config)
    net_w, opt = acc.prepare(net, opt)
    pixels = codec.spatial_factor

    # The held-out check: fixed latents and one fixed degradation of them (drawn once, outside the run's streams).
    val_items = [val_set[i] for i in range(min(cfg.val_count, len(val_set)))] if acc.is_main_process else []
    val = None
    if val_items:
        z_val = torch.stack([it["latent"] for it in val_items]).to(device)
        zd_val = z_val
        if degrader is not None and cfg.val_sigma > 0:  # its own generators: the run's streams are not touched
            gens = [sample_generator(cfg.seed, 0, i, stream=3) for i in range(len(val_items))]
            zd_val = degrader.degrade_samples(z_val, torch.full((len(z_val),), cfg.val_sigma), gens,
                                              [it["id"] for it in val_items])[0]
        val = (z_val, zd_val, torch.stack([it["hq_latent"] for it in val_items]).to(device))

    @torch.no_grad()
    def held_out_check() -> dict[str, float]:
        model = acc.unwrap_model(net_w).eval()
        z_val, zd_val, target = val
        rec = {"val_rel_err_clean": float(relative_error(model(z_val), target).mean()),
               f"val_rel_err_sigma_{cfg.val_sigma:g}": float(relative_error(model(zd_val), target).mean())}
        model.train()
        return rec

    def one_step(batch: dict, step: int) -> dict:
        global_idx = sampler.global_batch(step)
        mine = global_idx[acc.process_index * cfg.batch : (acc.process_index + 1) * cfg.batch]
        z, z_hq = batch["latent"].to(device), batch["hq_latent"].to(device)
        hq = batch["hq"].to(device) if cfg.decodes else None
        zd, sigma = degrade_batch(degrader, z, mine, step, cfg.seed, (cfg.sigma_min, cfg.sigma_max), batch.get("id"))
        gens = [sample_generator(cfg.seed, step, int(i), stream=5) for i in mine]
        zd, z_hq, hq = random_crops(zd, z_hq, hq, cfg.crop, gens, pixels)
        with acc.autocast():
            up = net_w(zd)
        diff = up.float() - z_hq.float()
        latent_loss = diff.abs().mean() if cfg.loss == "l1" else diff.pow(2).mean()
        loss = latent_loss
        rec: dict = {"step": step}
        if image_loss is not None:
            with acc.autocast():
                image = codec.decode(up, clamp=False)
            image_term, terms = image_loss.reconstruction(image, hq)
            loss = loss + image_term
            rec["image_l1"] = float(terms["l1"].detach())
            if "lpips" in terms:
                rec["lpips"] = float(terms["lpips"].detach())
        lr = opt.param_groups[0]["lr"]  # the one this step uses (sched.step() moves it on)
        ok = guarded_update(acc, loss, progress_, net_w.parameters(), opt, sched, cfg.max_grad_norm)
        return {**rec, "loss": float(loss.detach()), "latent_loss": float(latent_loss.detach()),
                "sigma_mean": float(sigma.mean()), "lr": lr, "skipped": not ok}

    def after_step(rec: dict) -> None:
        if val is not None and progress_.step % cfg.val_every == 0:
            rec.update(held_out_check())
            log.scalars(progress_.step, {k: v for k, v in rec.items() if k.startswith("val_")}, prefix="val")

    def save() -> None:
        ckpts.save(progress_.step, {"upscaler": acc.unwrap_model(net_w).state_dict()},
                   {"opt": opt.optimizer.state_dict(), "sched": sched.state_dict()},
                   {"skipped": progress_.skipped, "preset": cfg.preset})

    stop = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    sampler = GlobalBatchSampler(len(train_set), cfg.batch, acc.num_processes, acc.process_index, cfg.seed,
                                 progress_.step, stop)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_pairs,
                                         num_workers=cfg.num_workers)
    log = RunLogger(out, acc, total=stop, initial=progress_.step, desc="train-latent-upscaler", progress=progress)
    acc.print(f"latent upscaler: {n_params / 1e6:.2f}M parameters; {len(train_set)} training pairs from "
              f"{len(train_set.sources)} photos, {len(val_set)} held out")
    t_loop, start = time.time(), progress_.step
    run_steps(loader, progress_, stop, one_step, log, cfg.log_every, cfg.checkpoint_every, save,
              ("loss", "latent_loss", "lr", "sigma_mean"), after_step=after_step)
    log.close()
    acc.wait_for_everyone()
    elapsed, done_now = time.time() - t_loop, progress_.step - start
    summary: dict = {
        **summary_fields(out, progress_, cfg.steps, device, t_start, 20, asdict(cfg)),
        "pairs": str(pairs), "preset": cfg.preset, "degrader": degrader_name,
        "parameters": n_params, "processes": acc.num_processes, "train_pairs": len(train_set),
        "lpips_backbone_pretrained": (bool(getattr(image_loss.lpips, "backbone_pretrained", False))
                                      if image_loss is not None and image_loss.lpips is not None else None),
        "train_sources": train_set.sources, "held_out_sources": val_set.sources,
        "train_seconds_this_run": elapsed,
        "steps_per_s_this_run": done_now / elapsed if elapsed > 0 and done_now else None,
    }
    if acc.is_main_process:
        model = acc.unwrap_model(net_w).eval()
        if val is not None:
            with torch.no_grad():
                z_val, zd_val, target = val
                summary["held_out"] = {**held_out_check(), "nearest_rel_err_clean": float(
                    relative_error(nearest_2x(z_val), target).mean()), f"nearest_rel_err_sigma_{cfg.val_sigma:g}":
                    float(relative_error(nearest_2x(zd_val), target).mean())}
        info = {"preset": cfg.preset, "codec": identity, "parameters": n_params, "steps": progress_.step,
                "degrader": summary["degrader"], "sigma_range": [cfg.sigma_min, cfg.sigma_max],
                "train_sources": train_set.sources, "held_out_sources": val_set.sources,
                "trained_with": f"{TRAIN_COMMAND} {pairs} {out}", "training": asdict(cfg)}
        with replaced_folder(out / UPSCALER_SUBDIR, CONFIG) as staging:
            save_latent_upscaler(model, staging, info)
        summary["upscaler"] = str(out / UPSCALER_SUBDIR)
        summary["wall_seconds_this_run"] = time.time() - t_start
        atomic_write_bytes(out / "summary.json", json_bytes(summary))
    summary["history"] = progress_.history
    return summary
