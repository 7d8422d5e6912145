"""Does the recipe work? Decoders that differ only in how their latents were degraded, several seeds each.

``python -m ldlib experiment OUT`` (resumable: rerun the same command after a kill; a second process running the
same command shares the decoder runs: a run another process is training is skipped) at ``taef2``:

1. pairs from a photo folder (default ../shared/data/photos, else the shipped photos), held out by photo: the photos
   named in ``held_out`` make the test pair set, the rest the training pair set; their latents;
2. teacher data (sigma ~ U[0, 0.3]) of both pair sets from the preset's diffusion teacher, and two proxies trained
   on the training set's: ``wide`` (every record, the recipe's proxy) and ``narrow`` (records up to the decoder's
   sigma range, more steps), each scored per sigma bin on the held-out photos' teacher data;
3. 2x decoders with identical settings (the fitted head, L1, the shipped decoder's schedule), differing only in the
   degrader: ``none`` (clean), ``noise``, ``proxy-wide``, ``proxy-narrow``, ``teacher`` (the cached teacher
   outputs), each with every seed in ``seeds`` (a seed changes the crops' order, the degradation draws and the
   head fit's sample; the data stay the same); a checkpoint every ``checkpoint_every`` steps gives the curves;
4. every decoder plus decoder+bicubic and decoder+Lanczos on the held-out pairs degraded by the teacher (live) and by
   noise; per condition the mean and standard error over seeds, the seed-to-seed standard deviation, and the paired
   test over seeds x photos (``evaluate.compare``, seeds nested in photos) for the recipe's two questions;
   ``results.md``, ``results.json``, ``curves.png`` (held-out PSNR / HaarPSI against steps), ``metrics.png`` and
   ``crops.png``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..build import codec_of
from ..core.files import atomic_write_bytes, save_figure
from ..presets import PRESET_HELP, PRESETS


CONDITIONS = ("none", "noise", "proxy-wide", "proxy-narrow", "teacher")
NAMES = {"none": "clean-trained", "noise": "noise-trained", "proxy-wide": "proxy-trained (wide)",
         "proxy-narrow": "proxy-trained (narrow)", "teacher": "teacher-trained"}
PROXIES = ("wide", "narrow")
# The recipe's two questions, asked at the sigmas that matter for a decoder trained on U[0, 0.12]:
# (a) does training on what the diffusion model does beat training on noise or clean latents;
# (b) does a proxy pass that benefit on (against noise, and against the teacher it mimics).
QUESTIONS = (("teacher", "noise"), ("teacher", "none"), ("proxy-narrow", "noise"), ("proxy-wide", "noise"),
             ("proxy-narrow", "teacher"), ("proxy-wide", "teacher"))
ANSWER_SIGMAS = (0.08, 0.12)
TABLE_METRICS = ("psnr", "haarpsi", "colour_shift", "speckle")


@dataclass
class ExperimentConfig:
    """Settings of the experiment (defaults: the recipe's question at 256 px crops, about 2.5 hours on 2 CPU cores)."""

    preset: str = field(default="taef2", metadata={"help": f"the preset (its VAE and its diffusion teacher): {PRESET_HELP}",
                                                   "choices": PRESETS})
    photos: str | None = field(default=None, metadata={"help": "photo folder (default: ../shared/data/photos, else the shipped photos)"})
    held_out: tuple[str, ...] = field(default=("p09", "p12", "p14", "p17", "p21", "p25"), metadata={
        "help": "photos held out (file names starting with these, comma-separated): the shipped decoder's test photos"})
    hq_size: int | None = field(default=256, metadata={"help": "HQ crop in px (default: the preset's; 256 fits 2 CPU cores)"})
    crops_per_image: int = field(default=8, metadata={"help": "crops per photo"})
    teacher_draws: int = field(default=8, metadata={"help": "teacher records (sigma, noise) per latent"})
    teacher_sigma_max: float = field(default=0.3, metadata={"help": "teacher data sigma range (wider than training's)"})
    proxy_steps: int = field(default=3000, metadata={"help": "steps of the wide proxy (every teacher record)"})
    narrow_sigma_max: float = field(default=0.15, metadata={"help": "the narrow proxy trains on records up to this sigma"})
    narrow_steps: int = field(default=6000, metadata={"help": "steps of the narrow proxy"})
    decoder_steps: int = field(default=600, metadata={"help": "steps of each decoder run"})
    checkpoint_every: int = field(default=100, metadata={"help": "steps between the checkpoints the curves score"})
    batch: int = field(default=2, metadata={"help": "decoder batch"})
    lr: float = field(default=2e-5, metadata={"help": "decoder learning rate (the shipped decoder's)"})
    warmup_steps: int = field(default=20, metadata={"help": "decoder learning-rate warm-up"})
    lpips_weight: float = field(default=0.0, metadata={"help": "LPIPS (alex) weight beside L1 (0: L1 alone, as shipped)"})
    head_init: str = field(default="least-squares", metadata={"help": "start of the 2x head (TrainConfig.head_init)"})
    ema_decay: float = field(default=0.995, metadata={"help": "decoder EMA"})
    conditions: tuple[str, ...] = field(default=CONDITIONS, metadata={
        "help": f"decoder conditions trained, comma-separated, of {', '.join(CONDITIONS)} (a subset confirms one "
                "comparison at a larger size; proxies are trained only for proxy conditions)"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "training seeds of every condition, comma-separated"})
    eval_sigmas: tuple[float, ...] = field(default=(0.0, 0.04, 0.08, 0.12, 0.16), metadata={"help": "teacher-degraded evaluation sigmas"})
    noise_sigmas: tuple[float, ...] = field(default=(0.08, 0.12), metadata={"help": "noise-degraded evaluation sigmas"})
    curve_sigmas: tuple[float, ...] = field(default=(0.0, 0.08), metadata={"help": "teacher-degraded sigmas of the curves"})
    eval_pairs: int | None = field(default=None, metadata={"help": "held-out pairs evaluated (default: all)"})
    seed: int = field(default=0, metadata={"help": "seed of the pairs, the teacher data, the proxies and the evaluation"})

    def __post_init__(self) -> None:
        self.held_out = tuple(str(h) for h in self.held_out)
        self.seeds = tuple(int(s) for s in self.seeds)
        unknown = [c for c in self.conditions if c not in CONDITIONS]
        if unknown or not self.conditions:
            raise ValueError(f"ExperimentConfig.conditions: {', '.join(unknown) or 'none given'}; choose from "
                             f"{', '.join(CONDITIONS)}")
        self.conditions = tuple(c for c in CONDITIONS if c in self.conditions)  # one order for tables and figures
        for name in ("eval_sigmas", "noise_sigmas", "curve_sigmas"):
            setattr(self, name, tuple(float(s) for s in getattr(self, name)))
        if not self.held_out:
            raise ValueError("ExperimentConfig.held_out: name at least one photo to hold out")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"ExperimentConfig.seeds must be distinct and at least one, got {self.seeds}")
        for name in ("decoder_steps", "checkpoint_every", "batch", "proxy_steps", "narrow_steps", "crops_per_image"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ExperimentConfig.{name} must be >= 1, got {getattr(self, name)}")


def _photos(cfg: ExperimentConfig) -> Path:
    from ..core.samples import sample_photos
    from ..presets import SHARED_DIR

    if cfg.photos:
        return Path(cfg.photos)
    shared = SHARED_DIR / "data" / "photos"
    return shared if shared.is_dir() else sample_photos()


def split_photos(src: Path, held_out: tuple[str, ...], out: Path) -> tuple[Path, Path]:
    """Folders ``out/train`` and ``out/test`` of links to src's photos: test holds those named in held_out."""
    from PIL import Image

    from ..core.images import list_images

    # Photos only: the pair builder would skip a licence file with a warning, but it has no place among the photos.
    files = [p for p in list_images(src) if p.suffix.lower() in Image.registered_extensions()]
    test = [p for p in files if p.name.startswith(held_out)]
    missing = [h for h in held_out if not any(p.name.startswith(h) for p in test)]
    if missing:
        raise FileNotFoundError(f"{src}: no photo named {', '.join(missing)}* to hold out (ExperimentConfig.held_out)")
    if len(test) == len(files):
        raise ValueError(f"{src}: every photo is held out; leave some to train on")
    folders = {"train": out / "train", "test": out / "test"}
    for split, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        for p in (test if split == "test" else [p for p in files if p not in test]):
            link = folder / p.name
            if not link.exists():
                os.symlink(p.resolve(), link)
    return folders["train"], folders["test"]


def _finished(run: Path, steps: int | None = None) -> bool:
    """Whether a run folder holds a finished run (of at least ``steps`` steps when given)."""
    if not (run / "summary.json").is_file():
        return False
    summary = json.loads((run / "summary.json").read_text())
    return summary["finished"] and (steps is None or summary["steps_done"] >= steps)


def _has_checkpoint(run: Path) -> bool:
    return (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step_*"))


def _train_config(cfg: ExperimentConfig, degrader: str, seed: int):
    from ..models.losses import LossConfig
    from ..train.decoder import TrainConfig

    return TrainConfig(preset=cfg.preset, steps=cfg.decoder_steps, batch=cfg.batch, lr=cfg.lr,
                       warmup_steps=cfg.warmup_steps, degrader=degrader, ema_decay=cfg.ema_decay,
                       checkpoint_every=cfg.checkpoint_every, keep_checkpoints=1000,
                       val_every=10**9, log_every=10, val_fraction=0.0, seed=seed,
                       head_init=cfg.head_init,
                       loss=LossConfig(lpips_net="alex", l1_weight=1.0, lpips_weight=cfg.lpips_weight, gan_weight=0.0))


def run_name(condition: str, seed: int) -> str:
    """A decoder run's folder under OUT/runs."""
    return f"{condition}-seed{seed}"


def run_experiment(out: str | os.PathLike, cfg: ExperimentConfig | None = None) -> dict:
    """Every stage (each resumes); writes results.md / results.json / curves.png / metrics.png / crops.png under out.

    Returns the experiment's state; ``state["waiting_for"]`` lists decoder runs another process is still training
    (this process then stops before the evaluation, which the last process to finish a run does).
    """
    from ..build import load_run_codec, parse_degrader
    from ..core.files import FolderBusyError
    from ..core.metrics import lpips_model
    from ..core.runs import with_defaults
    from ..data.datasets import PairDataset
    from ..data.latents import default_cache_dir, encode_pairs
    from ..data.pairs import PairSpec, build_pairs
    from ..data.teacher_data import TeacherSpec, describe_teacher, generate_teacher
    from ..presets import get_preset
    from ..train.decoder import train_decoder
    from ..train.proxy import ProxyTrainConfig, train_proxy
    from .evaluate import EvalConfig, checkpoint_curves, evaluate_decoders

    cfg = cfg or ExperimentConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "experiment.json"
    want = json.loads(json.dumps(asdict(cfg)))
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"config": want, "seconds": {}}
    # A setting added since the folder was made takes its default, which keeps the experiment it ran.
    have = with_defaults(state["config"], json.loads(json.dumps(asdict(ExperimentConfig()))), want)
    if have != want:
        # More decoder steps continue the runs (their schedule does not depend on the length) and redo the scoring.
        longer = {**have, "decoder_steps": want["decoder_steps"]} == want and want["decoder_steps"] > have["decoder_steps"]
        if not longer:
            raise ValueError(f"{out}: holds an experiment with other settings ({state_path}); use another folder "
                             "(only a larger decoder_steps continues it)")
        state.update(config=want, results={}, curves={})

    def save_state() -> None:
        # Another process sharing the runs may have recorded its stages' times since this one read the file.
        if state_path.is_file():
            theirs = json.loads(state_path.read_text()).get("seconds", {})
            state["seconds"] = {**theirs, **state["seconds"]}
        atomic_write_bytes(state_path, json.dumps(state, indent=2).encode())

    def done(stage: str, t0: float) -> None:
        state["seconds"][stage] = state["seconds"].get(stage, 0.0) + time.time() - t0
        save_state()
        print(f"[experiment] {stage}: {state['seconds'][stage] / 60:.1f} min", flush=True)

    preset = get_preset(cfg.preset)
    codec = codec_of(preset)
    t0 = time.time()
    photos = dict(zip(("train", "test"), split_photos(_photos(cfg), cfg.held_out, out / "photos")))
    pairs, latents = {}, {}
    for split, folder in photos.items():
        pairs[split] = out / f"pairs_{split}"
        build_pairs(folder, pairs[split], PairSpec.from_preset(preset, hq_size=cfg.hq_size,
                                                               crops_per_image=cfg.crops_per_image, seed=cfg.seed),
                    workers=2, progress=False)
        latents[split] = default_cache_dir(pairs[split], preset.name)
        encode_pairs(pairs[split], codec, latents[split], progress=False, device="cpu")
    done("pairs+latents", t0)

    t0 = time.time()
    teacher = parse_degrader("diffusion", preset, codec, steps=1, device="cpu")
    spec = TeacherSpec(sigma_max=cfg.teacher_sigma_max, per_latent=cfg.teacher_draws, steps=1, seed=cfg.seed)
    teacher_data = {split: out / f"teacher_{split}" for split in pairs}
    # The training photos' records feed the teacher condition and the proxies; the held-out ones score the proxies.
    uses_proxy = any(c.startswith("proxy") for c in cfg.conditions)
    for split in [s for s in pairs if uses_proxy or (s == "train" and "teacher" in cfg.conditions)]:
        generate_teacher(pairs[split], latents[split], teacher, teacher_data[split], spec,
                         teacher_info=describe_teacher(teacher, preset.name), progress=False, device="cpu")
    done("teacher data", t0)

    proxies = {kind: out / f"proxy_{kind}" for kind in PROXIES if f"proxy-{kind}" in cfg.conditions}
    settings = {"wide": dict(steps=cfg.proxy_steps),
                "narrow": dict(steps=cfg.narrow_steps, train_sigma_max=cfg.narrow_sigma_max)}
    for kind, folder in proxies.items():
        if not _finished(folder):
            t0 = time.time()
            train_proxy(ProxyTrainConfig(val_fraction=0.0, seed=cfg.seed, **settings[kind]), teacher_data["train"],
                        folder, resume=_has_checkpoint(folder))
            done(f"proxy {kind}", t0)
    if proxies and "proxy_fidelity" not in state:
        state["proxy_fidelity"] = proxy_fidelity(proxies, teacher_data["test"])
        save_state()

    specs = {"none": "none", "noise": "noise", "teacher": f"teacher:{teacher_data['train']}",
             **{f"proxy-{kind}": f"proxy:{folder}" for kind, folder in proxies.items()}}
    waiting = []
    for seed in cfg.seeds:  # seed-major: an interrupted experiment has every condition at the same seeds
        for kind in cfg.conditions:
            run = out / "runs" / run_name(kind, seed)
            if _finished(run, cfg.decoder_steps):
                continue
            t0 = time.time()
            try:
                train_decoder(_train_config(cfg, specs[kind], seed), run, pairs=pairs["train"],
                              latents=latents["train"], codec=codec, resume=_has_checkpoint(run))
            except FolderBusyError:  # another process of this experiment is training it
                waiting.append(run.name)
                continue
            done(f"decoder {run.name}", t0)
    waiting = [name for name in waiting if not _finished(out / "runs" / name, cfg.decoder_steps)]
    if waiting:
        print(f"[experiment] {', '.join(waiting)} still training in another process: it evaluates when done", flush=True)
        state["waiting_for"] = waiting
        return state
    state.pop("waiting_for", None)

    test = PairDataset(pairs["test"], latents=latents["test"])
    lp = lpips_model("alex", seed=1)
    decoders = {(kind, seed): load_run_codec(out / "runs" / run_name(kind, seed))[0]
                for kind in cfg.conditions for seed in cfg.seeds}
    results = state.setdefault("results", {})
    for name, spec_, sigmas in (("teacher", "diffusion", cfg.eval_sigmas), ("noise", "noise", cfg.noise_sigmas)):
        if name not in results:
            t0 = time.time()
            deg = teacher if name == "teacher" else parse_degrader("noise")
            rows = evaluate_decoders(codec, {f"{NAMES[k]} seed {s}": d for (k, s), d in decoders.items()}, test,
                                     EvalConfig(sigmas=sigmas, degrader=spec_, max_pairs=cfg.eval_pairs,
                                                seed=cfg.seed), deg, lp, progress=False)
            results[name] = rows
            done(f"evaluate ({name}-degraded)", t0)
    curves = state.setdefault("curves", {})
    for kind in cfg.conditions:
        for seed in cfg.seeds:
            name = run_name(kind, seed)
            if name not in curves:
                t0 = time.time()
                c = checkpoint_curves(out / "runs" / name, codec, test, sigmas=cfg.curve_sigmas, degrader=teacher,
                                      seed=cfg.seed, progress=False)
                curves[name] = json.loads(json.dumps(c))  # sigma keys as strings, as the file will hold them
                done(f"curves {name}", t0)
    write_results(out, state, test, codec, decoders, teacher, cfg)
    return state


def proxy_fidelity(proxies: dict[str, Path], held_out_teacher: Path) -> dict:
    """Each proxy's per-sigma-bin relative error against the teacher on the held-out photos' teacher data."""
    from ..models.proxy import load_proxy
    from ..data.teacher_data import TeacherDataset
    from ..train.proxy import evaluate_proxy

    data = TeacherDataset(held_out_teacher)
    return {kind: evaluate_proxy(load_proxy(folder), data, bins=6) for kind, folder in proxies.items()}


def pooled(rows: list[dict], kind: str, seeds: tuple[int, ...], sigma: float) -> dict:
    """One condition's rows of every seed at one sigma as one row whose pairs carry their seed (``compare``'s form)."""
    by = {(r["method"], r["sigma"]): r for r in rows}
    parts = [by[(f"{NAMES[kind]} seed {s}", sigma)] for s in seeds]
    return {"method": NAMES[kind], "sigma": sigma,
            "per_pair": {m: sum((list(p["per_pair"][m]) for p in parts), []) for m in parts[0]["per_pair"]},
            "sources": sum((list(p["sources"]) for p in parts), []),
            "seeds": sum(([s] * len(p["sources"]) for s, p in zip(seeds, parts)), [])}


def seed_stats(rows: list[dict], kind: str, seeds: tuple[int, ...], sigma: float, metric: str) -> dict:
    """Mean over seeds of a condition's held-out mean, its standard error and the seed-to-seed standard deviation."""
    by = {(r["method"], r["sigma"]): r for r in rows}
    per_seed = np.array([by[(f"{NAMES[kind]} seed {s}", sigma)][metric] for s in seeds], float)
    sd = float(per_seed.std(ddof=1)) if len(per_seed) > 1 else float("nan")
    return {"mean": float(per_seed.mean()), "sd": sd, "se": sd / np.sqrt(len(per_seed)), "per_seed": per_seed.tolist()}


def answers(results: dict, seeds: tuple[int, ...], conditions: tuple[str, ...] = CONDITIONS) -> list[dict]:
    """The paired test over seeds x photos for each of QUESTIONS (among conditions) at ANSWER_SIGMAS, teacher-degraded."""
    from .evaluate import compare

    rows = results["teacher"]
    out = []
    for ours, other in (q for q in QUESTIONS if set(q) <= set(conditions)):
        for s in ANSWER_SIGMAS:
            if not any(r["sigma"] == s for r in rows):
                continue
            a, b = pooled(rows, ours, seeds, s), pooled(rows, other, seeds, s)
            for m in ("psnr", "haarpsi", "colour_shift"):
                out.append({"ours": ours, "vs": other, "sigma": s, **compare(a, b, m)})
    return out


def write_results(out: Path, state: dict, test, codec, decoders: dict, teacher, cfg: ExperimentConfig) -> None:
    """results.json, results.md (tables with error bars and the paired answers), curves.png, metrics.png, crops.png."""
    from .evaluate import DESCRIPTION, RULE, comparison_images, crops_figure

    results, seeds = state["results"], cfg.seeds
    lines = ["# Results", "",
             f"{len(cfg.conditions)} conditions x {len(seeds)} seeds ({', '.join(map(str, seeds))}), {cfg.decoder_steps} "
             f"steps each; held-out photos: {', '.join(sorted(set(test.sources)))} ({len(test)} pairs); "
             f"HQ crops {test[0]['hq'].shape[-1]} px. Each cell: mean over seeds of the held-out mean, +- its standard "
             "error over seeds; SD: the seed-to-seed standard deviation.", ""]
    stats_json = {}
    for deg in ("teacher", "noise"):
        rows = results[deg]
        sigmas = sorted({r["sigma"] for r in rows})
        by = {(r["method"], r["sigma"]): r for r in rows}
        lines += [f"## Held-out latents degraded by the {'teacher (live, 1 Euler step)' if deg == 'teacher' else 'noise alone'}", ""]
        for m in TABLE_METRICS:
            digits = 2 if m in ("psnr", "colour_shift") else 4
            lines += [f"**{m.upper()}** ({DESCRIPTION[m]})", "",
                      "| method | " + " | ".join(f"sigma {s:g}" for s in sigmas) + " | SD over seeds (sigma "
                      f"{sigmas[-1]:g}) |", "|---|" + "---:|" * (len(sigmas) + 1)]
            for base in ("decoder+bicubic", "decoder+lanczos"):
                lines.append(f"| {base} | " + " | ".join(f"{by[(base, s)][m]:.{digits}f}" for s in sigmas) + " | - |")
            for kind in cfg.conditions:
                st = {s: seed_stats(rows, kind, seeds, s, m) for s in sigmas}
                stats_json.setdefault(deg, {}).setdefault(kind, {})[m] = {str(s): v for s, v in st.items()}
                spread = len(seeds) > 1  # one seed has no standard error: its cells are the held-out means
                lines.append(f"| {NAMES[kind]} | " + " | ".join(
                    f"{st[s]['mean']:.{digits}f}" + (f" +- {st[s]['se']:.{digits}f}" if spread else "") for s in sigmas)
                    + (f" | {st[sigmas[-1]]['sd']:.{digits}f} |" if spread else " | - |"))
            lines.append("")
    found = answers(results, seeds, cfg.conditions)
    lines += ["## The recipe's questions (teacher-degraded held-out latents)", "",
              f"Mean difference (positive: the first decoder is better), its standard error over photos, and the call "
              f"({RULE}; each photo's difference is averaged over its pairs within each seed, then over the "
              f"{len(seeds)} seeds).", "",
              "| decoder | vs | sigma | metric | mean diff | s.e. | photos | seeds | t | p | call |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in found:
        lines.append(f"| {NAMES[c['ours']]} | {NAMES[c['vs']]} | {c['sigma']:g} | {c['metric']} | "
                     f"{c['mean_diff']:+.4f} | {c['se']:.4f} | {c['n_photos']} | {c['n_seeds']} | {c['t']:.2f} | "
                     f"{c['p']:.3g} | {c['call']} |")
    fid = state.get("proxy_fidelity", {})
    kinds = list(fid)
    lines += [] if not fid else ["", "## The proxies against the teacher (held-out photos' teacher data)", "",
              f"Relative error {fid[kinds[0]]['metric']} (lower is better; x_sigma: doing nothing; x0: the clean "
              "latent).", "", "| sigma bin | records | " + " | ".join(f"{k} proxy" for k in kinds) + " | x_sigma | x0 |",
              "|---|---:|" + "---:|" * (len(kinds) + 2)]
    for bins in zip(*(fid[k]["bins"] for k in kinds)):
        w = bins[0]
        lines.append(f"| {w['sigma_lo']:.2f}-{w['sigma_hi']:.2f} | {w['count']} | "
                     + " | ".join(f"{b['proxy']:.4f}" for b in bins) + f" | {w['x_sigma']:.4f} | {w['x0']:.4f} |")
    lines += ["", "Wall time per stage (minutes): " + ", ".join(f"{k} {v / 60:.1f}" for k, v in state["seconds"].items())]
    atomic_write_bytes(out / "results.md", ("\n".join(lines) + "\n").encode())
    slim = {k: [{kk: vv for kk, vv in r.items() if kk not in ("per_pair", "sources")} for r in v]
            for k, v in results.items()}
    atomic_write_bytes(out / "results.json", json.dumps({
        "config": state["config"], "rows": slim, "seed_stats": stats_json, "answers": found,
        "proxy_fidelity": fid, "curves": state["curves"], "seconds": state["seconds"]}, indent=2).encode())
    save_figure(curves_figure(state["curves"], cfg), out / "curves.png")
    save_figure(metrics_figure(results, cfg), out / "metrics.png")
    picks = [next(i for i in range(len(test)) if test.records[i]["source"] == s) for s in test.sources]
    first = {NAMES[k]: decoders[(k, cfg.seeds[0])] for k in cfg.conditions}
    images = comparison_images(codec, first, [test[i] for i in picks], 0.08, teacher, cfg.seed, indices=picks)
    save_figure(crops_figure(images, crop=min(192, test[0]["hq"].shape[-1]),
                             title=f"held-out photos, latents degraded by the teacher at sigma 0.08 (seed {cfg.seeds[0]})"),
                out / "crops.png")


def curves_figure(curves: dict, cfg: ExperimentConfig):
    """Held-out PSNR and HaarPSI against steps per condition (mean over seeds, band: min to max), per curve sigma."""
    from matplotlib.figure import Figure

    sigmas = [str(s) for s in cfg.curve_sigmas]
    fig = Figure(figsize=(4.2 * 2 * len(sigmas), 3.2), dpi=100)
    axes = fig.subplots(1, 2 * len(sigmas), squeeze=False)[0]
    for j, (s, m) in enumerate((s, m) for s in sigmas for m in ("psnr", "haarpsi")):
        ax = axes[j]
        for k, kind in enumerate(cfg.conditions):
            runs = [curves[run_name(kind, seed)] for seed in cfg.seeds]
            steps = runs[0]["steps"]
            ys = np.array([r["ours"][s][m] for r in runs], float)
            ax.plot(steps, ys.mean(0), marker="o", ms=2.5, color=f"C{k}", label=NAMES[kind])
            ax.fill_between(steps, ys.min(0), ys.max(0), color=f"C{k}", alpha=0.15, lw=0)
        ax.axhline(runs[0]["decoder+bicubic"][s][m], color="k", ls="--", lw=0.8, label="decoder+bicubic")
        ax.set_title(f"held-out {m.upper()}, teacher-degraded, sigma {float(s):g}", fontsize=9)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def metrics_figure(results: dict, cfg: ExperimentConfig):
    """PSNR / HaarPSI / speckle against sigma per condition (mean over seeds, error bars: standard error)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 3.6), dpi=100)
    axes = fig.subplots(1, 4)
    for ax, (deg, m) in zip(axes, (("teacher", "psnr"), ("teacher", "haarpsi"), ("teacher", "speckle"), ("noise", "psnr"))):
        rows = results[deg]
        sigmas = sorted({r["sigma"] for r in rows})
        for base in ("decoder+bicubic", "decoder+lanczos"):
            pts = sorted((r["sigma"], r[m]) for r in rows if r["method"] == base)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls="--", marker="o", ms=3, label=base)
        for kind in cfg.conditions:
            st = [seed_stats(rows, kind, cfg.seeds, s, m) for s in sigmas]
            ax.errorbar(sigmas, [x["mean"] for x in st], yerr=[x["se"] for x in st], marker="o", ms=3, capsize=2,
                        label=NAMES[kind])
        ax.axvspan(0, 0.12, color="tab:green", alpha=0.08)
        ax.set_title(f"{m.upper()}, {deg}-degraded", fontsize=9)
        ax.set_xlabel("sigma")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
