"""`python -m ldlib <command>`: the same steps as the notebooks, for scripts and clusters.

Each command is a ``cmd_<name>(args)`` function plus its parser in ``build_parser``; the work itself lives in the
ldlib modules, so notebooks and scripts call the same code. Settings that have a config dataclass (TrainConfig,
ProxyTrainConfig, EvalConfig, SweepConfig, PairSpec, TeacherSpec, LatentUpscalerConfig, LatentEvalConfig) get their
flags, defaults and help from it
(``ldlib.core.config``): each setting is declared once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..build import codec_of, has_trained_teacher, vocabulary
from ..presets import PRESET_HELP, PRESETS


def _add_preset(p: argparse.ArgumentParser, default: str = "taef2") -> None:
    # taef2 (the real offline recipe) by default: tiny makes random models and 128 px crops, plumbing only.
    p.add_argument("--preset", default=default, choices=PRESETS, metavar="PRESET",
                   help=f"{PRESET_HELP} (default: %(default)s)")
    p.add_argument("--taef2-dir", default=None, help="taef2 weights folder (default: the packaged weights, or $LDLIB_TAEF2_DIR)")


def _add_batch_job(p: argparse.ArgumentParser, batch_size: int, shard_size: int, unit: str) -> None:
    """The options every batched, sharded, resumable writer of safetensors shards takes (encode, teacher)."""
    p.add_argument("--batch-size", type=int, default=batch_size, help="default: %(default)s")
    p.add_argument("--shard-size", type=int, default=shard_size, help=f"{unit} per safetensors file (default: %(default)s)")
    p.add_argument("--shard", default=None, help="i/N: only this machine's share of the pairs")
    p.add_argument("--device", default=None, help="cuda | cpu | ... (default: CUDA when present)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_vae(p: argparse.ArgumentParser) -> None:
    """--vae / --vae-config: replace the preset's hub VAE by a local folder or one weights file."""
    p.add_argument("--vae", default=None,
                   help="local VAE replacing the preset's: a diffusers folder, or one .safetensors/.pth file "
                        "(original Wan layout for wan2.1-* / qwen-image)")
    p.add_argument("--vae-config", default=None,
                   help="architecture of a single-file --vae: a diffusers VAE folder or config.json "
                        "(default for wan2.1-* / qwen-image: the published config)")


def _preset(args: argparse.Namespace):
    """The preset named on the command line, with its --taef2-dir / --vae / --vae-config overrides."""
    from ..presets import get_preset, vae_overrides

    return get_preset(args.preset, taef2_path=args.taef2_dir, **vae_overrides(vars(args)))


