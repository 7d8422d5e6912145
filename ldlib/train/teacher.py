"""The trained diffusion teacher: a small flow-matching ``WanTransformer3DModel`` in one codec's latent space.

Where no real diffusion model can be loaded (offline, CPU), ldlib trains its own in the latent space of a real
pretrained autoencoder (taef2). It is the same model class as the Wan teacher, called the same way
(``models.velocity.flow_velocity``: latents as one frame, ``timestep = 1000 * sigma``, one fixed prompt embedding)
under the same convention: ``x_s = (1 - s) x0 + s eps``, velocity ``v = eps - x0``.

A teacher folder (``OUT/teacher`` of ``train_teacher``; what the taef2 preset loads)::

    config.json, diffusion_pytorch_model.safetensors   the EMA transformer (diffusers ``save_pretrained``, fp16)
    prompt_embeds.safetensors                           the fixed 1 x L x D prompt embedding it was trained with
    teacher.json                                        codec identity of its latent space, TeacherConfig, sources
    eval.json, eval.png                                 held-out one-step denoise error per sigma vs "return x_sigma"
    samples.png                                         images generated from pure noise (Euler loop), decoded

The run folder ``OUT`` around it holds the training state like every ldlib loop: ``config.json``,
``checkpoints/`` (atomic, resumable), ``tb/``, ``history.jsonl``, ``summary.json``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from ..build import codec_of
from ..core.config import check_finite
from ..core.files import atomic_write_bytes, replaced_folder, save_figure
from ..core.images import save_image
from ..core.runs import (GlobalBatchSampler, RunLogger, build_ema, build_optimizer, check_optimiser_settings,
                         holds_run_lock, json_bytes, load_optimizer_state, make_accelerator, mix_seed, open_run,
                         sample_generator, write_config)
from ..data.latents import LatentCache, default_cache_dir
from ..data.pairs import read_manifest, split_by_source
from ..degrade import DiffusionDegrader
from ..models.teacher import TEACHER_MODEL_JSON, TEACHER_SUBDIR, TRAIN_COMMAND, load_teacher, save_teacher
from ..models.velocity import flow_velocity
from ..presets import PRESET_HELP, PRESETS, get_preset
from .loop import Progress, guarded_update, resume_progress, run_steps, summary_fields


@dataclass
class TeacherConfig:
    """Teacher size and training settings; the defaults are the ones the shipped taef2 teacher was trained with."""

    preset: str = field(default="taef2", metadata={
        "help": f"whose codec defines the latent space (its latents; its decoder for samples.png): {PRESET_HELP}",
        "choices": PRESETS})
    taef2_dir: str | None = field(default=None, metadata={"help": "taef2 weights folder (default: packaged / $LDLIB_TAEF2_DIR)"})
    # --- the model: a WanTransformer3DModel, patch 1x2x2 ------------------------------------------------------
    layers: int = field(default=4, metadata={"help": "transformer blocks"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    head_dim: int = field(default=48, metadata={"help": "width per head (model width = heads x head_dim)"})
    ffn_dim: int = field(default=768, metadata={"help": "feed-forward width"})
    freq_dim: int = field(default=256, metadata={"help": "sinusoidal timestep embedding width"})
    text_dim: int = field(default=32, metadata={"help": "width of the fixed prompt embedding (zeros)"})
    text_tokens: int = field(default=4, metadata={"help": "tokens of the fixed prompt embedding"})
    # --- training --------------------------------------------------------------------------------------------
    steps: int = field(default=18000, metadata={"help": "optimiser steps"})
    batch: int = field(default=16, metadata={"help": "samples per process and step (global batch = batch x processes)"})
    crop: int = field(default=16, metadata={"help": "square latent crop in latent pixels (the model sees (crop / 2)^2 tokens)"})
    lr: float = field(default=8e-4, metadata={"help": "learning rate (AdamW)"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    lr_schedule: str = field(default="cosine", metadata={"help": "any diffusers get_scheduler name"})
    warmup_steps: int = field(default=500, metadata={"help": "learning-rate warm-up steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA of the weights (what the teacher folder holds)"})
    # sigma ~ U(0, low_sigma_max] with probability low_sigma_share, else logit-normal: the recipe uses
    # sigma <= 0.3, generation from noise needs all of (0, 1]
    sigma_mean: float = field(default=0.0, metadata={"help": "logit-normal sigma: mean of the logit"})
    sigma_std: float = field(default=1.0, metadata={"help": "logit-normal sigma: std of the logit"})
    low_sigma_share: float = field(default=0.5, metadata={"help": "share of training sigmas drawn from U(0, low_sigma_max] instead"})
    low_sigma_max: float = field(default=0.3, metadata={"help": "upper end of the low-sigma share (the recipe uses sigma <= 0.3)"})
    hflip: bool = field(default=False, metadata={"help": "random horizontal flips of latent crops (off: a flipped taef2 latent is not the latent of the flipped image)"})
    val_fraction: float = field(default=0.2, metadata={"help": "held-out share of source photos"})
    split_seed: int = field(default=1, metadata={"help": "seed of the held-out split (1: holds out p09 and p12 of the shared photos)"})
    # --- evaluation, samples, run cadence --------------------------------------------------------------------
    eval_sigmas: tuple[float, ...] = field(default=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9), metadata={"help": "sigmas of eval.json"})
    eval_draws: int = field(default=2, metadata={"help": "noise draws per held-out latent and sigma in eval.json"})
    eval_every: int = field(default=1000, metadata={"help": "steps between quick held-out checks (EMA, sigma <= 0.3) in TensorBoard/history"})
    eval_quick: int = field(default=32, metadata={"help": "held-out latents of the quick check"})
    sample_count: int = field(default=8, metadata={"help": "images in samples.png"})
    sample_steps: int = field(default=40, metadata={"help": "Euler steps from pure noise for samples.png"})
    sample_size: int = field(default=32, metadata={"help": "latent size of the samples (x 8 px decoded)"})
    checkpoint_every: int = field(default=1000, metadata={"help": "steps between checkpoints"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    log_every: int = field(default=10, metadata={"help": "steps between TensorBoard scalars"})
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(default="auto", metadata={"help": "auto: bf16 on CUDA, fp32 on CPU"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers"})
    seed: int = field(default=0, metadata={"help": "seeds the weights, batches, crops, sigmas and noise"})

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.eval_sigmas = tuple(float(s) for s in self.eval_sigmas)
        check_finite(self)
        for name in ("layers", "heads", "head_dim", "ffn_dim", "steps", "batch", "crop", "checkpoint_every",
                     "log_every", "eval_every", "eval_draws", "sample_steps", "text_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TeacherConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.crop % 2:
            raise ValueError(f"TeacherConfig.crop must be even (patch 2x2), got {self.crop}")
        if not 0.0 <= self.low_sigma_share <= 1.0 or not 0.0 < self.low_sigma_max <= 1.0:
            raise ValueError(f"need low_sigma_share in [0, 1] and low_sigma_max in (0, 1], got "
                             f"{self.low_sigma_share}, {self.low_sigma_max}")
        if any(not 0.0 < s <= 1.0 for s in self.eval_sigmas):
            raise ValueError(f"eval_sigmas must lie in (0, 1], got {self.eval_sigmas}")
        if not 0 <= self.val_fraction < 1 or not 0 <= self.ema_decay < 1:
            raise ValueError(f"TeacherConfig: need val_fraction and ema_decay in [0, 1), got {self.val_fraction}, "
                             f"{self.ema_decay}")
        check_optimiser_settings("TeacherConfig", self.lr, self.betas, self.weight_decay, self.warmup_steps,
                                 self.keep_checkpoints)

    def transformer_config(self, channels: int) -> dict:
        """The WanTransformer3DModel config of this teacher for latents with ``channels`` channels."""
        return dict(
            patch_size=(1, 2, 2), num_attention_heads=self.heads, attention_head_dim=self.head_dim,
            in_channels=channels, out_channels=channels, text_dim=self.text_dim, freq_dim=self.freq_dim,
            ffn_dim=self.ffn_dim, num_layers=self.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            rope_max_seq_len=1024,
        )

    @classmethod
    def from_dict(cls, d: dict) -> "TeacherConfig":
        """Inverse of asdict; unknown keys are an error naming them."""
        import dataclasses

        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown TeacherConfig keys: {', '.join(unknown)}")
        return cls(**d)


def build_transformer(cfg: TeacherConfig, channels: int, seed: int = 0):
    """A freshly initialised (seeded) teacher transformer."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**cfg.transformer_config(channels))


