"""Evaluation of 2x decoders against baselines, per sigma: PSNR / SSIM / LPIPS / speckle vs HQ on held-out pairs.

Methods (each decodes the same degraded latents, same per-sample noise):
- ``decoder+bicubic``: the original 1x decoder, then bicubic 2x (torch, float);
- ``decoder+lanczos``: the original 1x decoder, then Lanczos 2x (Pillow, float "F" mode: no 8-bit rounding);
- ``ours``: our 2x decoder;
- ``ours (no degradation)``: a 2x decoder trained without latent degradation, when given.

Outputs: ``eval.json`` (rows + a verdict), ``eval.md`` (tables) and ``eval.png`` (metric vs sigma).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .files import atomic_write_bytes
from .metrics import psnr, speckle_ratio, ssim
from .runs import sample_generator

METRICS = ("psnr", "ssim", "lpips", "speckle")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False}
BASELINES = ("decoder+bicubic", "decoder+lanczos")


@dataclass
class EvalConfig:
    """What to evaluate: sigmas, degrader, batch size, seed, LPIPS network, how many held-out pairs."""

    sigmas: tuple[float, ...] = field(default=(0.0, 0.04, 0.08, 0.12), metadata={"help": "sigmas, comma-separated"})
    degrader: str = field(default="noise", metadata={"help": "how held-out latents are degraded: none | noise | diffusion | proxy:DIR"})
    batch: int = field(default=4, metadata={"help": "pairs per decode"})
    seed: int = field(default=0, metadata={"help": "noise seed (the same draws for every method)"})
    lpips_net: Literal["alex", "vgg", "squeeze"] = field(default="alex", metadata={"help": "LPIPS backbone (training defaults to vgg)"})
    # Offline (random LPIPS backbone) a seed other than the training loss's (0) keeps the metric from being the
    # very function the decoder was trained on; with real torchvision weights the seed changes nothing.
    lpips_seed: int = field(default=1, metadata={"help": "seed of LPIPS' backbone when its weights are not cached"})
    max_pairs: int | None = field(default=None, metadata={"help": "evaluate at most this many pairs"})
    extra: dict = field(default_factory=dict)  # recorded as-is (e.g. model paths); not a command-line setting


def bicubic_2x(x: torch.Tensor) -> torch.Tensor:
    """Bicubic 2x upsample (torch, align_corners=False)."""
    return F.interpolate(x.float(), scale_factor=2, mode="bicubic", align_corners=False)


def lanczos_2x(x: torch.Tensor) -> torch.Tensor:
    """Lanczos 2x upsample with Pillow, channel by channel in float ("F") mode."""
    from PIL import Image

    n, c, h, w = x.shape
    a = x.detach().float().cpu().numpy()
    out = np.empty((n, c, 2 * h, 2 * w), dtype=np.float32)
    for i in range(n):
        for j in range(c):
            out[i, j] = np.asarray(Image.fromarray(a[i, j]).resize((2 * w, 2 * h), Image.Resampling.LANCZOS))
    return torch.from_numpy(out).to(x.device)


def degrade_for_eval(degrader, z: torch.Tensor, indices: Sequence[int], sigma: float, seed: int,
                     ids: Sequence[str] | None = None) -> torch.Tensor:
    """Per-sample degradation with a generator keyed by (seed, sigma, index): identical for every method."""
    if degrader is None or sigma == 0:
        return z
    gens = [sample_generator(seed, int(round(sigma * 1e6)), int(i), stream=2) for i in indices]
    return degrader.degrade_samples(z, torch.full((len(z),), float(sigma)), gens, ids)[0]


@torch.no_grad()
def evaluate_decoders(
    original,
    decoders: dict[str, object],
    dataset: torch.utils.data.Dataset,
    cfg: EvalConfig | None = None,
    degrader: object = "config",
    lpips=None,
    progress: bool = True,
) -> list[dict]:
    """Rows ``{method, sigma, n, psnr, ssim, lpips, speckle}`` (means over pairs) for the baselines and decoders.

    ``original`` is the 1x codec; ``decoders`` maps a method name to a 2x codec; dataset items have "latent", "hq".
    """
    from tqdm.auto import tqdm

    from .degrade import parse_degrader
    from .metrics import lpips_model

    cfg = cfg or EvalConfig()
    if isinstance(degrader, str) and degrader == "config":
        degrader = parse_degrader(cfg.degrader)
    lpips = lpips if lpips is not None else lpips_model(cfg.lpips_net, seed=cfg.lpips_seed)
    n = len(dataset) if cfg.max_pairs is None else min(cfg.max_pairs, len(dataset))
    if n == 0:
        raise ValueError("evaluate: the held-out set is empty")
    sums: dict[tuple[str, float], dict[str, float]] = {}
    bar = tqdm(total=len(cfg.sigmas) * n, desc="evaluate", disable=not progress)
    for sigma in cfg.sigmas:
        for start in range(0, n, cfg.batch):
            idx = list(range(start, min(n, start + cfg.batch)))
            items = [dataset[i] for i in idx]
            z = torch.stack([it["latent"] for it in items]).float()
            hq = torch.stack([it["hq"] for it in items]).float()
            zd = degrade_for_eval(degrader, z, idx, float(sigma), cfg.seed, [it.get("id") for it in items])
            base = original.decode(zd).float()
            outputs = {"decoder+bicubic": bicubic_2x(base), "decoder+lanczos": lanczos_2x(base)}
            for name, codec in decoders.items():
                outputs[name] = codec.decode(zd).float()
            for name, y in outputs.items():
                y = y.clamp(-1, 1)
                vals = {
                    "psnr": psnr(y, hq),
                    "ssim": ssim(y, hq),
                    "lpips": lpips(y, hq).flatten(),
                    "speckle": speckle_ratio(y, hq),
                }
                acc = sums.setdefault((name, float(sigma)), {k: 0.0 for k in (*METRICS, "n")})
                for k, v in vals.items():
                    acc[k] += float(v.sum())
                acc["n"] += len(idx)
            bar.update(len(idx))
    bar.close()
    rows = []
    for (name, sigma), acc in sums.items():
        rows.append({"method": name, "sigma": sigma, "n": int(acc["n"]), **{k: acc[k] / acc["n"] for k in METRICS}})
    return rows


def verdict(rows: list[dict], ours: str = "ours", metrics: Sequence[str] = ("psnr", "lpips")) -> dict:
    """Whether ``ours`` beats every baseline on each metric at every sigma, with the failing cases listed."""
    by = {(r["method"], r["sigma"]): r for r in rows}
    sigmas = sorted({r["sigma"] for r in rows if r["method"] == ours})
    fails = []
    for s in sigmas:
        for b in BASELINES:
            if (b, s) not in by:
                continue
            for m in metrics:
                a, c = by[(ours, s)][m], by[(b, s)][m]
                better = a > c if HIGHER_IS_BETTER[m] else a < c
                if not better:
                    fails.append({"sigma": s, "baseline": b, "metric": m, "ours": a, "baseline_value": c})
    return {"ours_beats_baselines": not fails and bool(sigmas), "metrics": list(metrics), "failures": fails}


def markdown_table(rows: list[dict]) -> str:
    """One Markdown table per metric: methods as rows, sigmas as columns (best per column in bold)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    sigmas = sorted({r["sigma"] for r in rows})
    by = {(r["method"], r["sigma"]): r for r in rows}
    out = []
    for m in METRICS:
        arrow = {"psnr": "higher is better", "ssim": "higher is better", "lpips": "lower is better",
                 "speckle": "HF energy / HQ's: 1 is ideal, > 1 grain, < 1 blur"}[m]
        out += [f"### {m.upper()} ({arrow})", "", "| method | " + " | ".join(f"sigma {s:g}" for s in sigmas) + " |",
                "|---|" + "---|" * len(sigmas)]
        best = {}
        for s in sigmas:
            vals = [(by[(me, s)][m], me) for me in methods if (me, s) in by]
            if m == "speckle":
                best[s] = min(vals, key=lambda t: abs(np.log(max(t[0], 1e-12))))[1]
            else:
                best[s] = (max if HIGHER_IS_BETTER[m] else min)(vals)[1]
        for me in methods:
            cells = []
            for s in sigmas:
                if (me, s) not in by:
                    cells.append("")
                    continue
                v = f"{by[(me, s)][m]:.4f}" if m != "psnr" else f"{by[(me, s)][m]:.2f}"
                cells.append(f"**{v}**" if best[s] == me else v)
            out.append(f"| {me} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot_rows(rows: list[dict], fig=None):
    """Metric vs sigma, one line per method (a matplotlib Figure)."""
    import matplotlib

    if fig is None:
        matplotlib.use(matplotlib.get_backend())
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(14, 3.4))
    axes = fig.subplots(1, len(METRICS))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, m in zip(axes, METRICS):
        for me in methods:
            pts = sorted((r["sigma"], r[m]) for r in rows if r["method"] == me)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=me,
                    ls="--" if me in BASELINES else "-")
        if m == "speckle":
            ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("sigma")
        ax.set_title(m.upper() + (" (lower better)" if m == "lpips" else ""))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_report(rows: list[dict], out: str | os.PathLike, cfg: EvalConfig, info: dict | None = None) -> dict:
    """Write eval.json, eval.md and eval.png under out; return the JSON document."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"config": asdict(cfg), "info": info or {}, "rows": rows, "verdict": verdict(rows)}
    atomic_write_bytes(out / "eval.json", json.dumps(doc, indent=2).encode())
    md = "# Evaluation against HQ (held-out pairs)\n\n" + markdown_table(rows)
    v = doc["verdict"]
    md += f"\nOurs beats decoder+bicubic and decoder+Lanczos on PSNR and LPIPS at every sigma: **{v['ours_beats_baselines']}**\n"
    if info and not info.get("lpips_backbone_pretrained", True):
        md += "\nLPIPS used a random (seeded) backbone: torchvision weights were not available offline.\n"
    atomic_write_bytes(out / "eval.md", md.encode())
    fig = plot_rows(rows, Figure(figsize=(14, 3.4)))
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(out / "eval.png", buf.getvalue())
    return doc


def _check_latents_fit(model: str | os.PathLike, decoder, info: dict, original, preset) -> None:
    """Refuse a decoder whose latents (family, channels, factor) are not the ones the preset's encoder makes."""
    have = (decoder.family, decoder.latent_channels, decoder.spatial_factor)
    want = (original.family, original.latent_channels, original.spatial_factor)
    if have != want:
        made_with = info.get("made_with_preset")
        raise ValueError(
            f"{model}: decodes {have[0]} latents with {have[1]} channels"
            f"{f' (trained with preset {made_with!r})' if made_with else ''}, but --preset {preset.name!r} encodes "
            f"{want[0]} latents with {want[1]} channels; pass the preset the decoder was trained with"
        )


