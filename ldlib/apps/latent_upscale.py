"""The latent upscaler against what people use for a hires fix, and upscaling latent files with it.

Methods, each taking the same (degraded) LQ latent to a 2x latent:
- ``latent nearest`` / ``latent bilinear`` / ``latent bicubic``: the latent resized like an image (torch);
- ``decode-bicubic-encode``: the preset's decoder, bicubic 2x of the image, its encoder (slow, and it blurs);
- ``ours``: the trained ``LatentUpscaler``;
- ``enc(HQ)``: the latent of the HQ image itself, the ceiling (not degraded: what a perfect upscaler would give).

Per pair: the latent error relative to ``enc(HQ)`` (``|up - enc(HQ)| / |enc(HQ)|``), and PSNR, HaarPSI and colour
shift of ``decode(up)`` against the HQ pixels (``ldlib.core.metrics``), plus the time per latent of each method (the
upscale alone: for decode-bicubic-encode its decode, resize and encode), as wall time and as this process's CPU time
(on a shared machine the wall time also counts what other processes took; with one thread, on an idle core, the two
agree). The degradation is
``apps.evaluate.degrade_for_eval``'s (per sample, keyed by seed, sigma and index: identical for every method), the
paired verdicts ``apps.evaluate.compare``'s. With ``refine`` > 0 it scores the hires fix itself: each 2x latent,
the ceiling's too, noised to that sigma and denoised by the preset's teacher (the same draws for every method) before
the decode. Outputs: ``eval.json`` (rows with per-pair values, verdicts),
``eval.md`` (one table), ``crops.png`` (the same crop decoded from each method's latent).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..build import codec_of, load_latent_upscaler, vocabulary
from ..core.config import check_sigmas
from ..core.files import atomic_write_bytes, atomic_write_file, save_figure
from ..core.metrics import colour_shift, haarpsi, psnr, relative_error
from .evaluate import bicubic_2x, compare, degrade_for_eval

if TYPE_CHECKING:
    from ..models.codecs import Codec
    from ..models.latent_upscaler import LatentUpscaler
    from ..presets import Preset

METRICS = ("rel_err", "psnr", "haarpsi", "colour_shift", "seconds", "cpu_seconds")
VERDICT_METRICS = ("psnr", "haarpsi", "colour_shift")
OURS, DBE, CEILING = "ours", "decode-bicubic-encode", "enc(HQ)"
VERDICT_BASELINES = (DBE, "latent bicubic")
RESIZES = ("nearest", "bilinear", "bicubic")  # each a baseline "latent <mode>"


@dataclass
class LatentEvalConfig:
    """What to evaluate a latent upscaler on: sigmas, degrader, which pairs, batch, seed."""

    sigmas: tuple[float, ...] = field(default=(0.0, 0.08), metadata={"help": "sigmas, comma-separated"})
    degrader: str = field(default="diffusion", metadata={"help": f"how the LQ latents are degraded: {vocabulary(live=True)}"})
    split: Literal["all", "held-out"] = field(default="all", metadata={
        "help": "all (a separate test set: every pair) | held-out (the photos the model's run held out of PAIRS)"})
    per_photo: int | None = field(default=None, metadata={"help": "at most this many pairs of each photo (default: all)"})
    batch: int = field(default=4, metadata={"help": "latents per call"})
    seed: int = field(default=0, metadata={"help": "noise seed (the same draws for every method)"})
    refine: float = field(default=0.0, metadata={"help": "hires fix: noise each method's 2x latent (and enc(HQ)) to "
                                                          "this sigma and let the preset's teacher denoise it before "
                                                          "the decode is scored (0: score the plain decode)"})
    refine_steps: int = field(default=10, metadata={"help": "the teacher's Euler steps from the refine sigma to 0"})

    def __post_init__(self) -> None:
        self.sigmas = tuple(float(s) for s in self.sigmas)
        check_sigmas(self.sigmas, "LatentEvalConfig.sigmas")
        if self.batch < 1 or (self.per_photo is not None and self.per_photo < 1):
            raise ValueError(f"LatentEvalConfig: batch and per_photo must be >= 1, got {self.batch}, {self.per_photo}")
        check_sigmas((self.refine,), "LatentEvalConfig.refine")
        if self.refine_steps < 1:
            raise ValueError(f"LatentEvalConfig.refine_steps must be >= 1, got {self.refine_steps}")
        if self.split not in ("all", "held-out"):
            raise ValueError(f"LatentEvalConfig.split must be all or held-out, got {self.split!r}")


def baselines(codec) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The latent 2x methods people use, by name (normalised latents in and out)."""
    def resize(mode: str):
        kw = {} if mode == "nearest" else {"align_corners": False}
        return lambda z: F.interpolate(z.float(), scale_factor=2, mode=mode, **kw)

    return {**{f"latent {mode}": resize(mode) for mode in RESIZES},
            DBE: lambda z: codec.encode(bicubic_2x(codec.decode(z)).clamp(-1, 1))}


