"""Sigma tuning: per-sigma statistics of a degrader, and the pictures notebook 02 shows.

Statistics for each sigma (means over the samples; the same noise seed at every sigma, so curves are smooth):

- ``rel_err``: latent relative error ``|D(x) - x| / |x|`` (Frobenius norms per sample);
- ``hf_share``: the share of the error's spectral energy at high spatial frequencies: energy of
  ``FFT2(D(x) - x)`` (summed over channels) outside the centre square ``|f_y|, |f_x| <= Nyquist / 2``, i.e. the
  part a half-resolution latent could not hold. White noise gives 0.75 (a bit less on small grids, see
  ``white_noise_hf_share``); a smooth (structural) change gives less,
  speckle at the pixel scale more. Undefined (NaN) at sigma 0, where there is no error;
- ``psnr_clean`` / ``lpips_clean``: the decoded degraded latent against the decode of the clean latent (what the
  degradation alone does to the picture);
- ``psnr_hq`` / ``lpips_hq``: the same against HQ. A 1x codec decodes at LQ size, so HQ is area-downsampled to the
  decode's size first (for a recipe pair that is exactly LQ); a 2x decoder is compared with HQ itself.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from ..build import codec_of, has_trained_teacher, vocabulary
from ..core.config import check_sigmas
from ..core.images import area_downsample
from ..core.metrics import check_lpips_net, high_freq_share, relative_error, white_noise_hf_share


DEFAULT_SIGMAS = (0.0, 0.03, 0.06, 0.09, 0.12, 0.2, 0.3)
RECIPE_RANGE = (0.0, 0.12)


@dataclass
class SweepConfig:
    """What a sigma sweep measures: the sigmas, the noise seed, the pairs' crop seed, LPIPS' backbone, batch size."""

    sigmas: tuple[float, ...] = field(default=DEFAULT_SIGMAS, metadata={"help": "sigmas to measure, comma-separated"})
    seed: int = field(default=0, metadata={"help": "noise seed (the same at every sigma: curves differ by sigma "
                                                   "only; the pairs do not depend on it)"})
    # Apart from the noise seed: seeds compared in one --out measure the same crops, and crop choice is not mixed
    # into what a new noise seed changes.
    pair_seed: int = field(default=0, metadata={"help": "crop seed of the pairs a sweep builds under --out "
                                                        "(not used with --pairs)"})
    lpips_net: Literal["alex", "vgg", "squeeze"] = field(default="alex", metadata={"help": "LPIPS backbone"})
    batch_size: int = field(default=8, metadata={"help": "latents per codec / degrader call"})

    def __post_init__(self) -> None:
        self.sigmas = tuple(self.sigmas)
        check_sigmas(self.sigmas, "SweepConfig.sigmas")
        if self.batch_size < 1:
            raise ValueError(f"SweepConfig.batch_size must be >= 1, got {self.batch_size}")
        check_lpips_net(self.lpips_net, "SweepConfig.lpips_net")


# ------------------------------------------------------------------------------------------------------------
# inputs: (HQ, LQ) pairs from a pair set
# ------------------------------------------------------------------------------------------------------------


def pair_batch(preset, pairs_dir: str | os.PathLike | None = None, photos: str | os.PathLike | None = None,
               n: int = 4, seed: int = 0, work_dir: str | os.PathLike = "runs/02_tune_sigma"
               ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """HQ and LQ batches (and pair ids) of the first n pairs of a pair set at the preset's sizes.

    ``pairs_dir``: an existing pair set (``python -m ldlib build-pairs``). Otherwise one is built (resumably) under
    ``work_dir`` from ``photos`` (a folder), or from the photos shipped with ldlib, named by ``pairs.folder_tag``.
    """
    from ..core.samples import sample_photos
    from ..data.datasets import PairDataset
    from ..data.pairs import PairSpec, build_pairs, folder_tag

    work_dir = Path(work_dir)
    if pairs_dir is None:
        src = Path(photos) if photos else sample_photos()
        spec = PairSpec.from_preset(preset, seed=seed)
        pairs_dir = work_dir / f"pairs_{preset.name}_{spec.hq_size}_{folder_tag(src)}"
        report = build_pairs(src, pairs_dir, spec, workers=1, progress=False)
        if report["pairs_total"] == 0:
            raise ValueError(f"no pair could be cut from {src} at {spec.hq_size} px (see {pairs_dir}/report.json)")
    ds = PairDataset(pairs_dir)
    if len(ds) == 0:
        raise ValueError(f"{pairs_dir}: the pair set holds no pair")
    items = [ds[i] for i in range(min(n, len(ds)))]
    return (torch.stack([it["hq"] for it in items]), torch.stack([it["lq"] for it in items]),
            [it["id"] for it in items])


# ------------------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------------------


def reference_at(hq: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """HQ at a decode's size: itself, or area-downsampled by the integer factor between them."""
    if tuple(hq.shape[-2:]) == tuple(size):
        return hq
    f = hq.shape[-2] // size[0]
    if f * size[0] != hq.shape[-2] or f * size[1] != hq.shape[-1]:
        raise ValueError(f"HQ {tuple(hq.shape[-2:])} is not an integer multiple of the decode size {tuple(size)}")
    return area_downsample(hq, f)