def cmd_codec_check(args: argparse.Namespace) -> int:
    """Encode and decode one image with a preset's VAE; print PSNR against the input."""
    import torch

    from ..core.images import area_downsample, load_image, save_image
    from ..core.metrics import psnr

    preset = _preset(args)
    codec = codec_of(preset)
    x = load_image(args.image)
    f = codec.spatial_factor
    size = args.size or min(x.shape[-2:]) // f * f
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size]
    if args.downsample > 1:
        x = area_downsample(x[..., : size // args.downsample * args.downsample, : size // args.downsample * args.downsample], args.downsample)
    with torch.no_grad():
        z = codec.encode(x)
        y = codec.decode(z)
    value = psnr(y, x).item()
    print(f"{preset.name} ({codec.family}): {tuple(x.shape[-2:])} -> latents {tuple(z.shape[1:])} -> PSNR {value:.2f} dB")
    if args.out:
        save_image(torch.cat([x, y], dim=-1), args.out)
        print(f"wrote {args.out} (input | reconstruction)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the whole pipeline at demo size on the embedded sample photos."""
    from .demo import DemoConfig, run_demo

    # One folder per preset: a run's folders refuse another preset's pairs and settings (tiny, then make demo).
    out = args.out or ("runs/demo" if args.preset == "taef2" else f"runs/demo-{args.preset}")
    run_demo(Path(out), DemoConfig.for_preset(args.preset, **({"decoder_steps": args.steps} if args.steps else {})))
    return 0


def cmd_build_pairs(args: argparse.Namespace) -> int:
    """Build (or resume) a pair set from a folder of photos; print a summary; non-zero when it holds no pair."""
    import warnings

    from ..data.pairs import SkippedInputWarning, build_pairs, format_report

    spec = _pair_spec(args)
    with warnings.catch_warnings():
        # The summary lists every skipped/converted file; one warning line each on stderr is enough.
        warnings.simplefilter("ignore", SkippedInputWarning)
        report = build_pairs(args.src, args.out, spec, workers=args.workers, shard=args.shard, progress=not args.quiet)
    print(format_report(report))
    for item in report["skipped"]:
        print(f"warning: {item['source']}: skipped: {item['reason']}", file=sys.stderr)
    if report["pairs_total"] == 0:
        print(f"error: no pair was built from {args.src} (see {args.out}/report.json)", file=sys.stderr)
        return 1
    return 0


def _pair_spec(args: argparse.Namespace):
    """The recipe spec at the preset's sizes, with the command line's overrides (no weights are loaded)."""
    from ..core.config import flag_names

    try:
        return _pair_spec_of(args)
    except ValueError as e:  # the user typed flags: name them, not PairSpec's fields
        raise ValueError(flag_names(str(e))) from e


def _pair_spec_of(args: argparse.Namespace):
    from ..core.config import config_fields
    from ..data.pairs import PairSpec

    overrides = {name: getattr(args, name) for name, *_ in config_fields(PairSpec) if getattr(args, name) is not None}
    try:
        preset = _preset(args)
    except FileNotFoundError:  # taef2 weights absent: cutting crops needs only sizes, and taef2 uses the recipe's
        spec = PairSpec(**overrides)
        spec.check_encodable(8, f"the {args.preset} VAE")  # every preset's VAE has 8 px per latent cell
        return spec
    return PairSpec.from_preset(preset, **overrides)


def cmd_encode(args: argparse.Namespace) -> int:
    """Encode every LQ of a pair set with the preset's frozen encoder into a latent cache (resumable)."""
    from ..data.latents import default_cache_dir, encode_pairs

    preset = _preset(args)
    out = Path(args.out) if args.out else default_cache_dir(args.pairs, preset.name, image=args.image)
    result = encode_pairs(
        args.pairs, codec_of(preset), out, batch_size=args.batch_size, shard_size=args.shard_size,
        shard=args.shard, device=args.device, progress=not args.quiet, image=args.image,
    )
    ident = result["identity"]
    print(
        f"{args.image.upper()} latents {result['out']}: {result['encoded']} encoded now on {result['device']}, "
        f"{result['already_cached']} already cached, {result['cached_total']} in the cache "
        f"({ident['family']}, {ident['latent_channels']} channels, encoder {ident['encoder_sha256'][:12]})"
    )
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    """Run the preset's diffusion degrader on cached latents: targets for training the proxy (resumable)."""
    from ..build import diffusion_degrader
    from ..core.config import config_from_args
    from ..core.runs import default_device
    from ..data.latents import default_cache_dir
    from ..data.teacher_data import TeacherSpec, describe_teacher, generate_teacher

    preset = _preset(args)
    spec = config_from_args(TeacherSpec, args)
    device = args.device or default_device()
    degrader = diffusion_degrader(preset, steps=spec.steps, prompt=spec.prompt, device=device, batch_size=args.batch_size)
    latents = Path(args.latents) if args.latents else default_cache_dir(args.pairs, preset.name)
    result = generate_teacher(
        args.pairs, latents, degrader, args.out, spec, teacher_info=describe_teacher(degrader, preset.name),
        batch_size=args.batch_size, shard_size=args.shard_size, shard=args.shard, device=device, progress=not args.quiet,
    )
    print(f"teacher {result['out']}: {result['computed']} computed now, {result['already_done']} already done "
          f"(sigma ~ U[0, {spec.sigma_max}], {spec.steps} Euler steps, "
          f"{'fixed prompt embedding' if has_trained_teacher(preset) else f'prompt {spec.prompt!r}'})")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Sigma sweep of a degrader on pairs: per-sigma latent error, HF share, PSNR/LPIPS; writes JSON/Markdown/plot."""
    from ..core.config import config_from_args
    from .analysis import SweepConfig, run_sweep

    result = run_sweep(
        args.preset, args.degrader, args.out, pairs_dir=args.pairs, photos=args.photos, n=args.n,
        config=config_from_args(SweepConfig, args), steps=args.steps, prompt=args.prompt, taef2_path=args.taef2_dir,
    )
    print(result.markdown())
    for note in result.notes:
        print(f"- {note}")
    print(f"wrote {args.out}/sweep.json, sweep.md, sweep.png")
    return 0


def cmd_train_proxy(args: argparse.Namespace) -> int:
    """Train the proxy degrader on teacher data; writes the proxy, OUT/eval.json and OUT/summary.json."""
    from ..core.config import config_from_args
    from ..data.teacher_data import TeacherSet
    from ..train.proxy import ProxyTrainConfig, train_proxy

    made_with = TeacherSet(args.teacher).info.get("teacher", {}).get("preset")
    if args.preset and made_with and args.preset != made_with:
        raise ValueError(f"{args.teacher}: teacher data was made with preset {made_with!r}, not {args.preset!r}")
    summary = train_proxy(config_from_args(ProxyTrainConfig, args), args.teacher, args.out, latents=args.latents,
                          resume=args.resume)
    ev = summary.get("eval")
    print(f"proxy {args.out}: {summary['steps_done']}/{summary['steps_target']} steps, "
          f"{summary['train_records']} train / {summary['val_records']} held-out records")
    if ev:
        print(f"held-out |P - T| / |T - x0|: proxy {ev['proxy']:.3f}, return-x_sigma {ev['x_sigma']:.3f}, "
              f"return-x0 {ev['x0']:.3f} -> {args.out}/eval.json, eval.png")
    return 0


def cmd_train_teacher(args: argparse.Namespace) -> int:
    """Train the small flow-matching teacher in a preset's latent space; writes the run and OUT/teacher."""
    from ..core.config import config_from_args
    from ..train.teacher import TeacherConfig, train_teacher

    cfg = config_from_args(TeacherConfig, args)
    s = train_teacher(cfg, args.pairs, args.out, latents=args.latents, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # one report per run, not per DDP process
        return 0
    print(f"train-teacher {args.out}: {s['steps_done']}/{s['steps_target']} steps, {s['parameters'] / 1e6:.2f}M parameters, "
          f"{s['steps_per_s_this_run'] or 0:.2f} steps/s this run; held out: {', '.join(s['held_out_sources'])}")
    if s.get("eval"):
        ratios = ", ".join(f"{k}: {v:.3f}" for k, v in s["eval"].items())
        print(f"held-out one-step denoise error / return-x_sigma per sigma: {ratios}")
        print(f"teacher folder: {s['teacher']} (eval.json, eval.png, samples.png)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run benchmarks; write Markdown and JSON under runs/bench/."""
    from .bench import run_benches

    train = {"batches": args.batches, "rounds": args.rounds, "only": args.variants, "vae": args.vae}
    train = {k: v for k, v in train.items() if v is not None}
    if train and args.which != "train":
        raise ValueError(f"--{', --'.join(k if k != 'only' else 'variants' for k in train)} apply to `bench train` only")
    run_benches(args.which, out=Path(args.out), preset_name=args.preset, quick=args.quick, train_options=train)
    return 0


def cmd_train_decoder(args: argparse.Namespace) -> int:
    """Train the 2x decoder on a pair set's latent cache; writes checkpoints, tb/ and OUT/summary.json."""
    from ..core.config import config_from_args
    from ..train.decoder import TrainConfig, train_decoder

    cfg = config_from_args(TrainConfig, args)
    res = train_decoder(cfg, args.out, pairs=args.pairs, latents=args.latents, resume=args.resume)
    s = res.summary
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per DDP process
        print(f"train-decoder {args.out}: {s['steps_done']}/{s['steps_target']} steps, {len(s['skipped_steps'])} skipped, "
              f"{s['samples_per_s_this_run'] or 0:.2f} samples/s; validation {s['validation']}")
    return 0


def cmd_train_latent_upscaler(args: argparse.Namespace) -> int:
    """Train a latent 2x upscaler on a pair set (enc(LQ), degraded -> enc(HQ)); writes the run and OUT/upscaler."""
    from ..core.config import config_from_args
    from ..train.latent_upscaler import LatentUpscalerConfig, train_latent_upscaler

    cfg = config_from_args(LatentUpscalerConfig, args)
    s = train_latent_upscaler(cfg, args.pairs, args.out, latents=args.latents, hq_latents=args.hq_latents,
                              resume=args.resume, progress=not args.quiet)
    if os.environ.get("RANK", "0") != "0":  # one report per run, not per DDP process
        return 0
    print(f"train-latent-upscaler {args.out}: {s['steps_done']}/{s['steps_target']} steps, "
          f"{s['parameters'] / 1e6:.2f}M parameters, {s['train_pairs']} training pairs, "
          f"{s['steps_per_s_this_run'] or 0:.2f} steps/s this run; model: {s['upscaler']}")
    for key, value in s.get("held_out", {}).items():
        print(f"held-out {key}: {value:.4f}")
    return 0


def cmd_evaluate_latent_upscaler(args: argparse.Namespace) -> int:
    """Compare latent upscalers with latent nearest/bilinear/bicubic, decode-bicubic-encode and enc(HQ)."""
    from ..core.config import config_from_args
    from .latent_upscale import LatentEvalConfig, markdown_table, run_latent_evaluation, verdict_lines

    cfg = config_from_args(LatentEvalConfig, args)
    out = Path(args.out)
    doc = run_latent_evaluation(args.model, args.pairs, out, preset_name=args.preset, cfg=cfg, latents=args.latents,
                                hq_latents=args.hq_latents, taef2_dir=args.taef2_dir, progress=not args.quiet)
    print(markdown_table(doc["rows"]) + verdict_lines(doc["verdicts"]), end="")
    print(f"wrote {out / 'eval.json'}, eval.md, crops.png")
    return 0


def cmd_upscale_latents(args: argparse.Namespace) -> int:
    """Upscale latent files 2x with a latent upscaler; write <stem>_2x.safetensors."""
    from .latent_upscale import upscale_latent_files

    written = upscale_latent_files(args.inputs, args.model, args.out, preset_name=args.preset,
                                   raw=args.latents == "raw", overwrite=args.overwrite, taef2_dir=args.taef2_dir)
    for path in written:
        print(path)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a 2x decoder (run or export) against decoder+bicubic / +Lanczos per sigma on held-out pairs."""
    from ..core.config import config_from_args
    from .evaluate import EvalConfig, markdown_table, run_evaluation

    cfg = config_from_args(EvalConfig, args)
    if args.val_fraction is not None and not 0 <= args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.split_seed is not None and args.split_seed < 0:
        raise ValueError(f"--split-seed must be >= 0, got {args.split_seed}")
    out = Path(args.out) if args.out else Path(args.model) / "eval"
    vae, vae_config = args.vae, args.vae_config
    if vae is None:  # a run trained on a local VAE evaluates against that VAE
        from .upscale import describe_model

        desc = describe_model(args.model, args.taef2_dir)
        if desc["preset"] == args.preset:
            vae, vae_config = desc["vae"], vae_config or desc["vae_config"]
    doc = run_evaluation(args.model, args.pairs, out, preset_name=args.preset, cfg=cfg, baseline_model=args.no_degrade_model,
                         latents=args.latents, taef2_dir=args.taef2_dir, val_fraction=args.val_fraction,
                         split_seed=args.split_seed, vae=vae, vae_config=vae_config)
    print(markdown_table(doc["rows"]))
    print(f"verdict: {doc['verdict']['summary']}; wrote {out / 'eval.json'}, eval.md, eval.png")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    """The recipe's experiment: decoders differing only in the degrader, evaluated on held-out photos."""
    from ..core.config import config_from_args
    from .experiment import ExperimentConfig, run_experiment

    state = run_experiment(args.out, config_from_args(ExperimentConfig, args))
    if state.get("waiting_for"):  # another process trains the rest and writes the results
        return 0
    print(f"wrote {args.out}/results.md, results.json, curves.png, metrics.png, crops.png")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a run's EMA decoder as a 2x decoder folder (diffusers for wan, TAESD files for tae) + README."""
    from .export import export_run

    formats = [f.strip() for item in args.format or [] for f in item.split(",") if f.strip()] or None
    out = export_run(args.run, args.out, ema=not args.live, formats=formats)
    info = json.loads((out / "ldlib_export.json").read_text())
    print(f"exported {args.run} -> {out}: {', '.join(info['formats'])} ({', '.join(info['files'])}; see README.md)")
    for fmt, why in info.get("skipped_formats", {}).items():
        print(f"note: format {fmt!r} skipped: {why}", file=sys.stderr)
    return 0


def cmd_upscale(args: argparse.Namespace) -> int:
    """Decode images / latent files at 2x (or a clean 1x) with a trained decoder; one line per failed input."""
    import resource
    import time

    from ..core.files import writable_folder
    from ..core.images import ImageLoadError
    from .upscale import UpscaleConfig, clashing_inputs, default_upscaler, load_upscaler, upscale_file

    cfg = UpscaleConfig(scale=args.scale, tile=args.tile, overlap=args.overlap, latents=args.latents,
                        compare=args.compare, overwrite=args.overwrite, progress=not args.quiet)
    clashes = clashing_inputs(args.inputs)
    if clashes:
        raise ValueError("inputs whose outputs would overwrite each other (same file name stem): "
                         + "; ".join(" and ".join(names) for names in clashes) + "; upscale them into separate --out folders")
    out = writable_folder(args.out)  # one clear line now, not one per input later
    if args.model is None:
        args.model = default_upscaler(args.preset or "taef2")
    codec, original, preset = load_upscaler(args.model, args.preset, taef2_dir=args.taef2_dir, vae=args.vae,
                                            vae_config=args.vae_config)
    failed = 0
    written_by: dict[Path, str] = {}  # outputs of this run: a later input that would overwrite one fails instead
    for item in args.inputs:
        t0 = time.perf_counter()
        try:
            written = upscale_file(item, codec, original, out, cfg, claimed=written_by)
        except (ImageLoadError, ValueError, FileNotFoundError, OSError) as e:
            # A bad input costs only itself: say why in one line, go on with the rest.
            print(f"error: {e}" if str(item) in str(e) else f"error: {item}: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{item} -> {', '.join(str(p) for p in written)} ({time.perf_counter() - t0:.1f} s)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"upscale: {len(args.inputs) - failed} of {len(args.inputs)} inputs done with {args.model} "
          f"(preset {preset.name}, tile {cfg.tile}, overlap {cfg.overlap}); peak memory {peak:.0f} MiB")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every command."""
    from ..core.config import add_config_arguments, comma_tuple, finite_float
    from ..data.pairs import PairSpec
    from ..data.teacher_data import TeacherSpec
    from ..train.decoder import TrainConfig
    from ..train.proxy import ProxyTrainConfig
    from ..train.teacher import TeacherConfig
    from ..train.latent_upscaler import LatentUpscalerConfig
    from .analysis import SweepConfig
    from .evaluate import EvalConfig
    from .experiment import ExperimentConfig
    from .latent_upscale import LatentEvalConfig

    # allow_abbrev=False everywhere: an old or mistyped flag (--crop) must not silently mean another (--crops-per-image).
    parser = argparse.ArgumentParser(
        prog="python -m ldlib", allow_abbrev=False,
        description="Build pairs, tune and train degraders, train and export a 2x VAE decoder.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("codec-check", allow_abbrev=False, help="encode+decode an image with a preset's VAE and report PSNR")
    p.add_argument("image", help="an image file")
    _add_preset(p)
    _add_vae(p)
    p.add_argument("--size", type=int, default=0, help="centre crop size in px (default: largest multiple of 8)")
    p.add_argument("--downsample", type=int, default=1, help="area-downsample the crop by this factor first")
    p.add_argument("--out", default=None, help="write input | reconstruction side by side here")
    p.set_defaults(func=cmd_codec_check)

    p = sub.add_parser("demo", allow_abbrev=False, help="the whole recipe on the shipped photos (CPU, minutes); opens with OUT/index.html")
    p.add_argument("--out", default=None, help="output folder (default: runs/demo, or runs/demo-PRESET)")
    _add_preset(p)
    p.add_argument("--steps", type=int, default=None, help="decoder training steps (default: 200 at taef2, 12 at tiny)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("build-pairs", allow_abbrev=False, help="cut (HQ, LQ) pairs from a folder of photos (the recipe), resumable")
    p.add_argument("src", help="folder of source photos (searched recursively)")
    p.add_argument("out", help="pair set folder (hq/, lq/, manifest.jsonl, report.json)")
    _add_preset(p)
    add_config_arguments(p, PairSpec, title="pair spec (defaults: the recipe at the preset's sizes)",
                         preset_sized=("pre_downsample", "hq_size", "lq_factor"))
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    p.add_argument("--shard", default=None, help="i/N: build only this machine's share of SRC into the same OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_build_pairs)

    p = sub.add_parser("encode", allow_abbrev=False, help="encode a pair set's LQ images into a latent cache (safetensors)")
    p.add_argument("pairs", help="pair set folder (from build-pairs)")
    _add_preset(p)
    _add_vae(p)
    p.add_argument("--out", default=None, help="cache folder (default: PAIRS/latents/<preset>; HQ: PAIRS/latents_hq/<preset>)")
    p.add_argument("--image", default="lq", choices=["lq", "hq"],
                   help="which image of each pair: lq (the decoders' inputs) | hq (a latent upscaler's targets); a "
                        "cache holds one of them only (default: %(default)s)")
    _add_batch_job(p, batch_size=16, shard_size=512, unit="pairs")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("teacher", allow_abbrev=False, help="diffusion-degrade cached latents: training targets for the proxy")
    p.add_argument("pairs", help="pair set folder (with latents from `encode`)")
    p.add_argument("out", help="teacher data folder")
    _add_preset(p)
    _add_vae(p)
    p.add_argument("--latents", default=None, help="latent cache (default: PAIRS/latents/<preset>)")
    add_config_arguments(p, TeacherSpec, title="teacher data")
    _add_batch_job(p, batch_size=8, shard_size=256, unit="records")
    p.set_defaults(func=cmd_teacher)

    p = sub.add_parser("sweep", allow_abbrev=False, help="sigma sweep of a degrader: latent error, HF share, PSNR/LPIPS per sigma")
    _add_preset(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pairs", default=None, help="an existing pair set (default: build one under --out)")
    src.add_argument("--photos", default=None, help="build pairs from this photo folder (default: sample photos)")
    p.add_argument("--degrader", default="noise",
                   help=f"{vocabulary(live=True, degrading=True)} (default: %(default)s)")
    p.add_argument("--n", type=int, default=8, help="number of pairs (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1, help="teacher Euler steps (diffusion only; default: %(default)s)")
    p.add_argument("--prompt", default="negative", help="teacher prompt: negative | empty | TEXT (default: %(default)s; "
                   "not for a trained teacher such as taef2's, which has one fixed prompt embedding)")
    add_config_arguments(p, SweepConfig, title="sweep")
    p.add_argument("--out", default="runs/sweep")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("train-proxy", allow_abbrev=False, help="train the cheap proxy of the diffusion degrader on teacher data")
    p.add_argument("teacher", help="teacher data folder (from `teacher`)")
    p.add_argument("out", help="run folder: proxy.safetensors + proxy.json, eval.json, checkpoints, tb/")
    p.add_argument("--preset", default=None, choices=PRESETS, metavar="PRESET",
                   help="check that the teacher data was made with this preset")
    p.add_argument("--latents", default=None, help="latent cache (default: the one the teacher data was made from)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from its latest checkpoint")
    add_config_arguments(p, ProxyTrainConfig, title="training (ProxyTrainConfig)")
    p.set_defaults(func=cmd_train_proxy)

    p = sub.add_parser("train-teacher", allow_abbrev=False, help="train a small flow-matching teacher in the preset's latent space (taef2)")
    p.add_argument("pairs", help="pair set folder (latents from `encode`)")
    p.add_argument("out", help="run folder; the trained teacher goes to OUT/teacher")
    p.add_argument("--latents", default=None, help="latent cache (default: PAIRS/latents/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from its latest checkpoint")
    add_config_arguments(p, TeacherConfig, title="teacher (TeacherConfig)")
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("train-decoder", allow_abbrev=False, help="train the 2x decoder (accelerate: CPU, GPU bf16, `accelerate launch` DDP)")
    p.add_argument("pairs", help="pair set folder (from build-pairs; latents from `encode`)")
    p.add_argument("out", help="run folder: config.json, checkpoints/, tb/, history.jsonl, summary.json")
    p.add_argument("--latents", default=None, help="latent cache (default: PAIRS/latents/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from its latest checkpoint")
    add_config_arguments(p, TrainConfig, title="training (TrainConfig, LossConfig)")
    p.set_defaults(func=cmd_train_decoder)

    p = sub.add_parser("evaluate", allow_abbrev=False, help="PSNR/SSIM/LPIPS/speckle per sigma vs decoder+bicubic/+Lanczos, held-out pairs")
    p.add_argument("model", help="a train-decoder run folder (EMA weights) or an exported decoder folder")
    p.add_argument("pairs", help="pair set folder (its held-out split by source photo, or all of it: --split)")
    _add_preset(p)
    _add_vae(p)
    p.add_argument("--no-degrade-model", default=None, help="a decoder trained without degradation (method d)")
    p.add_argument("--latents", default=None, help="latent cache (default: PAIRS/latents/<preset>)")
    p.add_argument("--out", default=None, help="report folder (default: MODEL/eval)")
    p.add_argument("--val-fraction", type=finite_float("--val-fraction"), default=None,
                   help="held-out share of the source photos (default: what the run or export recorded)")
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the held-out split (default: what the run or export recorded)")
    add_config_arguments(p, EvalConfig, skip=("extra",), title="evaluation (EvalConfig)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("experiment", allow_abbrev=False, help="does the recipe work: clean / noise / proxy / teacher-trained decoders "
                                          "(+ GAN) on held-out photos (resumable, ~2 h on CPU)")
    p.add_argument("out", help="experiment folder (rerun the same command to resume)")
    add_config_arguments(p, ExperimentConfig, title="experiment (ExperimentConfig)")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("export", allow_abbrev=False, help="export a run's EMA 2x decoder (diffusers folder, original-layout Wan file, TAESD files) or a latent upscaler (float16)")
    p.add_argument("run", help="a train-decoder run folder, or a train-latent-upscaler run")
    p.add_argument("out", help="output folder (new, empty, or a previous export)")
    p.add_argument("--live", action="store_true", help="export the live weights instead of the EMA")
    p.add_argument("--format", action="append", default=None,
                   help="diffusers | wan | tae | tae-decoder (float16, no encoder: only when asked) | latent-upscaler (a latent upscaler run's only one), repeatable or comma-separated (default: all that apply to the run)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("upscale", allow_abbrev=False, help="decode images or latent files at 2x with a trained decoder (tiled), PNG out")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="images, or latent files (.safetensors / .pt)")
    p.add_argument("--model", default=None, help="a train-decoder run folder (EMA weights) or an exported decoder "
                                                 "(default: the 2x decoder shipped for --preset: taef2's)")
    p.add_argument("--preset", default=None, choices=PRESETS, metavar="PRESET",
                   help=f"the VAE the latents belong to: {PRESET_HELP} (default: the model's preset; taef2 "
                        "without --model)")
    p.add_argument("--taef2-dir", default=None, help="taef2 weights folder (default: $LDLIB_TAEF2_DIR, else the shipped weights)")
    _add_vae(p)
    p.add_argument("--out", default="runs/upscale", help="output folder (default: %(default)s)")
    p.add_argument("--scale", type=int, default=2, choices=[2, 1],
                   help="2: the 2x decode; 1: it area-downsampled (a cleaner 1x decode) (default: %(default)s)")
    p.add_argument("--tile", type=int, default=64, help="tile side in latent pixels, 0: one piece (default: %(default)s)")
    p.add_argument("--overlap", type=int, default=16, help="tile overlap in latent pixels (default: %(default)s)")
    p.add_argument("--latents", default="normalised", choices=["normalised", "raw"],
                   help="latent files hold the diffusion model's normalised latents or raw VAE latents")
    p.add_argument("--compare", action="store_true", help="also write [decoder + bicubic | ours] side by side")
    p.add_argument("--overwrite", action="store_true", help="replace output files of the same name in --out "
                                                            "(default: refuse, naming the file)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (shown for inputs of more than one tile)")
    p.set_defaults(func=cmd_upscale)

    p = sub.add_parser("train-latent-upscaler", allow_abbrev=False,
                       help="train a latent 2x upscaler (hires fix in latent space) on a pair set's LQ and HQ latents")
    p.add_argument("pairs", help="pair set folder (LQ latents from `encode`; HQ latents are encoded when missing)")
    p.add_argument("out", help="run folder; the model goes to OUT/upscaler (safetensors + config.json)")
    p.add_argument("--latents", default=None, help="LQ latent cache (default: PAIRS/latents/<preset>)")
    p.add_argument("--hq-latents", default=None, help="HQ latent cache (default: PAIRS/latents_hq/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from its latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_arguments(p, LatentUpscalerConfig, title="latent upscaler (LatentUpscalerConfig)")
    p.set_defaults(func=cmd_train_latent_upscaler)

    p = sub.add_parser("evaluate-latent-upscaler", allow_abbrev=False,
                       help="latent upscalers vs latent nearest/bilinear/bicubic, decode-bicubic-encode and enc(HQ)")
    p.add_argument("pairs", help="pair set folder (a separate test set, or --split held-out of the training set)")
    p.add_argument("--model", action="append", default=None,
                   help="latent upscaler folder or its train-latent-upscaler run (default: the one shipped for "
                        "--preset); repeat it to compare several on the same pairs and draws (NAME=PATH names one; else its folder)")
    _add_preset(p)
    p.add_argument("--latents", default=None, help="LQ latent cache (default: PAIRS/latents/<preset>)")
    p.add_argument("--hq-latents", default=None, help="HQ latent cache (default: PAIRS/latents_hq/<preset>, encoded "
                                                      "when missing)")
    p.add_argument("--out", default="runs/latent_upscaler_eval", help="report folder (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_arguments(p, LatentEvalConfig, title="evaluation (LatentEvalConfig)")
    p.set_defaults(func=cmd_evaluate_latent_upscaler)

    p = sub.add_parser("upscale-latents", allow_abbrev=False,
                       help="upscale latent files 2x with a latent upscaler (<stem>_2x.safetensors)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="latent files (.safetensors / .pt: C x h x w or N x C x h x w)")
    p.add_argument("--model", default=None, help="latent upscaler folder or its run (default: the one shipped for --preset)")
    _add_preset(p)
    p.add_argument("--out", default="runs/upscale_latents", help="output folder (default: %(default)s)")
    p.add_argument("--latents", default="normalised", choices=["normalised", "raw"],
                   help="the files hold the diffusion model's normalised latents or raw VAE latents (output: the same)")
    p.add_argument("--overwrite", action="store_true", help="replace output files of the same name")
    p.set_defaults(func=cmd_upscale_latents)

    p = sub.add_parser("bench", allow_abbrev=False, help="benchmarks (ratios measured in one run), written under runs/bench/")
    p.add_argument("which", nargs="?", default="all", help="pairs | codec | degrade | train | train-wan | all")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes (smoke run)")
    _add_preset(p)
    train = p.add_argument_group("bench train")
    train.add_argument("--batches", type=comma_tuple((int, ...), "--batches"), default=None,
                       help="batch sizes, comma-separated (default: 2,4 on CPU, 1,4,8 on CUDA)")
    train.add_argument("--rounds", type=int, default=None, help="rounds of interleaved variants (default: 3)")
    train.add_argument("--variants", type=comma_tuple((str, ...), "--variants"), default=None,
                       help="comma-separated names of the variants to keep (default: all; names as in the table)")
    train.add_argument("--vae", default=None, help="local VAE folder replacing the preset's (random full-size weights "
                                                   "time the same: see README, Benchmarks)")
    p.set_defaults(func=cmd_bench)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m ldlib` and the `ldlib` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from ..core.files import FolderBusyError

    try:
        return int(args.func(args) or 0)
    except (OSError, ValueError, FolderBusyError) as e:
        # Bad input, a folder we cannot write, a busy folder: one clear line naming it, not a traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
