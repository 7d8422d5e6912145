"""The proxy degrader: a small conv net trained to mimic the diffusion teacher, cheap enough for the training loop.

- ``ProxyNet`` and its folder format: ``ldlib.models.proxy``.
- ``train_proxy``: regression on cached teacher outputs (``ldlib.data.teacher_data``), held out by source photo, on the
  shared run machinery (accelerate, atomic checkpoints, exact resume, TensorBoard).
- ``evaluate_proxy``: per sigma bin, |P(x_s) - T(x_s)| / |T(x_s) - x0| next to "return x_sigma" and "return x0".
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch

from ..core.config import check_finite
from ..core.files import atomic_write_bytes, save_figure
from ..core.runs import (GlobalBatchSampler, RunLogger, build_optimizer, check_optimiser_settings, holds_run_lock,
                         json_bytes, load_optimizer_state, make_accelerator, mix_seed, open_run, write_config)
from ..data.pairs import split_by_source
from ..data.teacher_data import TeacherDataset, TeacherSet
from ..models.proxy import ProxyNet, save_proxy
from .loop import Progress, guarded_update, resume_progress, run_steps, summary_fields


# ------------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------------


@dataclass
class ProxyTrainConfig:
    """Proxy training settings (plain regression on teacher targets)."""

    steps: int = field(default=3000, metadata={"help": "optimiser steps"})
    batch: int = field(default=16, metadata={"help": "teacher records per step"})
    lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    lr_schedule: str = field(default="cosine", metadata={"help": "any diffusers get_scheduler name"})
    warmup_steps: int = field(default=100, metadata={"help": "learning-rate warm-up steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    width: int = field(default=64, metadata={"help": "ProxyNet channels"})
    blocks: int = field(default=4, metadata={"help": "ProxyNet residual blocks"})
    # The loss divides by max(sigma, floor): each sample's error is measured relative to its own degradation.
    train_sigma_max: float | None = field(default=None, metadata={
        "help": "train on the records up to this sigma only (default: all; held-out scores keep every record)"})
    sigma_floor: float = field(default=0.01, metadata={"help": "floor of sigma in the loss's normalisation"})
    val_fraction: float = field(default=0.2, metadata={"help": "held-out share of source photos"})
    split_seed: int | None = field(default=None, metadata={"help": "seed of the held-out split (default: seed)"})
    eval_bins: int = field(default=6, metadata={"help": "sigma bins of the held-out evaluation"})
    checkpoint_every: int = field(default=500, metadata={"help": "steps between checkpoints"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    log_every: int = field(default=10, metadata={"help": "steps between TensorBoard scalars"})
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(default="auto", metadata={"help": "auto: bf16 on CUDA, fp32 on CPU"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers"})
    seed: int = field(default=0, metadata={"help": "seeds the net's initial weights and the batches"})

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        check_finite(self)
        for name in ("steps", "batch", "checkpoint_every", "log_every", "width", "blocks", "eval_bins"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ProxyTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.sigma_floor > 0:  # the loss divides by max(sigma, floor): 0 divides by 0 at sigma 0
            raise ValueError(f"ProxyTrainConfig.sigma_floor must be > 0, got {self.sigma_floor}")
        if self.train_sigma_max is not None and not self.train_sigma_max > 0:
            raise ValueError(f"ProxyTrainConfig.train_sigma_max must be > 0 (or none: every record), "
                             f"got {self.train_sigma_max}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"ProxyTrainConfig.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_grad_norm < 0:  # the loop clips only when > 0: a negative value would silently mean "off"
            raise ValueError(f"ProxyTrainConfig.max_grad_norm must be >= 0 (0: no clipping), "
                             f"got {self.max_grad_norm}")
        check_optimiser_settings("ProxyTrainConfig", self.lr, self.betas, self.weight_decay, self.warmup_steps,
                                 self.keep_checkpoints)


def proxy_loss(pred: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, floor: float = 0.01) -> torch.Tensor:
    """MSE in velocity units: ((P - T) / sigma)^2, so small-sigma samples count as much as large ones.

    The proxy and the teacher both move x_sigma by sigma * velocity; dividing by sigma weighs every sample by the
    error relative to its own degradation, which is the quantity evaluate_proxy reports (plain MSE would be ruled
    by the largest sigmas and leave the decoder's range, sigma <= 0.12, poorly fitted).
    """
    scale = sigma.float().clamp_min(floor).view(-1, *([1] * (pred.dim() - 1)))
    return (((pred.float() - target.float()) / scale) ** 2).mean()


def split_teacher_data(teacher: TeacherSet, val_fraction: float, seed: int, latents=None
                       ) -> tuple[TeacherDataset, TeacherDataset]:
    """(train, held-out) teacher records as datasets, held out by source photo (ldlib.data.pairs.split_by_source)."""
    train_ids, val_ids = split_by_source(teacher.records, val_fraction, seed)
    train = TeacherDataset(teacher, latents, sorted(set(train_ids)))
    return train, TeacherDataset(teacher, train.latents, sorted(set(val_ids)))


@holds_run_lock
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
    t_start = time.time()
    out = Path(out)
    acc = accelerator or make_accelerator(cfg.mixed_precision)
    device = acc.device
    ts = TeacherSet(teacher)
    if len(ts) == 0:
        raise ValueError(f"{teacher}: no teacher records; run `python -m ldlib teacher` first")
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    train_set, val_set = split_teacher_data(ts, cfg.val_fraction, split_seed, latents)
    if cfg.train_sigma_max is not None:
        train_set.records = [r for r in train_set.records if r["sigma"] <= cfg.train_sigma_max]
        if not train_set.records:
            raise ValueError(f"{teacher}: no training record has sigma <= {cfg.train_sigma_max} (train_sigma_max)")
    channels = int(train_set.latents.identity["latent_channels"])

    config = {**asdict(cfg), "teacher": str(teacher)}
    ckpts, _ = open_run(out, acc, resume, cfg.keep_checkpoints, config, asdict(type(cfg)()))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(cfg.seed, 23))
        net = ProxyNet(channels=channels, width=cfg.width, blocks=cfg.blocks).to(device)
    opt, sched = build_optimizer(net.parameters(), cfg.lr, cfg.betas, cfg.weight_decay, cfg.lr_schedule,
                                 cfg.warmup_steps, cfg.steps)

    def restore(path: Path, tensors: dict, objects: dict, state: dict) -> None:
        net.load_state_dict(tensors["proxy"])
        load_optimizer_state(opt, objects["opt"])
        sched.load_state_dict(objects["sched"])

    progress = resume_progress(ckpts, acc, ["proxy"], restore) if resume else Progress()
    write_config(out, acc, config)
    net_w, opt = acc.prepare(net, opt)

    def one_step(batch: dict, step: int) -> dict:
        x_sigma, target = batch["x_sigma"].to(device), batch["target"].to(device)
        sigma = batch["sigma"].to(device)
        with acc.autocast():
            pred = net_w(x_sigma, sigma)
        loss = proxy_loss(pred, target, sigma, cfg.sigma_floor)
        lr = opt.param_groups[0]["lr"]  # the one this step uses (sched.step() moves it on)
        ok = guarded_update(acc, loss, progress, net_w.parameters(), opt, sched, cfg.max_grad_norm)
        return {"step": step, "loss": float(loss.detach()), "lr": lr, "skipped": not ok}

    def save() -> None:
        ckpts.save(progress.step, {"proxy": acc.unwrap_model(net_w).state_dict()},
                   {"opt": opt.optimizer.state_dict(), "sched": sched.state_dict()}, {"skipped": progress.skipped})

    stop = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    sampler = GlobalBatchSampler(len(train_set), cfg.batch, acc.num_processes, acc.process_index, cfg.seed,
                                 progress.step, stop)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.num_workers)
    log = RunLogger(out, acc, total=stop, initial=progress.step, desc="train-proxy")
    run_steps(loader, progress, stop, one_step, log, cfg.log_every, cfg.checkpoint_every, save, ("loss", "lr"))
    log.close()
    acc.wait_for_everyone()
    trained = acc.unwrap_model(net_w)
    summary: dict = {**summary_fields(out, progress, cfg.steps, device, t_start, 20, asdict(cfg)),
                     "teacher": str(teacher),
                     "train_sources": len({r["source"] for r in train_set.records}),
                     "val_sources": len({r["source"] for r in val_set.records}),
                     "train_records": len(train_set), "val_records": len(val_set)}
    if acc.is_main_process:
        save_proxy(trained, out, extra={"teacher": ts.info.get("teacher"), "spec": ts.info["spec"], "identity": ts.info["identity"]})
        if len(val_set):
            result = evaluate_proxy(trained, val_set, bins=cfg.eval_bins, device=device)
            atomic_write_bytes(out / "eval.json", json.dumps(result, indent=2).encode())
            plot_proxy_eval(result, out / "eval.png")
            summary["eval"] = result["overall"]
            summary["beats_baselines"] = result["beats_baselines"]
        atomic_write_bytes(out / "summary.json", json_bytes(summary))
    summary["history"] = progress.history
    return summary


# ------------------------------------------------------------------------------------------------------------
# how well a proxy matches the teacher
# ------------------------------------------------------------------------------------------------------------


def relative_errors(pred: torch.Tensor, x_sigma: torch.Tensor, x0: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample |P - T| / |T - x0| for the proxy and the baselines "return x_sigma" and "return x0"."""
    def norm(t: torch.Tensor) -> torch.Tensor:
        return t.float().flatten(1).norm(dim=1)

    size = norm(target - x0).clamp_min(1e-12)  # the teacher's own degradation
    return {"proxy": norm(pred - target) / size, "x_sigma": norm(x_sigma - target) / size, "x0": norm(x0 - target) / size}


@torch.no_grad()
def evaluate_proxy(net, dataset: TeacherDataset, bins: int = 6, batch_size: int = 64,
                   device: str | torch.device = "cpu") -> dict:
    """Per-sigma-bin mean relative error of the proxy and both baselines on (held-out) teacher data."""
    sigma_max = dataset.teacher.spec.sigma_max
    edges = torch.linspace(0, sigma_max, bins + 1)
    per: dict[str, list[torch.Tensor]] = {"proxy": [], "x_sigma": [], "x0": []}
    sigmas = []
    net = net.eval().to(device)
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        b = {k: torch.stack([it[k] for it in items]) for k in ("sigma", "x0", "x_sigma", "target")}
        pred = net(b["x_sigma"].to(device), b["sigma"].to(device)).float().cpu()
        for k, v in relative_errors(pred, b["x_sigma"], b["x0"], b["target"]).items():
            per[k].append(v)
        sigmas.append(b["sigma"])
    if not sigmas:
        raise ValueError(f"{dataset.teacher.folder}: no teacher records to evaluate")
    s = torch.cat(sigmas)
    err = {k: torch.cat(v) for k, v in per.items()}
    rows = []
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
        mask = (s >= lo) & ((s < hi) | (hi == edges[-1].item()))
        mask &= s > 0  # at sigma 0 the relative error is 0/0; every model is exact there
        if mask.any():
            rows.append({"sigma_lo": lo, "sigma_hi": hi, "count": int(mask.sum()),
                         **{k: float(v[mask].mean()) for k, v in err.items()}})
    overall = {k: float(v[s > 0].mean()) for k, v in err.items()}
    return {"metric": "mean |P(x_s) - T(x_s)| / |T(x_s) - x0| per sigma bin", "bins": rows, "overall": overall,
            "count": int(len(s)),
            # No bin with data is no evidence (all() of nothing would say True).
            "beats_baselines": bool(rows) and all(r["proxy"] < min(r["x_sigma"], r["x0"]) for r in rows)}


def plot_proxy_eval(result: dict, path: str | os.PathLike | None = None):
    """Relative error vs sigma for the proxy and the baselines; saved to path when given; returns the figure."""
    from matplotlib.figure import Figure  # not pyplot: no backend switch, works in scripts and notebooks alike

    rows = result["bins"]
    mid = [(r["sigma_lo"] + r["sigma_hi"]) / 2 for r in rows]
    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.subplots()
    for key, label, style in (("proxy", "proxy", "o-"), ("x_sigma", 'baseline "return x_sigma"', "s--"), ("x0", 'baseline "return x0"', "^:")):
        ax.plot(mid, [r[key] for r in rows], style, label=label)
    ax.set_xlabel("sigma")
    ax.set_ylabel("|P - T| / |T - x0|")
    ax.set_yscale("log")
    ax.set_title("proxy vs teacher on held-out latents")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


@torch.no_grad()
def teacher_vs_proxy_figure(pca, x0: torch.Tensor, degrader, net, sigmas: Sequence[float], seed: int = 0):
    """Rows per sigma: PCA of x0 | x_sigma | teacher(x_sigma) | proxy(x_sigma), one clean-fitted basis and range."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 2.1 * len(sigmas)))
    axes = fig.subplots(len(sigmas), 4, squeeze=False)
    x0 = x0.float().cpu().unsqueeze(0)
    device = next(net.parameters()).device
    for row, sigma in zip(axes, sigmas):
        s = torch.tensor([float(sigma)])
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
        x_s = (1 - s) * x0 + s * eps
        t = degrader.denoise(x_s.to(device), s.to(device)).float().cpu()
        p = net(x_s.to(device), s.to(device)).float().cpu()
        err = (p - t).norm() / (t - x0).norm().clamp_min(1e-12)
        for ax, z, title in zip(row, (x0, x_s, t, p), ("clean x0", f"x_sigma, sigma {sigma:g}", "teacher", f"proxy (rel. err {err:.2f})")):
            ax.imshow(pca.rgb(z)[0], interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    return fig