def fixed_prompt_embeds(cfg: TeacherConfig) -> torch.Tensor:
    """The one prompt embedding a teacher is trained and run with: zeros, 1 x text_tokens x text_dim."""
    return torch.zeros(1, cfg.text_tokens, cfg.text_dim)


def sample_sigma(cfg: TeacherConfig, generator: torch.Generator) -> float:
    """One training sigma in (0, 1): U(0, low_sigma_max] with prob. low_sigma_share, else logit-normal."""
    u = float(torch.rand((), generator=generator))
    if u < cfg.low_sigma_share:
        return cfg.low_sigma_max * (1.0 - float(torch.rand((), generator=generator)))  # (0, max]
    n = float(torch.randn((), generator=generator))
    return 1.0 / (1.0 + math.exp(-(cfg.sigma_mean + cfg.sigma_std * n)))


def training_sample(latent: torch.Tensor, cfg: TeacherConfig, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(x0 crop, eps, sigma) of one training sample, all drawn from its own generator."""
    c, h, w = latent.shape
    size = min(cfg.crop, h, w) // 2 * 2
    top = int(torch.randint(0, h - size + 1, (), generator=generator))
    left = int(torch.randint(0, w - size + 1, (), generator=generator))
    x0 = latent[:, top : top + size, left : left + size]
    if cfg.hflip and bool(torch.rand((), generator=generator) < 0.5):
        x0 = x0.flip(-1)
    sigma = sample_sigma(cfg, generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    return x0.float(), eps, sigma


# ------------------------------------------------------------------------------------------------------------
# evaluation and samples
# ------------------------------------------------------------------------------------------------------------


def eval_noise(seed: int, sigma_index: int, latent_index: int, draw: int, shape: Sequence[int]) -> torch.Tensor:
    """The eval noise of one (sigma, held-out latent, draw): fixed by the seed, the same in every run."""
    g = sample_generator(seed, sigma_index, latent_index, stream=100 + draw)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


@torch.no_grad()
def evaluate_teacher(
    transformer, prompt_embeds: torch.Tensor, latents: torch.Tensor, sigmas: Sequence[float], draws: int = 1,
    seed: int = 0, batch_size: int = 16,
) -> dict:
    """Per sigma: mean |x0_hat - x0| of the one-step denoise ``x0_hat = x_s - s v(x_s, s)`` vs ``|x_s - x0|``.

    ``latents``: N x C x H x W held-out clean latents; the noise of each (sigma, latent, draw) is ``eval_noise``.
    The ratio below 1 says by how much one teacher step beats "return x_sigma" (the degrader's lower bound).
    """
    device = next(transformer.parameters()).device
    step = DiffusionDegrader(transformer, prompt_embeds, steps=1, batch_size=batch_size)
    rows = []
    for j, s in enumerate(sigmas):
        err_model = err_xs = sq_model = sq_xs = 0.0
        count = 0
        for d in range(draws):
            for i0 in range(0, len(latents), batch_size):
                x0 = latents[i0 : i0 + batch_size].float()
                eps = torch.stack([eval_noise(seed, j, i0 + k, d, x0.shape[1:]) for k in range(len(x0))])
                x_s = (1 - s) * x0 + s * eps
                x0_hat = step.denoise(x_s.to(device), float(s)).float().cpu()
                err_model += (x0_hat - x0).abs().sum().item()
                err_xs += (x_s - x0).abs().sum().item()
                sq_model += ((x0_hat - x0) ** 2).sum().item()
                sq_xs += ((x_s - x0) ** 2).sum().item()
                count += x0.numel()
        rows.append({
            "sigma": float(s),
            "teacher_l1": err_model / count,
            "x_sigma_l1": err_xs / count,
            "ratio": err_model / err_xs,
            "teacher_rmse": math.sqrt(sq_model / count),
            "x_sigma_rmse": math.sqrt(sq_xs / count),
            "ratio_rmse": math.sqrt(sq_model / sq_xs),
        })
    return {"latents": int(len(latents)), "draws": int(draws), "seed": int(seed), "rows": rows}


def plot_eval(result: dict, path: str | os.PathLike) -> None:
    """eval.png: held-out one-step denoise error and the "return x_sigma" error per sigma, and their ratio."""
    from matplotlib.figure import Figure

    rows = result["rows"]
    s = [r["sigma"] for r in rows]
    fig = Figure(figsize=(9, 3.4), dpi=100)
    a, b = fig.subplots(1, 2)
    a.plot(s, [r["teacher_l1"] for r in rows], "o-", label="teacher, one step: |x0_hat - x0|")
    a.plot(s, [r["x_sigma_l1"] for r in rows], "s--", label='"return x_sigma": |x_s - x0|')
    a.set_xlabel("sigma")
    a.set_ylabel("mean abs. error (latent units)")
    a.legend(fontsize=8)
    b.plot(s, [r["ratio"] for r in rows], "o-")
    b.axhline(1.0, color="grey", lw=0.8)
    b.set_ylim(0, max(1.1, max(r["ratio"] for r in rows) * 1.05))
    b.set_xlabel("sigma")
    b.set_ylabel("teacher / return x_sigma")
    fig.suptitle(f"held-out latents ({result['latents']} x {result['draws']} draws)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


@torch.no_grad()
def generate(transformer, prompt_embeds: torch.Tensor, count: int, channels: int, size: int, steps: int = 40,
             seed: int = 0) -> torch.Tensor:
    """Latents generated from pure noise: the degrader's Euler loop from sigma 1 to 0 in ``steps`` steps."""
    device = next(transformer.parameters()).device
    noise = torch.randn(count, channels, size, size, generator=torch.Generator().manual_seed(seed))
    return DiffusionDegrader(transformer, prompt_embeds, steps=steps).denoise(noise.to(device), 1.0).float().cpu()


@torch.no_grad()
def save_samples(codec, latents: torch.Tensor, path: str | os.PathLike, per_row: int = 4) -> None:
    """Decode generated latents with the codec and write them as one PNG grid."""
    imgs = codec.decode(latents.to(next(codec.parameters()).device)).float().cpu().clamp(-1, 1)
    n, _, h, w = imgs.shape
    rows = math.ceil(n / per_row)
    grid = torch.full((1, 3, rows * (h + 4) - 4, per_row * (w + 4) - 4), 1.0)
    for k in range(n):
        r, c = divmod(k, per_row)
        grid[0, :, r * (h + 4) : r * (h + 4) + h, c * (w + 4) : c * (w + 4) + w] = imgs[k]
    save_image(grid, Path(path))


# ------------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------------


class _Indexed(torch.utils.data.Dataset):
    """Item i of an in-memory latent tensor, with its index (the key of its per-sample randomness)."""

    def __init__(self, latents: torch.Tensor) -> None:
        self.latents = latents

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        return {"latent": self.latents[i], "index": i}


def load_split_latents(pairs: str | os.PathLike, cache, val_fraction: float, split_seed: int
                       ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """(train latents, held-out latents, train sources, held-out sources) of a pair set, split by source photo."""
    records = [r for r in read_manifest(pairs) if r["id"] in cache]
    if not records:
        raise ValueError(f"{cache.folder}: holds no latent of the pairs in {pairs}; run `python -m ldlib encode` first")
    train_ids, val_ids = split_by_source(records, val_fraction, split_seed)
    src = {r["id"]: r["source"] for r in records}
    val_sources = sorted({src[i] for i in val_ids})
    train_sources = sorted({src[i] for i in train_ids})
    val = cache.get_many(sorted(val_ids)).float() if val_ids else torch.zeros(0)
    return cache.get_many(sorted(train_ids)).float(), val, train_sources, val_sources


@holds_run_lock
def train_teacher(
    cfg: TeacherConfig,
    pairs: str | os.PathLike,
    out: str | os.PathLike,
    latents: str | os.PathLike | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    accelerator=None,
    codec=None,
) -> dict:
    """Train the teacher on a pair set's cached latents; writes the run (OUT) and the EMA teacher (OUT/teacher).

    ``stop_at`` ends the run early at that step (an interruption; the schedule still targets ``cfg.steps``); the
    teacher folder, eval and samples are written when the run reaches ``cfg.steps``.
    """
    t_start = time.time()
    out = Path(out)
    acc = accelerator or make_accelerator(cfg.mixed_precision)
    device = acc.device
    if codec is None:
        codec = codec_of(get_preset(cfg.preset, taef2_path=cfg.taef2_dir))
    identity = codec.identity()
    cache = LatentCache(latents or default_cache_dir(pairs, cfg.preset), expect=identity)
    train_x, val_x, train_sources, val_sources = load_split_latents(pairs, cache, cfg.val_fraction, cfg.split_seed)
    channels = int(identity["latent_channels"])
    config = {**asdict(cfg), "pairs": str(pairs), "latents": str(cache.folder)}
    ckpts, _ = open_run(out, acc, resume, cfg.keep_checkpoints, config, asdict(type(cfg)()))

    model = build_transformer(cfg, channels, seed=mix_seed(cfg.seed, 29)).to(device)
    model.train()
    emb = fixed_prompt_embeds(cfg)
    names = [n for n, p in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    ema = build_ema(params, cfg.ema_decay)
    ema.to(device)
    opt, sched = build_optimizer(params, cfg.lr, cfg.betas, cfg.weight_decay, cfg.lr_schedule, cfg.warmup_steps,
                                 cfg.steps)

    def restore(path: Path, tensors: dict, objects: dict, state: dict) -> None:
        model.load_state_dict(tensors["teacher"])
        ema_state = dict(state["ema"])
        ema_state["shadow_params"] = [tensors["ema"][n].to(device) for n in names]
        ema.load_state_dict(ema_state)
        load_optimizer_state(opt, objects["opt"])
        sched.load_state_dict(objects["sched"])

    progress = resume_progress(ckpts, acc, ["teacher", "ema"], restore) if resume else Progress()
    write_config(out, acc, config)
    model_w, opt = acc.prepare(model, opt)
    # The training forward is the degrader's call of the transformer (flow_velocity: same hidden layout, timestep,
    # prompt embedding).
    emb_device = emb.to(device)

    stop = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    sampler = GlobalBatchSampler(len(train_x), cfg.batch, acc.num_processes, acc.process_index, cfg.seed,
                                 progress.step, stop)
    loader = torch.utils.data.DataLoader(_Indexed(train_x), batch_sampler=sampler, num_workers=cfg.num_workers)
    log = RunLogger(out, acc, total=stop, initial=progress.step, desc="train-teacher")
    n_params = sum(p.numel() for p in params)
    acc.print(f"teacher: {n_params / 1e6:.2f}M parameters, {len(train_x)} train latents ({len(train_sources)} "
              f"photos), {len(val_x)} held out ({', '.join(Path(s).name for s in val_sources)})")

    def ema_model():
        ema_copy = build_transformer(cfg, channels).to(device)
        ema.copy_to(list(ema_copy.parameters()))
        return ema_copy.eval()

    def save_checkpoint() -> None:
        ema_meta = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        ckpts.save(progress.step, {"teacher": acc.unwrap_model(model_w).state_dict(),
                                   "ema": {n: t for n, t in zip(names, ema.shadow_params)}},
                   {"opt": opt.optimizer.state_dict(), "sched": sched.state_dict()},
                   {"skipped": progress.skipped, "ema": ema_meta, "preset": cfg.preset})

    def quick_eval() -> dict[str, float]:
        """The in-training held-out check of the EMA teacher: its ratio at the eval sigmas up to 0.3."""
        quick = evaluate_teacher(ema_model(), emb, val_x[: cfg.eval_quick].to(device),
                                 [s for s in cfg.eval_sigmas if s <= 0.3] or cfg.eval_sigmas[:1], seed=cfg.seed)
        return {f"val_ratio_{r['sigma']:g}": r["ratio"] for r in quick["rows"]}

    if progress.step > 0 and progress.step % cfg.eval_every == 0 and acc.is_main_process and len(val_x):
        # The run that reached this step logged its check here, and this logger hides its events from this step on
        # (purge_step): log it again, the same numbers (the EMA is the checkpoint's), outside the RNG streams the
        # run goes on with. (history.jsonl keeps it: it is in the record of the step before.)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            log.scalars(progress.step, quick_eval(), prefix="val")

    def one_step(batch: dict, step: int) -> dict:
        global_idx = sampler.global_batch(step)
        mine = global_idx[acc.process_index * cfg.batch : (acc.process_index + 1) * cfg.batch]
        x0s, epss, sig = [], [], []
        for latent, idx in zip(batch["latent"], mine):
            x0, eps, s = training_sample(latent, cfg, sample_generator(cfg.seed, step, int(idx)))
            x0s.append(x0), epss.append(eps), sig.append(s)
        x0, eps = torch.stack(x0s).to(device), torch.stack(epss).to(device)
        sigma = torch.tensor(sig, dtype=torch.float32, device=device)
        s4 = sigma.view(-1, 1, 1, 1)
        with acc.autocast():
            v = flow_velocity(model_w, (1 - s4) * x0 + s4 * eps, sigma, emb_device)
        loss = F.mse_loss(v.float(), eps - x0)
        lr = opt.param_groups[0]["lr"]  # the one this step uses (sched.step() moves it on)
        ok = guarded_update(acc, loss, progress, model_w.parameters(), opt, sched, cfg.max_grad_norm,
                            after_update=lambda: ema.step(params))
        return {"step": step, "loss": float(loss.detach()), "sigma_mean": float(sigma.mean()), "lr": lr,
                "skipped": not ok}

    def held_out_check(rec: dict) -> None:
        if progress.step % cfg.eval_every == 0 and acc.is_main_process and len(val_x):
            rec.update(quick_eval())
            log.scalars(progress.step, {k: v for k, v in rec.items() if k.startswith("val_")}, prefix="val")

    t_loop, start = time.time(), progress.step
    run_steps(loader, progress, stop, one_step, log, cfg.log_every, cfg.checkpoint_every, save_checkpoint,
              ("loss", "lr", "sigma_mean"), after_step=held_out_check)
    log.close()
    acc.wait_for_everyone()
    step, done_now = progress.step, progress.step - start
    elapsed = time.time() - t_loop
    summary: dict = {
        **summary_fields(out, progress, cfg.steps, device, t_start, 50, asdict(cfg)),
        "pairs": str(pairs), "latents": str(cache.folder), "processes": acc.num_processes, "parameters": n_params,
        "train_latents": len(train_x), "val_latents": len(val_x), "train_sources": train_sources,
        "held_out_sources": val_sources, "train_seconds_this_run": elapsed,
        "steps_per_s_this_run": done_now / elapsed if elapsed > 0 and done_now else None,
    }
    if step >= cfg.steps and acc.is_main_process:
        info = {
            "format": "ldlib-teacher/1",
            "model": "diffusers WanTransformer3DModel (flow matching: x_s = (1 - s) x0 + s eps, v = eps - x0, "
                     "timestep = 1000 s, latents as one frame, fixed prompt embedding)",
            "codec": identity, "latent_channels": channels, "preset": cfg.preset, "parameters": n_params,
            "steps": step, "train_sources": train_sources, "held_out_sources": val_sources,
            "config": asdict(cfg), "trained_with": f"{TRAIN_COMMAND} (pairs {pairs})",
        }
        folder = out / TEACHER_SUBDIR
        # Written in a staging folder that replaces OUT/teacher whole: never weights of one run beside the
        # eval of another. Eval and samples come from what was saved (fp16 on disk, loaded as float32).
        with replaced_folder(folder, TEACHER_MODEL_JSON) as staging:
            save_teacher(ema_model(), emb, staging, info)
            teacher, t_emb, _ = load_teacher(staging, device)
            if len(val_x):
                result = evaluate_teacher(teacher, t_emb, val_x.to(device), cfg.eval_sigmas, cfg.eval_draws,
                                          seed=cfg.seed)
                result["held_out_sources"] = val_sources
                atomic_write_bytes(staging / "eval.json", json.dumps(result, indent=2).encode())
                plot_eval(result, staging / "eval.png")
                summary["eval"] = {f"{r['sigma']:g}": r["ratio"] for r in result["rows"]}
            z = generate(teacher, t_emb, cfg.sample_count, channels, cfg.sample_size, cfg.sample_steps, seed=cfg.seed)
            save_samples(codec.to(device).eval(), z, staging / "samples.png")
        summary["teacher"] = str(folder)
    summary["wall_seconds_this_run"] = time.time() - t_start
    if acc.is_main_process:
        atomic_write_bytes(out / "summary.json", json_bytes(summary))
    summary["history"] = progress.history
    return summary