def hires_refine(refiner, z2x: torch.Tensor, indices: Sequence[int], refine: float, seed: int) -> torch.Tensor:
    """The hires fix's refinement of 2x latents (noise to ``refine``, the refiner denoises); unchanged without one."""
    if refiner is None or refine <= 0:
        return z2x
    # Its own draws (seed + 1): never the LQ degradation's, even at the same sigma.
    return degrade_for_eval(refiner, z2x.float(), indices, refine, seed + 1)


def _timed(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> tuple[torch.Tensor, tuple[float, float]]:
    """fn(z) and (wall seconds, CPU seconds of this process) per latent."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(z)
    return out, ((time.perf_counter() - t0) / len(z), (time.process_time() - c0) / len(z))


@torch.no_grad()
def evaluate_latent_upscalers(codec, upscalers: dict[str, Callable], dataset, cfg: LatentEvalConfig | None = None,
                              degrader=None, indices: Sequence[int] | None = None, progress: bool = True,
                              refiner=None) -> list[dict]:
    """Rows ``{method, sigma, n, <metric means>, per_pair: {metric: [...]}, sources: [...]}`` per method and sigma.

    ``upscalers``: name -> latent 2x function (the trained upscalers); the baselines and the ceiling are added.
    Dataset items need ``latent``, ``hq_latent``, ``hq`` (and ``id``, ``source``). ``indices``: which items.
    ``refiner`` (a degrader; with ``cfg.refine`` > 0): every 2x latent, the ceiling's too, is noised to ``cfg.refine``
    and denoised by it before it is scored, with the same draws for every method (the hires fix).
    """
    from tqdm.auto import tqdm

    cfg = cfg or LatentEvalConfig()
    indices = list(range(len(dataset))) if indices is None else list(indices)
    if not indices:
        raise ValueError("evaluate-latent-upscaler: no pairs to evaluate")
    methods = {**baselines(codec), **upscalers}
    values: dict[tuple[str, float], dict[str, list[float]]] = {}
    sources: list[str | None] = []

    def scores(up: torch.Tensor, hq: torch.Tensor, z_hq: torch.Tensor, idx: Sequence[int]) -> dict[str, list[float]]:
        up = hires_refine(refiner, up, idx, cfg.refine, cfg.seed)
        image = codec.decode(up.float()).float().clamp(-1, 1)
        return {"rel_err": relative_error(up, z_hq).tolist(), "psnr": psnr(image, hq).tolist(),
                "haarpsi": haarpsi(image, hq).tolist(), "colour_shift": colour_shift(image, hq).tolist()}

    def add(name: str, sigma: float, vals: dict[str, list[float]], seconds: tuple[float, float] | None) -> None:
        cell = values.setdefault((name, sigma), {k: [] for k in METRICS})
        for k, v in vals.items():
            cell[k] += [float(x) for x in v]
        if seconds is not None:  # the ceiling has no time: it is not an upscale
            cell["seconds"] += [seconds[0]] * len(vals["psnr"])
            cell["cpu_seconds"] += [seconds[1]] * len(vals["psnr"])

    with torch.no_grad():  # a first call of each method outside the timings (lazy initialisation, allocations)
        first = dataset[indices[0]]["latent"][None].float()
        for fn in methods.values():
            fn(first)

    bar = tqdm(total=len(indices), desc="evaluate latent upscalers", disable=not progress)
    for start in range(0, len(indices), cfg.batch):
        idx = indices[start : start + cfg.batch]
        items = [dataset[i] for i in idx]
        sources += [it.get("source") for it in items]
        z = torch.stack([it["latent"] for it in items]).float()
        z_hq = torch.stack([it["hq_latent"] for it in items]).float()
        hq = torch.stack([it["hq"] for it in items]).float()
        ceiling = scores(z_hq, hq, z_hq, idx)  # not degraded: the same at every sigma
        for sigma in cfg.sigmas:
            zd = degrade_for_eval(degrader, z, idx, sigma, cfg.seed, [it.get("id") for it in items])
            for name, fn in methods.items():
                up, seconds = _timed(fn, zd)
                if up.shape != z_hq.shape:
                    raise ValueError(f"{name}: upscaled latents are {tuple(up.shape[1:])}, the HQ latents "
                                     f"{tuple(z_hq.shape[1:])}: a 2x upscaler needs pairs whose HQ is 2x their LQ")
                add(name, sigma, scores(up, hq, z_hq, idx), seconds)
            add(CEILING, sigma, ceiling, None)
        bar.update(len(idx))
    bar.close()
    return [{"method": name, "sigma": sigma, "n": len(v["psnr"]),
             **{k: float(np.mean(v[k])) if v[k] else None for k in METRICS}, "per_pair": v, "sources": sources}
            for (name, sigma), v in values.items()]


def verdicts(rows: list[dict], ours: str = OURS, baselines_: Sequence[str] = VERDICT_BASELINES,
             metrics: Sequence[str] = VERDICT_METRICS) -> list[dict]:
    """``compare`` (apps.evaluate's paired verdict) of ours against each baseline, per sigma and metric."""
    by = {(r["method"], r["sigma"]): r for r in rows}
    return [{"sigma": s, "model": ours, "baseline": b, **compare(by[(ours, s)], by[(b, s)], m)}
            for s in sorted({r["sigma"] for r in rows if r["method"] == ours})
            for b in baselines_ if (b, s) in by for m in metrics]


def markdown_table(rows: list[dict]) -> str:
    """One table: methods x sigmas, relative latent error, PSNR, HaarPSI, colour shift and ms per latent (CPU, wall)."""
    lines = ["| method | sigma | latent error vs enc(HQ) | PSNR dB | HaarPSI | colour shift "
             "| ms / latent, CPU (wall) |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["sigma"], _order(r["method"]))):
        ms = "-" if r["seconds"] is None else f"{1000 * r['cpu_seconds']:.1f} ({1000 * r['seconds']:.1f})"
        lines.append(f"| {r['method']} | {r['sigma']:g} | {r['rel_err']:.3f} | {r['psnr']:.2f} | {r['haarpsi']:.4f} "
                     f"| {r['colour_shift']:.2f} | {ms} |")
    return "\n".join(lines) + "\n"


def verdict_lines(comparisons: list[dict]) -> str:
    """Markdown bullets: each model vs each baseline per sigma, every metric's call with its mean paired difference."""
    out = []
    for (s, m, b) in dict.fromkeys((c["sigma"], c.get("model", OURS), c["baseline"]) for c in comparisons):
        parts = [f"{c['metric']} {c['call']} ({c['mean_diff']:+.3g} +- {c['se']:.2g})" for c in comparisons
                 if c["sigma"] == s and c.get("model", OURS) == m and c["baseline"] == b]
        out.append(f"- sigma {s:g}, {m} vs {b}: " + "; ".join(parts))
    return "\n".join(out) + "\n"


def _order(method: str) -> int:
    known = [*(f"latent {mode}" for mode in RESIZES), DBE, OURS, CEILING]
    return known.index(method if method in known else OURS)  # named models sit where ours does


def photo_subset(records: Sequence[dict], per_photo: int | None) -> list[int]:
    """Indices of the first ``per_photo`` pairs of each source photo (all when None), in record order."""
    seen: dict[str, int] = {}
    keep = []
    for i, r in enumerate(records):
        seen[r["source"]] = seen.get(r["source"], 0) + 1
        if per_photo is None or seen[r["source"]] <= per_photo:
            keep.append(i)
    return keep


def upscaler_and_codec(model: str | os.PathLike | None, preset_name: str,
                       taef2_dir: str | None = None) -> tuple["Preset", "Codec", "LatentUpscaler", dict, str]:
    """(preset, codec, upscaler, its info, the model it was loaded from) of a latent-upscaler folder or run (None: the
    preset's shipped one)."""
    from ..presets import PRESETS, get_preset, shipped_latent_upscaler

    preset = get_preset(preset_name, taef2_path=taef2_dir)
    codec = codec_of(preset)
    if model is None:
        model = shipped_latent_upscaler(preset)
        if model is None:
            have = [name for name in PRESETS if get_preset(name).latent_upscaler]
            raise ValueError(f"ldlib ships no latent upscaler for preset {preset.name!r} (it ships one for: "
                             f"{', '.join(have)}); pass --model FOLDER_OR_RUN")
    net, info = load_latent_upscaler(model, preset, codec)
    return preset, codec, net, info, str(model)


def named_models(models: str | os.PathLike | Sequence[str | os.PathLike] | None) -> dict[str, str | None]:
    """Name -> model of an evaluation, from ``PATH`` or ``NAME=PATH`` entries: an unnamed model alone (or None, the
    shipped one) is ``ours``, unnamed ones among several are named by their folder."""
    if models is None:
        return {OURS: None}
    models = [str(models)] if isinstance(models, (str, os.PathLike)) else [str(m) for m in models]
    named: dict[str, str] = {}
    reserved = [*(f"latent {mode}" for mode in RESIZES), DBE, CEILING]
    for m in models:
        name, path = m.split("=", 1) if "=" in m and not Path(m).exists() else (None, m)
        if name is None:
            name = OURS if len(models) == 1 else Path(path).name
        if not name or name in named or name in reserved:
            why = "is one of the baselines" if name in reserved else "names two models" if name else "is empty"
            raise ValueError(f"evaluate-latent-upscaler: model name {name!r} {why}; name each NAME=PATH")
        named[name] = path
    return named


def _held_out_split(info: dict, model: str | None) -> tuple[float, int]:
    training = info.get("training", {})
    seed = training.get("split_seed") if training.get("split_seed") is not None else training.get("seed")
    if training.get("val_fraction") is None or seed is None:
        raise ValueError(f"{model}: records no training split; pass --split all (a separate test set)")
    return training["val_fraction"], seed


def run_latent_evaluation(model: str | os.PathLike | Sequence[str | os.PathLike] | None, pairs: str | os.PathLike,
                          out: str | os.PathLike, preset_name: str = "taef2", cfg: LatentEvalConfig | None = None,
                          latents: str | os.PathLike | None = None, hq_latents: str | os.PathLike | None = None,
                          taef2_dir: str | None = None, progress: bool = True) -> dict:
    """Evaluate a latent upscaler (a folder, its run, or None: the preset's shipped one), or several on the same pairs
    and draws (``named_models``), on a pair set; write eval.json, eval.md and crops.png under out; return the JSON
    document. With several, each gets the verdicts against the baselines and every later one against the first."""
    from ..train.latent_upscaler import pairs_with_hq_latents

    cfg = cfg or LatentEvalConfig()
    models = named_models(model)
    names = list(models)
    preset, codec, net, info, first = upscaler_and_codec(models[names[0]], preset_name, taef2_dir)
    nets, infos = {names[0]: net}, {names[0]: info}
    for name in names[1:]:
        nets[name], infos[name] = load_latent_upscaler(models[name], preset, codec)
    data = pairs_with_hq_latents(pairs, codec, preset.name, latents, hq_latents, progress=progress)
    if cfg.split == "held-out":
        splits = {name: _held_out_split(infos[name], models[name]) for name in names}
        if len(set(splits.values())) > 1:
            raise ValueError(f"--split held-out: the models were trained on different splits {splits}; pass --split "
                             f"all with a separate test set")
        data = data.split(*splits[names[0]])[1]
    indices = photo_subset(data.records, cfg.per_photo)
    from ..build import parse_degrader

    degrader = parse_degrader(cfg.degrader, preset, codec, device="cpu")
    refiner = parse_degrader("diffusion", preset, codec, steps=cfg.refine_steps, device="cpu") if cfg.refine else None
    rows = evaluate_latent_upscalers(codec, nets, data, cfg, degrader, indices, progress, refiner)
    comparisons = [c for name in names for c in verdicts(rows, ours=name)]
    comparisons += [c for name in names[1:] for c in verdicts(rows, ours=name, baselines_=names[:1])]
    scored = sorted({data.records[i]["source"] for i in indices})
    doc = {"config": asdict(cfg), "model": first, "model_info": {k: v for k, v in info.items() if k != "codec"},
           "models": {name: models[name] or first for name in names},
           "pairs": str(pairs), "preset": preset.name, "pairs_scored": len(indices), "photos": scored,
           "torch_threads": torch.get_num_threads(), "rows": rows, "verdicts": comparisons,
           "random_models": preset.random_weights}
    out = Path(out)
    atomic_write_bytes(out / "eval.json", json.dumps(doc, indent=2).encode())
    described = (f"model `{first}`" if len(names) == 1
                 else "models " + ", ".join(f"{name} `{path}`" for name, path in doc["models"].items()))
    md = (f"# Latent upscaler vs the hires-fix baselines\n\n{len(indices)} pairs of {len(scored)} photos "
          f"({', '.join(scored)}) of `{pairs}`, preset {preset.name}; LQ latents degraded by `{cfg.degrader}`; "
          f"{described}; time per latent with {torch.get_num_threads()} CPU thread(s).\n\n"
          + (f"Hires fix: every 2x latent (and enc(HQ)) noised to sigma {cfg.refine:g} and denoised by the "
             f"preset's teacher in {cfg.refine_steps} Euler steps before its decode is scored.\n\n" if cfg.refine else "")
          + markdown_table(rows) + "\nPaired verdicts (mean difference, model minus baseline, signed so that + is "
          "better, +- one standard error):\n\n" + verdict_lines(comparisons))
    if preset.random_weights:
        md += "\nRandom models (preset tiny): these numbers show that the pipeline runs, not how good the method is.\n"
    atomic_write_bytes(out / "eval.md", md.encode())
    picks = [next(i for i in indices if data.records[i]["source"] == s) for s in scored][:4]
    figure = crops_figure_of(codec, net, [data[i] for i in picks], max(cfg.sigmas), degrader, cfg.seed, picks,
                             refiner=refiner, refine=cfg.refine)
    save_figure(figure, out / "crops.png")
    return doc


@torch.no_grad()
def comparison_decodes(codec, upscaler, items: Sequence[dict], sigma: float, degrader, seed: int = 0,
                       indices: Sequence[int] | None = None,
                       methods: Sequence[str] = ("latent bicubic", DBE), refiner=None,
                       refine: float = 0.0) -> dict[str, torch.Tensor]:
    """Decodes of each method's 2x latent of the items' (degraded) LQ latents, then ``ours``, ``enc(HQ)`` and ``HQ``:
    name -> N x 3 x H x W in [-1, 1] (the noise draws are the evaluation's when ``indices`` are the items'; with a
    ``refiner`` and ``refine`` > 0, each 2x latent is refined first, as ``evaluate_latent_upscalers`` does)."""
    z = torch.stack([it["latent"] for it in items]).float()
    keys = list(indices) if indices is not None else list(range(len(items)))
    zd = degrade_for_eval(degrader, z, keys, float(sigma), seed, [it.get("id") for it in items])
    known = baselines(codec)
    fns = {**{name: known[name] for name in methods}, OURS: upscaler,
           CEILING: lambda _: torch.stack([it["hq_latent"] for it in items]).float()}
    out = {}
    for name, fn in fns.items():
        up = fn(zd).float()
        out[name] = codec.decode(hires_refine(refiner, up, keys, refine, seed))
    out["HQ"] = torch.stack([it["hq"] for it in items]).float()
    return {k: v.float().clamp(-1, 1) for k, v in out.items()}


def crops_figure_of(codec, upscaler, items, sigma, degrader, seed=0, indices=None, crop: int = 160, refiner=None,
                    refine: float = 0.0):
    """apps.evaluate's crops figure (same centre crop per method, PSNR in each title) of ``comparison_decodes``."""
    from matplotlib.figure import Figure

    from .evaluate import crops_figure

    images = comparison_decodes(codec, upscaler, items, sigma, degrader, seed, indices, refiner=refiner, refine=refine)
    crop = min(crop, images["HQ"].shape[-1])
    hires = f", refined from sigma {refine:g} by the teacher" if refiner is not None and refine > 0 else ""
    return crops_figure(images, crop=crop, title=f"decode of each 2x latent{hires}, LQ latents degraded at sigma {sigma:g}",
                        fig=Figure(figsize=(2.6 * len(images), 2.75 * len(items)), dpi=100))


# ------------------------------------------------------------------------------------------------------------
# upscale-latents: latent files in, 2x latent files out
# ------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def upscale_latent_files(inputs: Sequence[str | os.PathLike], model: str | os.PathLike | None, out_dir: str | os.PathLike,
                         preset_name: str = "taef2", raw: bool = False, overwrite: bool = False,
                         taef2_dir: str | None = None) -> list[Path]:
    """Upscale latent files (.safetensors / .pt: C x h x w or N x C x h x w) 2x; write ``<stem>_2x.safetensors``
    (tensor ``latents``, N x C x 2h x 2w, the input's space: normalised, or raw with ``raw``) into out_dir."""
    from safetensors.torch import save_file

    from .upscale import read_latents

    _, codec, net, _, model = upscaler_and_codec(model, preset_name, taef2_dir)
    out_dir = Path(out_dir)
    targets = [out_dir / f"{Path(p).stem}_2x.safetensors" for p in inputs]
    for target in targets:
        if target.exists() and not overwrite:
            raise ValueError(f"{target}: exists already; pass --overwrite to replace it, or choose another --out")
    written = []
    for path, target in zip(inputs, targets):
        z = read_latents(path, net.channels)
        up = net(codec.normalise(z) if raw else z)
        up = codec.denormalise(up) if raw else up
        data = {"latents": up.contiguous()}
        atomic_write_file(target, lambda tmp: save_file(data, str(tmp), metadata={"upscaled_by": str(model)}))
        written.append(target)
    return written