def run_evaluation(
    model: str | os.PathLike,
    pairs: str | os.PathLike,
    out: str | os.PathLike,
    preset_name: str = "tiny",
    cfg: EvalConfig | None = None,
    baseline_model: str | os.PathLike | None = None,
    latents: str | os.PathLike | None = None,
    taef2_dir: str | None = None,
    val_fraction: float | None = None,
    split_seed: int | None = None,
) -> dict:
    """Evaluate a trained model (run or export) on a pair set's held-out split; write the report under out."""
    from .datasets import PairDataset
    from .decoder import load_decoder
    from .latents import LatentCache, default_cache_dir
    from .presets import get_preset

    cfg = cfg or EvalConfig()
    preset = get_preset(preset_name, taef2_path=taef2_dir)
    original = preset.load_codec()
    ours, info = load_decoder(model, preset)
    _check_latents_fit(model, ours, info, original, preset)
    decoders = {"ours": ours}
    if baseline_model is not None:
        decoders["ours (no degradation)"], base_info = load_decoder(baseline_model, preset)
        _check_latents_fit(baseline_model, decoders["ours (no degradation)"], base_info, original, preset)
    cache = LatentCache(latents or default_cache_dir(pairs, preset.name), expect=original)
    vf = val_fraction if val_fraction is not None else info.get("val_fraction", 0.1)
    seed = split_seed if split_seed is not None else info.get("seed", 0)
    _, held_out = PairDataset(pairs, latents=cache).split(vf, seed)
    from .metrics import lpips_model

    lp = lpips_model(cfg.lpips_net, seed=cfg.lpips_seed)
    rows = evaluate_decoders(original, decoders, held_out, cfg, lpips=lp)
    info.update(pairs=str(pairs), preset=preset.name, held_out_pairs=len(held_out), val_fraction=vf, split_seed=seed,
                held_out_sources=held_out.sources, baseline_model=str(baseline_model) if baseline_model else None,
                lpips_backbone_pretrained=bool(getattr(lp, "backbone_pretrained", False)))
    return write_report(rows, out, cfg, info)
