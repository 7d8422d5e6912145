"""Evaluation of 2x decoders against baselines, per sigma, on held-out pairs: how close to HQ, and is it a real win.

Methods (each decodes the same degraded latents, same per-sample noise):
- ``decoder+bicubic``: the original 1x decoder, then bicubic 2x (torch, float);
- ``decoder+lanczos``: the original 1x decoder, then Lanczos 2x (Pillow, float "F" mode: no 8-bit rounding);
- ``ours`` and any other 2x decoders given by name.

Metrics against HQ, per pair: PSNR, SSIM (scikit-image), LPIPS (lpips package; offline its backbone is random, see
``ldlib.core.metrics.lpips_model``), HaarPSI (piq: a perceptual index that needs no downloaded weights), the speckle
ratio (high-frequency energy / HQ's: 1 ideal, > 1 grain, < 1 blur) and the colour shift (distance of the mean
colour from HQ's, in 8-bit levels: fine-tuned decoders are known to drift or desaturate).

The verdict compares ``ours`` with each baseline by a paired test whose unit is the held-out source photo (crops of
one photo are not independent): the paired differences are averaged within each photo (over its crops, and over
seeds first where rows carry them, so seeds are nested in photos), and a two-sided one-sample t-test over those
per-photo means at ``ALPHA`` (0.05) calls "better" or "worse"; below ``MIN_PHOTOS`` photos it makes no call. Its
power grows with photos; more crops or seeds of the same photos add no degrees of freedom, they only steady each
photo's mean.
With random models (the ``tiny`` preset) it says that the numbers show the plumbing only.
Outputs: ``eval.json`` (rows with per-pair values, verdict), ``eval.md``, ``eval.png``.
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

from ..build import codec_of, vocabulary
from ..core.config import check_sigmas
from ..core.files import atomic_write_bytes, save_figure
from ..core.metrics import check_lpips_net, colour_shift, haarpsi, psnr, speckle_ratio, ssim
from ..core.runs import sample_generator


METRICS = ("psnr", "ssim", "lpips", "haarpsi", "speckle", "colour_shift")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "haarpsi": True, "colour_shift": False}
DESCRIPTION = {"psnr": "dB, higher is better", "ssim": "higher is better", "lpips": "lower is better",
               "haarpsi": "perceptual, no downloaded weights; higher is better",
               "speckle": "HF energy / HQ's: 1 is ideal, > 1 grain, < 1 blur",
               "colour_shift": "mean colour vs HQ, 8-bit levels; lower is better"}
BASELINES = ("decoder+bicubic", "decoder+lanczos")
VERDICT_METRICS = ("psnr", "lpips", "haarpsi")
ALPHA = 0.05  # two-sided significance level of the paired test
# Fewer held-out photos than this never make a call. With 2 photos the t-test has one degree of freedom: its
# standard error rests on the single difference between two photos and a call needs |t| > 12.7, so it says more
# about those two photos than about photos in general; 3 (df 2, |t| > 4.3) is the least that estimates the spread
# between photos at all. Power comes from more photos: at 10 (df 9) |t| > 2.26 suffices.
MIN_PHOTOS = 3
RULE = (f"a paired t-test over held-out photos: each photo's pairs (and seeds) averaged into one difference per photo, "
        f"two-sided at p < {ALPHA:g}, at least {MIN_PHOTOS} photos")


@dataclass
class EvalConfig:
    """What to evaluate: sigmas, degrader, batch size, seed, LPIPS network, which and how many pairs."""

    sigmas: tuple[float, ...] = field(default=(0.0, 0.04, 0.08, 0.12), metadata={"help": "sigmas, comma-separated"})
    degrader: str = field(default="noise", metadata={"help": f"how held-out latents are degraded: {vocabulary(live=True)}"})
    batch: int = field(default=4, metadata={"help": "pairs per decode"})
    seed: int = field(default=0, metadata={"help": "noise seed (the same draws for every method)"})
    lpips_net: Literal["alex", "vgg", "squeeze"] = field(default="alex", metadata={"help": "LPIPS backbone (training defaults to vgg)"})
    # Offline (random LPIPS backbone) a seed other than the training loss's (0) keeps the metric from being the
    # very function the decoder was trained on; with real torchvision weights the seed changes nothing.
    lpips_seed: int = field(default=1, metadata={"help": "seed of LPIPS' backbone when its weights are not cached"})
    max_pairs: int | None = field(default=None, metadata={"help": "evaluate at most this many pairs"})
    split: Literal["held-out", "all"] = field(default="held-out", metadata={
        "help": "which pairs of the pair set: held-out (the photos the run did not train on: for its training pair "
                "set) | all (a separate test set)"})
    extra: dict = field(default_factory=dict)  # recorded as-is (e.g. model paths); not a command-line setting

    def __post_init__(self) -> None:
        self.sigmas = tuple(self.sigmas)
        check_sigmas(self.sigmas, "EvalConfig.sigmas")
        if self.batch < 1:
            raise ValueError(f"EvalConfig.batch must be >= 1, got {self.batch}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ValueError(f"EvalConfig.max_pairs must be >= 1 (or none: every pair), got {self.max_pairs}")
        if self.split not in ("held-out", "all"):
            raise ValueError(f"EvalConfig.split must be held-out or all, got {self.split!r}")
        check_lpips_net(self.lpips_net, "EvalConfig.lpips_net")


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
    """Rows ``{method, sigma, n, <metric means>, per_pair: {metric: [...]}, sources: [...]}`` per method and sigma.

    ``original`` is the 1x codec; ``decoders`` maps a method name to a 2x codec; dataset items have "latent", "hq"
    (and "id", "source" for a pair set). ``degrader``: a ``ldlib.degrade`` degrader, None, or "config".
    To test over several training seeds, concatenate the seeds' rows (``per_pair`` and ``sources``) and add a
    per-pair ``seeds`` list: ``compare`` then averages seeds within each photo.
    """
    from tqdm.auto import tqdm

    from ..build import parse_degrader
    from ..core.metrics import lpips_model

    cfg = cfg or EvalConfig()
    if isinstance(degrader, str) and degrader == "config":
        degrader = parse_degrader(cfg.degrader)
    lpips = lpips if lpips is not None else lpips_model(cfg.lpips_net, seed=cfg.lpips_seed)
    n = len(dataset) if cfg.max_pairs is None else min(cfg.max_pairs, len(dataset))
    if n == 0:
        raise ValueError("evaluate: the held-out set is empty")
    values: dict[tuple[str, float], dict[str, list[float]]] = {}
    sources: list[str | None] = []
    bar = tqdm(total=len(cfg.sigmas) * n, desc="evaluate", disable=not progress)
    for sigma in cfg.sigmas:
        for start in range(0, n, cfg.batch):
            idx = list(range(start, min(n, start + cfg.batch)))
            items = [dataset[i] for i in idx]
            if sigma == cfg.sigmas[0]:
                sources += [it.get("source") for it in items]
            z = torch.stack([it["latent"] for it in items]).float()
            hq = torch.stack([it["hq"] for it in items]).float()
            zd = degrade_for_eval(degrader, z, idx, float(sigma), cfg.seed, [it.get("id") for it in items])
            base = original.decode(zd).float()
            outputs = {"decoder+bicubic": bicubic_2x(base), "decoder+lanczos": lanczos_2x(base)}
            for name, codec in decoders.items():
                outputs[name] = codec.decode(zd).float()
            for name, y in outputs.items():
                if y.shape[-2:] != hq.shape[-2:]:  # a pair set built with --lq-factor 4: HQ is 4x its LQ
                    lq = items[0].get("lq")
                    ratio = f" ({hq.shape[-1] / lq.shape[-1]:g}x its LQ)" if lq is not None else ""
                    raise ValueError(f"{getattr(dataset, 'root', 'the dataset')}: HQ is {hq.shape[-2]}x{hq.shape[-1]}"
                                     f"{ratio} but its 2x decodes are {y.shape[-2]}x{y.shape[-1]}: a 2x decoder "
                                     "needs pairs whose HQ is 2x their LQ (build-pairs --lq-factor 2)")
                y = y.clamp(-1, 1)
                vals = {"psnr": psnr(y, hq), "ssim": ssim(y, hq), "lpips": lpips(y, hq).flatten(),
                        "haarpsi": haarpsi(y, hq), "speckle": speckle_ratio(y, hq), "colour_shift": colour_shift(y, hq)}
                cell = values.setdefault((name, float(sigma)), {k: [] for k in METRICS})
                for k, v in vals.items():
                    cell[k] += v.float().tolist()
            bar.update(len(idx))
    bar.close()
    return [{"method": name, "sigma": sigma, "n": len(v["psnr"]), **{k: float(np.mean(v[k])) for k in METRICS},
             "per_pair": v, "sources": sources} for (name, sigma), v in values.items()]


CURVE_METRICS = ("psnr", "haarpsi", "colour_shift")


@torch.no_grad()
def checkpoint_curves(run: str | os.PathLike, original, dataset: torch.utils.data.Dataset,
                      sigmas: Sequence[float] = (0.0,), degrader=None, seed: int = 0, ema: bool = True,
                      batch: int = 8, progress: bool = True) -> dict:
    """Held-out PSNR / HaarPSI / colour shift of every checkpoint of a run against decoder+bicubic, per sigma.

    Every checkpoint decodes the same degraded latents (evaluate's keyed draws, computed once). Returns
    ``{"steps": [...], "ours": {sigma: {metric: [per step]}}, "decoder+bicubic": {sigma: {metric: value}}}``.
    """
    from tqdm.auto import tqdm

    from ..build import load_run_codec
    from ..core.runs import CheckpointManager

    ckpts = sorted(CheckpointManager(Path(run) / "checkpoints").candidates(),
                   key=lambda p: json.loads((p / "state.json").read_text())["step"])
    if not ckpts:
        raise FileNotFoundError(f"{run}: no checkpoints to draw curves from")
    items = [dataset[i] for i in range(len(dataset))]
    hq = torch.stack([it["hq"] for it in items]).float()
    z = torch.stack([it["latent"] for it in items]).float()
    spans = [range(k, min(k + batch, len(items))) for k in range(0, len(items), batch)]
    degraded = {float(s): [degrade_for_eval(degrader, z[r.start:r.stop], list(r), float(s), seed,
                                            [it.get("id") for it in items[r.start:r.stop]]) for r in spans]
                for s in sigmas}

    def score(decode, s: float) -> dict[str, float]:
        vals = {m: [] for m in CURVE_METRICS}
        for r, zd in zip(spans, degraded[s]):
            y, h = decode(zd).float().clamp(-1, 1), hq[r.start:r.stop]
            for m, fn in (("psnr", psnr), ("haarpsi", haarpsi), ("colour_shift", colour_shift)):
                vals[m] += fn(y, h).float().tolist()
        return {m: float(np.mean(v)) for m, v in vals.items()}

    out = {"steps": [], "ours": {s: {m: [] for m in CURVE_METRICS} for s in degraded},
           "decoder+bicubic": {s: score(lambda x: bicubic_2x(original.decode(x)), s) for s in degraded}}
    for path in tqdm(ckpts, desc="checkpoints", disable=not progress):
        model, _ = load_run_codec(run, ema=ema, checkpoint=path)
        out["steps"].append(int(json.loads((path / "state.json").read_text())["step"]))
        for s in degraded:
            for m, v in score(model.decode, s).items():
                out["ours"][s][m].append(v)
    return out


def plot_curves(curves: dict, fig=None):
    """Held-out metrics against steps, one panel per metric, each sigma's decoder+bicubic as a dashed line."""
    from matplotlib.figure import Figure

    fig = fig or Figure(figsize=(4.4 * len(CURVE_METRICS), 3))
    axes = fig.subplots(1, len(CURVE_METRICS), squeeze=False)[0]
    for ax, m in zip(axes, CURVE_METRICS):
        for k, (s, per) in enumerate(curves["ours"].items()):
            colour = f"C{k}"
            ax.plot(curves["steps"], per[m], marker="o", ms=3, color=colour, label=f"ours, sigma {s:g}")
            ax.axhline(curves["decoder+bicubic"][s][m], color=colour, ls="--", lw=0.8,
                       label=f"decoder+bicubic, sigma {s:g}")
        ax.set_title(f"held-out {m.upper()}" + (" (lower is better)" if not HIGHER_IS_BETTER[m] else ""), fontsize=9)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def compare(ours: dict, base: dict, metric: str, seeds: Sequence | None = None, min_photos: int = MIN_PHOTOS,
            alpha: float = ALPHA) -> dict:
    """Paired test of two rows on one metric, the held-out photo as its unit.

    The rows' per-pair values (``per_pair[metric]``, aligned pair by pair: same crop, same noise) give one difference
    per pair, signed so that positive means ``ours`` is better (``HIGHER_IS_BETTER``). Within each source photo
    (``sources``; pairs with none count as one photo) the differences are averaged, per seed first when ``seeds``
    (one label per pair, e.g. a training seed; default: ``ours["seeds"]`` if the row has them) is given, then over
    the seeds with equal weight: seeds are nested in photos, and crops or seeds of one photo add no degrees of
    freedom. A two-sided one-sample t-test over the per-photo means (scipy.stats' t distribution, df = photos - 1)
    calls "better" / "worse" at p < ``alpha``, else "no clear difference"; "too few photos" below ``min_photos``.

    Returns ``metric``, ``mean_diff`` (mean of the per-photo means), ``se`` (their standard error), ``n_photos``,
    ``n_pairs``, ``n_seeds``, ``df``, ``t``, ``p`` (NaN below 2 photos, or when every photo's difference is 0),
    ``alpha``, ``per_photo_mean_diff`` and ``call``.
    """
    from scipy import stats

    if min_photos < 2:
        raise ValueError(f"compare: min_photos must be >= 2 (a t-test needs two photos for a spread), got {min_photos}")
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    a = np.asarray(ours["per_pair"][metric], float)
    b = np.asarray(base["per_pair"][metric], float)
    if a.shape != b.shape:
        raise ValueError(f"compare {metric}: {a.size} pairs against {b.size}; a paired test needs the same pairs")
    d = sign * (a - b)
    n = len(d)
    sources = list(ours.get("sources") or [None] * n)
    if base.get("sources") and list(base["sources"]) != sources:
        raise ValueError(f"compare {metric}: the two rows' pairs come from different photos (sources differ)")
    seeds = list(seeds if seeds is not None else ours.get("seeds") or [None] * n)
    if len(sources) != n or len(seeds) != n:
        raise ValueError(f"compare {metric}: {n} pairs but {len(sources)} sources and {len(seeds)} seeds")
    if base.get("seeds") and list(base["seeds"]) != seeds:
        raise ValueError(f"compare {metric}: the two rows' pairs come from different seeds (seeds differ)")
    cells: dict[str, dict[object, list[float]]] = {}
    for src, seed, v in zip(sources, seeds, d):
        cells.setdefault(str(src), {}).setdefault(seed, []).append(float(v))
    photo_means = {k: float(np.mean([np.mean(v) for v in by_seed.values()])) for k, by_seed in cells.items()}
    m = np.asarray(list(photo_means.values()), float)
    k = len(m)
    mean = float(m.mean()) if k else float("nan")
    se, t, p = float("inf"), float("nan"), float("nan")
    if k >= 2:
        se = float(m.std(ddof=1) / np.sqrt(k))
        if se > 0:
            t = mean / se
        elif mean != 0:  # every photo moved by exactly the same amount: no spread to doubt it
            t = float(np.copysign(np.inf, mean))
        if not np.isnan(t):
            p = float(2 * stats.t.sf(abs(t), k - 1))
    if k < min_photos:
        call = "too few photos"
    elif p < alpha:
        call = "better" if mean > 0 else "worse"
    else:
        call = "no clear difference"
    return {"metric": metric, "mean_diff": mean, "se": se, "n_photos": k, "n_pairs": n,
            "n_seeds": len(set(seeds)), "df": k - 1, "t": float(t), "p": p, "alpha": alpha,
            "per_photo_mean_diff": photo_means, "call": call}


def verdict(rows: list[dict], ours: str = "ours", metrics: Sequence[str] = VERDICT_METRICS,
            random_models: bool = False) -> dict:
    """Whether ``ours`` beats every baseline on each metric at every sigma by the paired test (``compare``).

    ``ours_beats_baselines`` is True only when every comparison is "better"; None when the models are random
    (the numbers then show the plumbing, not quality) or there are too few held-out photos to say.
    """
    by = {(r["method"], r["sigma"]): r for r in rows}
    sigmas = sorted({r["sigma"] for r in rows if r["method"] == ours})
    comparisons = [{"sigma": s, "baseline": b, **compare(by[(ours, s)], by[(b, s)], m)}
                   for s in sigmas for b in BASELINES if (b, s) in by for m in metrics]
    calls = {c["call"] for c in comparisons}
    photos = min((c["n_photos"] for c in comparisons), default=0)
    if random_models:
        beats, summary = None, "random models: these numbers show that the pipeline runs, not how good the method is"
    elif not comparisons or "too few photos" in calls:
        beats, summary = None, (f"too few held-out photos for a verdict ({photos} here, at least {MIN_PHOTOS} needed: "
                                "the paired test's unit is the photo, as crops of one photo are not independent)")
    else:
        beats = calls == {"better"}
        summary = (f"{ours} beats decoder+bicubic and decoder+Lanczos on " + ", ".join(m.upper() for m in metrics)
                   + f" at every sigma ({RULE}; {photos} photos)") if beats else (
            f"{ours} is not better everywhere: {sum(c['call'] == 'better' for c in comparisons)} of {len(comparisons)} "
            "comparisons better, " + ", ".join(f"{sum(c['call'] == k for c in comparisons)} {k}"
                                               for k in ("worse", "no clear difference") if k in calls)
            + f" ({RULE}; {photos} photos)")
    return {"ours_beats_baselines": beats, "summary": summary, "rule": RULE, "metrics": list(metrics),
            "comparisons": comparisons, "failures": [c for c in comparisons if c["call"] != "better"]}


def comparisons_table(comparisons: list[dict]) -> str:
    """The verdict's paired tests as a Markdown table (positive mean difference: ours better)."""
    if not comparisons:
        return ""
    out = ["", f"Paired tests of ours against each baseline ({RULE}); mean difference and its standard error over "
           "photos, positive: ours better.", "",
           "| vs | sigma | metric | mean diff | s.e. | photos | pairs | t | p | call |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in comparisons:
        out.append(f"| {c['baseline']} | {c['sigma']:g} | {c['metric']} | {c['mean_diff']:+.4f} | {c['se']:.4f} | "
                   f"{c['n_photos']} | {c['n_pairs']} | {c['t']:.2f} | {c['p']:.3g} | {c['call']} |")
    return "\n".join(out) + "\n"


def markdown_table(rows: list[dict]) -> str:
    """One Markdown table per metric: methods as rows, sigmas as columns (best per column in bold)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    sigmas = sorted({r["sigma"] for r in rows})
    by = {(r["method"], r["sigma"]): r for r in rows}
    out = []
    for m in METRICS:
        out += [f"### {m.upper()} ({DESCRIPTION[m]})", "", "| method | " + " | ".join(f"sigma {s:g}" for s in sigmas) + " |",
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
                v = f"{by[(me, s)][m]:.2f}" if m in ("psnr", "colour_shift") else f"{by[(me, s)][m]:.4f}"
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

        fig = plt.figure(figsize=(18, 3.4))
    axes = fig.subplots(1, len(METRICS)) if fig.axes == [] else fig.axes
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, m in zip(axes, METRICS):
        for me in methods:
            pts = sorted((r["sigma"], r[m]) for r in rows if r["method"] == me)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=me,
                    ls="--" if me in BASELINES else "-")
        if m == "speckle":
            ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("sigma")
        ax.set_title(m.upper() + (" (lower better)" if HIGHER_IS_BETTER.get(m) is False else ""), fontsize=9)
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
    info = info or {}
    doc = {"config": asdict(cfg), "info": info, "rows": rows,
           "verdict": verdict(rows, random_models=bool(info.get("random_models")))}
    atomic_write_bytes(out / "eval.json", json.dumps(doc, indent=2).encode())
    whole = info.get("split") == "all"
    md = f"# Evaluation against HQ ({'all pairs of the pair set' if whole else 'held-out pairs'})\n\n"
    if info.get("held_out_sources"):
        what = "photos (split all: every pair of the set)" if whole else "held-out photos"
        md += f"{info.get('held_out_pairs')} pairs from {len(info['held_out_sources'])} {what}: " \
              f"{', '.join(info['held_out_sources'])}; latents degraded by `{cfg.degrader}`."
        if info.get("split_pairs", info.get("held_out_pairs")) != info.get("held_out_pairs"):
            md += f" Only these were scored (--max-pairs {cfg.max_pairs}): the first {info.get('held_out_pairs')} " \
                  f"of the {info['split_pairs']} pairs {'in the set' if whole else 'held out'}."
        md += "\n\n"
    md += markdown_table(rows)
    md += f"\n**Verdict**: {doc['verdict']['summary']}\n"
    md += comparisons_table(doc["verdict"]["comparisons"])
    if not info.get("lpips_backbone_pretrained", True):
        md += "\nLPIPS used a random (seeded) backbone: torchvision weights were not available offline; HaarPSI needs none.\n"
    atomic_write_bytes(out / "eval.md", md.encode())
    save_figure(plot_rows(rows, Figure(figsize=(18, 3.4))), out / "eval.png")
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


def _check_lq_factor(pairs: str | os.PathLike, upscale: int) -> None:
    """Refuse a pair set whose HQ is not ``upscale``x its LQ (pairset.json's lq_factor): its HQ cannot be compared."""
    from ..data.pairs import PAIRSET_JSON

    path = Path(pairs) / PAIRSET_JSON
    spec = json.loads(path.read_text()).get("spec", {}) if path.is_file() else {}
    factor, hq = spec.get("lq_factor"), spec.get("hq_size")
    if factor is not None and hq is not None and factor != upscale:
        lq = hq // factor
        raise ValueError(f"{pairs}: HQ {hq}x{hq} is {factor}x its LQ {lq}x{lq} ({PAIRSET_JSON}: lq_factor {factor}), "
                         f"but a {upscale}x decoder outputs {upscale * lq}x{upscale * lq}: evaluate it on a pair set "
                         f"built with --lq-factor {upscale}")


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
    vae: str | None = None,
    vae_config: str | None = None,
    extra_models: dict[str, str | os.PathLike] | None = None,
) -> dict:
    """Evaluate a trained model (run or export) on a pair set's held-out split (or all of it); write the report.

    ``extra_models``: more decoders (method name -> run or export) scored on the same pairs and draws.
    """
    from ..build import load_decoder
    from ..data.datasets import PairDataset
    from ..data.latents import LatentCache, default_cache_dir
    from ..presets import get_preset

    cfg = cfg or EvalConfig()
    overrides = {k: v for k, v in (("vae", vae), ("vae_config", vae_config)) if v}  # a local VAE for the preset
    preset = get_preset(preset_name, taef2_path=taef2_dir, **overrides)
    original = codec_of(preset)
    ours, info = load_decoder(model, preset)
    _check_latents_fit(model, ours, info, original, preset)
    vf = val_fraction if val_fraction is not None else info.get("val_fraction")
    seed = split_seed if split_seed is not None else info.get("seed")
    if cfg.split == "held-out" and (vf is None or seed is None):
        # A guessed split (say 0.1 / seed 0) of a run trained with another one scores photos it trained on.
        raise ValueError(f"{model}: records no training split (an export made before ldlib recorded it, or not by "
                         "ldlib), so its held-out photos are unknown; pass --split all (a separate test set) or the "
                         "run's split with --val-fraction and --split-seed")
    decoders = {"ours": ours}
    if baseline_model is not None:
        decoders["ours (no degradation)"], base_info = load_decoder(baseline_model, preset)
        _check_latents_fit(baseline_model, decoders["ours (no degradation)"], base_info, original, preset)
    for name, path in (extra_models or {}).items():
        decoders[name], extra_info = load_decoder(path, preset)
        _check_latents_fit(path, decoders[name], extra_info, original, preset)
    _check_lq_factor(pairs, ours.upscale)
    cache = LatentCache(latents or default_cache_dir(pairs, preset.name), expect=original)
    dataset = PairDataset(pairs, latents=cache)
    held_out = dataset.split(vf, seed)[1] if cfg.split == "held-out" else dataset
    from ..core.metrics import lpips_model

    lp = lpips_model(cfg.lpips_net, seed=cfg.lpips_seed)
    from ..build import parse_degrader

    degrader = parse_degrader(cfg.degrader, preset, original, device="cpu")
    rows = evaluate_decoders(original, decoders, held_out, cfg, degrader=degrader, lpips=lp)
    scored = rows[0]["sources"]  # one per pair scored: with --max-pairs the first of the split, not all of it
    info.update(pairs=str(pairs), preset=preset.name, split=cfg.split, held_out_pairs=len(scored),
                held_out_sources=sorted(set(scored)), split_pairs=len(held_out), split_sources=held_out.sources,
                val_fraction=vf if cfg.split == "held-out" else None,
                split_seed=seed if cfg.split == "held-out" else None,
                baseline_model=str(baseline_model) if baseline_model else None,
                lpips_backbone_pretrained=bool(getattr(lp, "backbone_pretrained", False)),
                random_models=preset.random_weights)
    return write_report(rows, out, cfg, info)


# ------------------------------------------------------------------------------------------------------------
# pictures: the same crop of every method, side by side
# ------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def comparison_images(original, decoders: dict[str, object], items: Sequence[dict], sigma: float, degrader,
                      seed: int = 0, indices: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Full-size outputs of every method for dataset items at one sigma: ordered ``LQ (bicubic 2x)``,
    ``decoder+bicubic``, the decoders, ``HQ``; each N x 3 x H x W in [-1, 1].

    ``indices``: the items' indices in their dataset; with them the noise draws are the evaluation's own (it keys
    them by dataset index), so the pictures show the very samples ``evaluate_decoders`` scored. Default 0..N-1.
    """
    z = torch.stack([it["latent"] for it in items]).float()
    keys = list(indices) if indices is not None else list(range(len(items)))
    zd = degrade_for_eval(degrader, z, keys, float(sigma), seed, [it.get("id") for it in items])
    out = {"LQ (bicubic 2x)": bicubic_2x(torch.stack([it["lq"] for it in items])),
           "decoder+bicubic": bicubic_2x(original.decode(zd).float())}
    for name, codec in decoders.items():
        out[name] = codec.decode(zd).float()
    out["HQ"] = torch.stack([it["hq"] for it in items]).float()
    return {k: v.clamp(-1, 1) for k, v in out.items()}


def crops_figure(images: dict[str, torch.Tensor], crop: int = 160, title: str = "", fig=None):
    """One row per sample, one column per method: the same centre crop of each, titled with its PSNR vs HQ."""
    from matplotlib.figure import Figure

    hq = images["HQ"]
    n, names = hq.shape[0], list(images)
    fig = fig or Figure(figsize=(2.6 * len(names), 2.75 * n), dpi=100)
    axes = fig.subplots(n, len(names), squeeze=False)
    h, w = hq.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    for i in range(n):
        for ax, name in zip(axes[i], names):
            img = images[name][i]
            ax.imshow(((img[:, top : top + crop, left : left + crop].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(),
                      interpolation="nearest")
            label = name if name == "HQ" else f"{name}\n{psnr(img[None], hq[i : i + 1]).item():.2f} dB"
            ax.set_title(label, fontsize=8)
            ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    # tight_layout leaves the suptitle out of its sums: keep a strip of about 0.4 inch for it above the first titles.
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()) if title else None)
    return fig