@dataclass
class SweepResult:
    """Per-sigma rows of a sweep plus what was compared (for the report)."""

    rows: list[dict]
    degrader: str
    hq_reference: str
    lpips_pretrained: bool
    latent_shape: tuple[int, ...]
    hf_share_clean: float
    hf_share_white: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready dict (non-finite numbers, e.g. the PSNR of identical decodes, become None)."""
        from ..core.runs import json_ready

        return json_ready(asdict(self))

    def markdown(self) -> str:
        """The rows as a Markdown table."""
        cols = ["sigma", "rel_err", "hf_share", "psnr_clean", "lpips_clean", "psnr_hq", "lpips_hq"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
        for r in self.rows:
            lines.append("| " + " | ".join(f"{r[c]:.4f}" if c != "sigma" else f"{r[c]:g}" for c in cols) + " |")
        return "\n".join(lines)


@torch.no_grad()
def sigma_sweep(codec, degrader, lq: torch.Tensor, hq: torch.Tensor, config: SweepConfig | None = None,
                latents: torch.Tensor | None = None, lpips_fn=None, progress: bool = True) -> SweepResult:
    """Degrade the LQ latents at each sigma of config and measure (see the module docstring)."""
    from tqdm.auto import tqdm

    from ..core.metrics import lpips_model, psnr

    config = config or SweepConfig()
    bs = config.batch_size

    def batched(fn, *xs):
        return torch.cat([fn(*(x[i : i + bs] for x in xs)) for i in range(0, len(xs[0]), bs)])

    z = latents if latents is not None else batched(codec.encode, lq)
    dec_clean = batched(codec.decode, z)
    ref = reference_at(hq, dec_clean.shape[-2:])
    # lpips_model builds on the CPU; the decodes are on the codec's device (CUDA in run_sweep when there is one).
    lp = lpips_fn if lpips_fn is not None else lpips_model(config.lpips_net).to(dec_clean.device)
    rows = []
    for s in tqdm(config.sigmas, desc="sigma sweep", disable=not progress):
        # The same seed at every sigma: the curves differ by sigma only, not by a new noise draw.
        g = torch.Generator(device=z.device).manual_seed(config.seed)
        zd = torch.cat([degrader.degrade(z[i : i + bs], float(s), g) for i in range(0, len(z), bs)])
        dec = batched(codec.decode, zd)
        rows.append({
            "sigma": float(s),
            "rel_err": relative_error(zd, z).mean().item(),
            "hf_share": high_freq_share(zd - z).mean().item(),
            # Identical decodes have no finite PSNR (metrics.psnr would report its 1e-12 floor, ~126 dB).
            "psnr_clean": math.inf if torch.equal(dec, dec_clean) else psnr(dec, dec_clean).mean().item(),
            "lpips_clean": batched(lambda a, b: lp(a, b).flatten(), dec, dec_clean).mean().item(),
            "psnr_hq": psnr(dec, ref).mean().item(),
            "lpips_hq": batched(lambda a, b: lp(a, b).flatten(), dec, ref).mean().item(),
        })
    same = ref is hq
    return SweepResult(
        rows=rows,
        degrader=type(degrader).__name__,
        hq_reference="HQ" if same else f"HQ area-downsampled to the decode size {tuple(dec_clean.shape[-2:])}",
        lpips_pretrained=bool(getattr(lp, "backbone_pretrained", True)),
        latent_shape=tuple(z.shape),
        hf_share_clean=high_freq_share(z - z.mean(dim=(2, 3), keepdim=True)).mean().item(),
        hf_share_white=white_noise_hf_share(*z.shape[-2:]),
        notes=[] if getattr(lp, "backbone_pretrained", True) else
        ["LPIPS backbone randomly initialised (torchvision weights not cached): compare within this run only"],
    )


# ------------------------------------------------------------------------------------------------------------
# pictures
# ------------------------------------------------------------------------------------------------------------


def plot_sweep(result: SweepResult, fig=None, recipe_range: tuple[float, float] = RECIPE_RANGE):
    """Four panels over sigma (latent error, HF share, PSNR, LPIPS) with the recipe's range shaded."""
    fig = plot_sweeps({result.degrader: result}, fig, recipe_range)
    fig.suptitle(f"{result.degrader}: sigma sweep on {result.latent_shape[0]} latents", fontsize=11)
    return fig


def plot_sweeps(results: dict[str, SweepResult], fig=None, recipe_range: tuple[float, float] = RECIPE_RANGE):
    """The four sweep panels with one line per degrader (same latents), the recipe's range shaded."""
    import matplotlib.pyplot as plt

    fig = fig or plt.figure(figsize=(13, 3.2))
    fig.clear()
    axes = fig.subplots(1, 4)
    first = next(iter(results.values()))
    many = len(results) > 1
    for name, result in results.items():
        s = [r["sigma"] for r in result.rows]
        col = lambda k: [r[k] if math.isfinite(r[k]) else math.nan for r in result.rows]  # noqa: E731  (inf: no point)
        panels = [[("rel_err", "")], [("hf_share", "")], [("psnr_clean", "vs decode(clean)"), ("psnr_hq", "vs HQ")],
                  [("lpips_clean", "vs decode(clean)"), ("lpips_hq", "vs HQ")]]
        for ax, series in zip(axes, panels):
            for key, label in series:
                text = " ".join(t for t in (name if many else "", label) if t)
                ax.plot(s, col(key), "o-" if key.endswith("clean") or not label else "s--", label=text or None, ms=4)
    titles = ["latent |D(x)-x| / |x|", "HF share of the error", "PSNR (dB)",
              "LPIPS" + ("" if first.lpips_pretrained else " (random backbone)")]
    for ax, title in zip(axes, titles):
        ax.axvspan(*recipe_range, color="tab:green", alpha=0.12, label=f"recipe U{list(recipe_range)}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("sigma")
    axes[1].axhline(first.hf_share_white, color="grey", ls=":", lw=1, label="white noise")
    axes[1].axhline(first.hf_share_clean, color="tab:purple", ls="--", lw=1, label="clean latent")
    for ax in axes if many else axes[1:]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


@torch.no_grad()
def degraders_figure(pca, codec, z: torch.Tensor, degraders: dict[str, object], sigma: float, seed: int = 0,
                     zoom: float = 0.35, fig=None):
    """Columns: clean, then each degrader at one sigma (same noise). Rows: PCA of the latent (the clean-fitted basis),
    the decode, a centre zoom of the decode. ``z`` is one normalised latent (C x h x w)."""
    from matplotlib.figure import Figure

    z = z[None].float()
    latents = {"clean": z}
    for name, deg in degraders.items():
        latents[f"{name}, sigma {sigma:g}"] = deg.degrade(z, float(sigma), torch.Generator(z.device).manual_seed(seed))
    fig = fig or Figure(figsize=(3.0 * len(latents), 8.4), dpi=100)
    axes = fig.subplots(3, len(latents), squeeze=False)
    for j, (name, lat) in enumerate(latents.items()):
        dec = _to_hwc(codec.decode(lat)[0])
        h, w = dec.shape[:2]
        size = max(8, int(min(h, w) * zoom))
        err = relative_error(lat, z).item()
        axes[0, j].imshow(pca.rgb(lat.cpu())[0], interpolation="nearest")
        axes[0, j].set_title(name if j == 0 else f"{name}\nlatent rel. change {err:.3f}", fontsize=9)
        axes[1, j].imshow(dec, interpolation="nearest")
        axes[1, j].set_title("decode", fontsize=9)
        axes[2, j].imshow(_zoom(dec, ((h - size) // 2, (w - size) // 2, size)), interpolation="nearest")
        axes[2, j].set_title("decode, centre zoom", fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def _zoom(img: np.ndarray, box: tuple[int, int, int]) -> np.ndarray:
    top, left, size = box
    return img[top : top + size, left : left + size]


def _to_hwc(x: torch.Tensor) -> np.ndarray:
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def tuning_figure(pca, z_clean: torch.Tensor, z_deg: torch.Tensor, dec_clean: torch.Tensor, dec_deg: torch.Tensor,
                  hq: torch.Tensor, title: str = "", zoom: float = 0.25, fig=None):
    """Row 1: PCA(clean) | PCA(degraded) | PCA diff; row 2: decodes and HQ; row 3: centre zooms of row 2.

    Takes one sample (C x h x w latents, 3 x H x W images in [-1, 1]); the PCA is the clean-fitted ``LatentPCA``.
    """
    import matplotlib.pyplot as plt

    fig = fig or plt.figure(figsize=(10, 10))
    fig.clear()
    axes = fig.subplots(3, 3)
    pcs = [pca.rgb(z_clean[None])[0], pca.rgb(z_deg[None])[0], pca.diff_rgb(z_clean[None], z_deg[None])[0]]
    imgs = [_to_hwc(dec_clean), _to_hwc(dec_deg), _to_hwc(hq)]
    names = ["decode(clean)", "decode(degraded)", "HQ"]
    for ax, im, name in zip(axes[0], pcs, ["PCA(clean)", "PCA(degraded), clean basis", "PCA(degraded) - PCA(clean)"]):
        ax.imshow(im, interpolation="nearest")
        ax.set_title(name, fontsize=9)
    for ax, im, name in zip(axes[1], imgs, names):
        ax.imshow(im, interpolation="nearest")
        ax.set_title(name, fontsize=9)
    for ax, im, name in zip(axes[2], imgs, names):
        # The same region in every image, whatever its resolution (HQ may be 2x the decodes).
        h, w = im.shape[:2]
        size = max(8, int(min(h, w) * zoom))
        box = ((h - size) // 2, (w - size) // 2, size)
        ax.imshow(_zoom(im, box), interpolation="nearest")
        ax.set_title(f"{name}, centre zoom", fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def pca_grid(pca, frames: torch.Tensor, n: int = 8, title: str = "", fig=None):
    """PCA pictures of up to n latent frames (T x C x h x w) in one row-major grid."""
    import matplotlib.pyplot as plt

    frames = frames[: n]
    cols = min(4, len(frames))
    rows = math.ceil(len(frames) / cols)
    fig = fig or plt.figure(figsize=(3.2 * cols, 2.2 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i < len(frames):
            ax.imshow(pca.rgb(frames[i : i + 1])[0], interpolation="nearest")
            ax.set_title(f"frame {i}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def degrade_frames_stats(frames: torch.Tensor, degrader, sigmas: Sequence[float], seed: int = 0) -> list[dict]:
    """Latent-only statistics (no decoder) of degrading frames at each sigma: rel_err and hf_share."""
    out = []
    for s in sigmas:
        g = torch.Generator().manual_seed(seed)
        d = degrader.degrade(frames, float(s), g)
        out.append({"sigma": float(s), "rel_err": relative_error(d, frames).mean().item(),
                    "hf_share": high_freq_share(d - frames).mean().item()})
    return out


def run_sweep(preset_name: str = "tiny", degrader: str = "noise", out: str | os.PathLike = "runs/sweep",
              pairs_dir: str | os.PathLike | None = None, photos: str | os.PathLike | None = None, n: int = 8,
              config: SweepConfig | None = None, steps: int = 1, prompt: str = "negative",
              taef2_path: str | os.PathLike | None = None, device: str | None = None) -> SweepResult:
    """The whole sweep for scripts: pairs, codec, degrader (``ldlib.degrade`` vocabulary), statistics; writes
    sweep.json, sweep.md, sweep.png."""
    import json

    from matplotlib.figure import Figure

    from ..build import parse_degrader
    from ..core.files import atomic_write_bytes, save_figure
    from ..presets import get_preset

    config = config or SweepConfig()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = get_preset(preset_name, taef2_path=taef2_path)
    out = Path(out)
    hq, lq, ids = pair_batch(preset, pairs_dir, photos, n=n, seed=config.pair_seed, work_dir=out)
    codec = codec_of(preset, device)
    deg = parse_degrader(degrader, preset, codec, steps=steps, prompt=prompt, device=device)
    if deg is None:
        raise ValueError(f"a sweep needs a degrader: {vocabulary(live=True, degrading=True)}")
    result = sigma_sweep(codec, deg, lq.to(device), hq.to(device), config)
    result.notes.append(f"preset {preset.name}, {len(ids)} pairs: {', '.join(ids)}")
    what = "the teacher's fixed prompt embedding" if has_trained_teacher(preset) else f"prompt {prompt!r}"
    result.notes.append(f"degrader {degrader}" + (f": {steps} Euler step(s), {what}" if degrader == "diffusion" else ""))
    atomic_write_bytes(out / "sweep.json", json.dumps(result.to_dict(), indent=2).encode())
    atomic_write_bytes(out / "sweep.md", (result.markdown() + "\n\n" + "\n".join(f"- {t}" for t in result.notes)
                                          + "\n").encode())
    save_figure(plot_sweep(result, Figure(figsize=(13, 3.2), dpi=100)), out / "sweep.png")
    return result
