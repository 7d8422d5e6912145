"""The one place that turns names and strings into objects: a preset's codec, teacher and text encoder, prompt
embeddings, a degrader from its spec (the degrader vocabulary), a pair set for a preset, a run's 2x decoder, a
latent upscaler for a preset.

Rule: imports core, presets, models, data and degrade; train and apps get their objects from here, and nothing
below knows a preset or a degrader by name.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .core.runs import CheckpointManager, load_safetensors
from .data.datasets import PairDataset
from .data.latents import _describe, default_cache_dir, encode_pairs, same_codec
from .data.pairs import PairSpec, build_pairs
from .degrade import CachedTeacher, DiffusionDegrader, NoiseDegrader, ProxyDegrader
from .models.codecs import Codec, TAECodec, WanCodec, load_codec
from .models.decoder import TwoXDecoder, check_finite_weights
from .models.latent_upscaler import (CONFIG as UPSCALER_CONFIG, WEIGHTS as UPSCALER_WEIGHTS, LatentUpscaler,
                                     load_latent_upscaler as load_upscaler_folder, read_latent_upscaler_info)
from .models.prompts import PromptCache, encode_prompt, prompt_cache_dir, resolve_prompt
from .models.proxy import load_proxy
from .models.teacher import is_teacher_folder, load_prompt_embeds, load_teacher, read_teacher_info
from .models.tiny import ByteTokenizer, tiny_umt5_encoder, tiny_wan_transformer, tiny_wan_vae
from .presets import Preset, get_preset, vae_overrides


# ------------------------------------------------------------------------------------------------------------
# a preset's models
# ------------------------------------------------------------------------------------------------------------


def codec_of(preset: Preset, device: str | torch.device | None = None) -> Codec:
    """A preset's frozen VAE as a codec, in eval mode, on device (CPU by default)."""
    if preset.vae == "tiny":
        codec: Codec = WanCodec(tiny_wan_vae(preset.seed), source="tiny")
    else:
        codec = load_codec(preset.family, preset.vae, subfolder=preset.vae_subfolder, vae_config=preset.vae_config)
    return codec.eval().to(device or "cpu")


def has_trained_teacher(preset: Preset) -> bool:
    """Whether the teacher is a folder made by train-teacher (taef2, or any such folder): fixed prompt embedding."""
    return preset.transformer is not None and (preset.family == "tae" or is_teacher_folder(preset.transformer))


def transformer_of(preset: Preset, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
    """A preset's diffusion transformer (the teacher), or a clear error when the preset has none."""
    if preset.transformer is None:
        raise ValueError(f"preset {preset.name!r} has no diffusion transformer (no teacher exists for it offline)")
    from diffusers import WanTransformer3DModel

    if has_trained_teacher(preset):
        model = load_teacher(preset.transformer, device, dtype)[0]
    elif preset.transformer == "tiny":
        model = tiny_wan_transformer(preset.seed)
        model = model.to(dtype=dtype) if dtype != torch.float32 else model
    else:  # torch_dtype here (not .to) keeps the modules diffusers wants in float32
        model = WanTransformer3DModel.from_pretrained(
            preset.transformer, subfolder=preset.transformer_subfolder, torch_dtype=dtype
        )
    return model.eval().to(device or "cpu")


def fixed_prompt_embeds(preset: Preset) -> torch.Tensor | None:
    """The 1 x L x D prompt embedding a trained teacher runs with (None: the prompt is text-encoded)."""
    if not has_trained_teacher(preset):
        return None
    read_teacher_info(preset.transformer)  # a clear error (how to train one) when the folder is not a teacher
    return load_prompt_embeds(preset.transformer)


def text_encoder_of(preset: Preset, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
    """A preset's pipeline tokenizer and UMT5 text encoder (tiny: a byte tokenizer and a seeded tiny UMT5)."""
    if preset.transformer is None:
        raise ValueError(f"preset {preset.name!r} has no diffusion transformer, hence no text encoder")
    if preset.transformer == "tiny":
        tokenizer, model = ByteTokenizer(), tiny_umt5_encoder(preset.seed)
    else:
        # Wan-AI/*-Diffusers keep the tokenizer and the UMT5-XXL encoder beside the transformer.
        from transformers import AutoTokenizer, UMT5EncoderModel

        tokenizer = AutoTokenizer.from_pretrained(preset.transformer, subfolder="tokenizer")
        model = UMT5EncoderModel.from_pretrained(preset.transformer, subfolder="text_encoder", dtype=dtype)
    return tokenizer, model.eval().to(device=device or "cpu", dtype=dtype)


def prompt_embedding(
    preset: Preset,
    prompt: str = "negative",
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    max_sequence_length: int = 512,
) -> torch.Tensor:
    """The preset's 1 x L x D embedding of a prompt ("empty", "negative" or text), from the cache when present.

    A trained teacher (the taef2 preset's) has one fixed embedding in its folder: prompt does not apply to it.
    """
    fixed = fixed_prompt_embeds(preset)
    if fixed is not None:
        return fixed
    text = resolve_prompt(prompt)

    def encode(p: str) -> torch.Tensor:
        # Loaded here, on a cache miss only: UMT5-XXL is ~11 GB in bf16.
        dtype = torch.bfloat16 if str(device or "cpu").startswith("cuda") else torch.float32
        tokenizer, text_encoder = text_encoder_of(preset, device=device, dtype=dtype)
        try:
            return encode_prompt(p, tokenizer, text_encoder, max_sequence_length)
        finally:
            del text_encoder

    cache = PromptCache(cache_dir if cache_dir is not None else prompt_cache_dir())
    return cache.get(preset.text_encoder_id, text, encode, max_sequence_length)


def check_teacher_codec(info: dict, identity: dict, folder: str | os.PathLike) -> None:
    """Refuse a teacher trained in another latent space than the codec/latents it is used with."""
    have = info.get("codec", {})
    if not same_codec(have, identity):
        raise ValueError(
            f"{folder}: this teacher was trained in the latent space of {_describe(have)}, but the codec/latents it "
            f"is used with are {_describe(identity)}; a teacher only works in its own latent space "
            f"(train one for this codec with `python -m ldlib train-teacher`)"
        )


# ------------------------------------------------------------------------------------------------------------
# degraders: the vocabulary
# ------------------------------------------------------------------------------------------------------------


def diffusion_degrader(
    preset: Preset,
    steps: int = 1,
    prompt: str = "negative",
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    guidance_scale: float | None = None,
    batch_size: int | None = None,
) -> DiffusionDegrader:
    """A preset's teacher: its transformer (bf16 on CUDA) and the cached embedding of prompt ("negative"/"empty")."""
    dtype = torch.bfloat16 if str(device or "cpu").startswith("cuda") else torch.float32
    if has_trained_teacher(preset):  # refuse a teacher of another latent space than the preset's codec
        if guidance_scale not in (None, 1.0):  # one fixed embedding: the "unconditional" one would be the same
            raise ValueError(f"guidance_scale {guidance_scale}: the {preset.name} teacher was trained on one fixed "
                             "prompt embedding, so classifier-free guidance has nothing to contrast; leave it unset")
        check_teacher_codec(read_teacher_info(preset.transformer), codec_of(preset).identity(), preset.transformer)
    transformer = transformer_of(preset, device=device, dtype=dtype)
    emb = prompt_embedding(preset, prompt, cache_dir=cache_dir, device=device)
    neg = prompt_embedding(preset, "empty", cache_dir=cache_dir, device=device) if guidance_scale else None
    return DiffusionDegrader(transformer, emb, steps=steps, guidance_scale=guidance_scale, negative_embeds=neg,
                             batch_size=batch_size)


@dataclass(frozen=True)
class DegraderKind:
    """One word of the degrader vocabulary: how to build it, and what it needs."""

    make: Callable[..., object]  # make(folder or None, **options) -> a degrader (None for "none")
    help: str
    made_by: str | None = None  # what writes its folder (``kind:DIR``); None: the kind takes no folder
    by_pair_id: bool = False  # serves stored outputs per pair id (training on a pair set only)


def _diffusion(folder, preset=None, steps=1, prompt="negative", device=None, **_):
    if preset is None:
        raise ValueError("the diffusion degrader needs a preset (its teacher)")
    return diffusion_degrader(preset, steps=steps, prompt=prompt, device=device)


# The vocabulary: every --degrader help and parse_degrader read this table; adding a degrader is one entry here
# (and its class in ldlib.degrade).
DEGRADERS: dict[str, DegraderKind] = {
    "none": DegraderKind(lambda folder, **_: None, "no degradation (sigma 0)"),
    "noise": DegraderKind(lambda folder, **_: NoiseDegrader(), "noising alone: the baseline"),
    "diffusion": DegraderKind(_diffusion, "the preset's diffusion teacher, live (noise, then Euler steps to 0)"),
    "proxy": DegraderKind(lambda folder, device=None, **_: ProxyDegrader(load_proxy(folder, device)),
                          "a trained proxy of the teacher", made_by="train-proxy (notebook 03)"),
    "teacher": DegraderKind(lambda folder, codec=None, sigma_max=0.12, sigma_min=0.0, **_:
                            CachedTeacher(folder, sigma_max, codec, sigma_min=sigma_min),
                            "cached teacher outputs, picked per pair id", made_by="`python -m ldlib teacher`",
                            by_pair_id=True),
}


def vocabulary(live: bool = False, degrading: bool = False) -> str:
    """The degrader names as a help string (``none | noise | ... | proxy:DIR``).

    ``live``: only those that degrade any latents (no per-pair-id cache: evaluation, sweeps); ``degrading``: not
    ``none``.
    """
    return " | ".join(name + (":DIR" if kind.made_by else "") for name, kind in DEGRADERS.items()
                      if not (live and kind.by_pair_id) and not (degrading and name == "none"))


VOCABULARY = vocabulary()


def parse_degrader(spec: str | None, preset=None, codec=None, sigma_max: float = 0.12, steps: int = 1,
                   prompt: str = "negative", device: str | torch.device | None = None, sigma_min: float = 0.0):
    """A degrader from its name (``DEGRADERS``); None for ``none``.

    ``preset``: needed by ``diffusion`` (its teacher); ``codec``: checks that cached teacher data matches its
    latents; ``sigma_min`` / ``sigma_max``: the range of cached-teacher sigmas used; ``steps`` / ``prompt``: the
    live teacher's.
    """
    spec = (spec or "none").strip()
    name, _, arg = spec.partition(":")
    kind = DEGRADERS.get(name)
    if kind is None or (arg and not kind.made_by):
        raise ValueError(f"unknown degrader {spec!r}; choose {VOCABULARY}")
    folder = None
    if kind.made_by:
        if not arg:
            raise ValueError(f"degrader {name!r} needs its folder: {name}:DIR")
        folder = Path(arg)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: {name} folder not found (made by {kind.made_by})")
    return kind.make(folder, preset=preset, codec=codec, sigma_max=sigma_max, sigma_min=sigma_min, steps=steps,
                     prompt=prompt, device=device)


def run_degrader(degrader, cfg, preset, codec, device: str | torch.device | None = None) -> tuple[object | None, str]:
    """A training run's degrader on its device and the name its summary records.

    ``degrader``: a ``ldlib.degrade`` degrader, None for none, or "config" to parse ``cfg.degrader`` (with the run's
    ``sigma_min`` / ``sigma_max``).
    """
    if isinstance(degrader, str) and degrader == "config":
        degrader, name = parse_degrader(cfg.degrader, preset, codec, sigma_min=cfg.sigma_min,
                                        sigma_max=cfg.sigma_max, device=device), cfg.degrader
    else:
        name = type(degrader).__name__
    if degrader is None:
        return None, "none"
    return degrader.to(device), name  # it runs where the latents are


# ------------------------------------------------------------------------------------------------------------
# pair sets and runs
# ------------------------------------------------------------------------------------------------------------


def prepare_pairs(photos: str | os.PathLike, out: str | os.PathLike, preset, crops_per_image: int = 1, seed: int = 0,
                  workers: int = 1, device: str | None = "cpu", **spec) -> PairDataset:
    """Build (or resume) a pair set from photos at the preset's sizes and encode its latents; the dataset over both.

    ``spec`` overrides PairSpec fields (e.g. ``hq_size``). Both steps only do what is missing, so calling this again
    costs a manifest read.
    """
    report = build_pairs(photos, out, PairSpec.from_preset(preset, crops_per_image=crops_per_image, seed=seed, **spec),
                         workers=workers, progress=False)
    if report["pairs_total"] == 0:
        raise ValueError(f"no pair could be cut from {photos} (see {Path(out) / 'report.json'})")
    cache = default_cache_dir(out, preset.name)
    encode_pairs(out, codec_of(preset), cache, progress=False, device=device)
    return PairDataset(out, latents=cache)


def read_run_config(run: str | os.PathLike) -> dict:
    """The config.json of a training run folder (the TrainConfig as a dict)."""
    path = Path(run) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: not a training run (no config.json)")
    return json.loads(path.read_text())


def run_checkpoint(run: str | os.PathLike, ema: bool = True) -> Path:
    """The newest checkpoint of a run whose (EMA or live) decoder weights read back whole."""
    found = CheckpointManager(Path(run) / "checkpoints").load_intact(
        ["ema" if ema else "decoder"], restore_rng=False, with_objects=False,
        warn=lambda msg: print(msg, file=sys.stderr))
    if found is None:
        raise FileNotFoundError(f"{run}: no checkpoint yet (the run stopped before its first checkpoint_every steps)")
    return found[0]


def load_run_codec(run: str | os.PathLike, ema: bool = True, checkpoint: str | os.PathLike | None = None):
    """The trained 2x codec of a run folder (EMA weights by default) and the run's config (a dict)."""
    run = Path(run)
    cfg = read_run_config(run)
    path = Path(checkpoint) if checkpoint else run_checkpoint(run, ema)
    codec = codec_of(get_preset(cfg["preset"], taef2_path=cfg.get("taef2_dir"), **vae_overrides(cfg)))
    model = TwoXDecoder(codec.to_2x())
    model.load_trainable_state(load_safetensors(path / ("ema.safetensors" if ema else "decoder.safetensors")), str(path))
    return model.codec.requires_grad_(False).eval(), cfg


def run_split(cfg: dict) -> tuple[float | None, int | None]:
    """(val_fraction, split seed) of the held-out split a run's config trained with (TrainConfig.held_out_seed)."""
    seed = cfg.get("split_seed") if cfg.get("split_seed") is not None else cfg.get("seed")
    return cfg.get("val_fraction"), seed


def is_run(path: Path) -> bool:
    """A train-decoder run folder: checkpoints/, or the config.json of a run stopped before its first checkpoint."""
    if (path / "checkpoints").is_dir():
        return True
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "preset" in cfg and "loss" in cfg and "_class_name" not in cfg


def export_family(path: Path) -> str | None:
    """The codec family of an exported decoder folder (ldlib_export.json, else config.json), None when unknown.

    ldlib's record comes first: a Qwen-Image 2x decoder is saved as an AutoencoderKLWan folder.
    """
    try:
        family = json.loads((path / "ldlib_export.json").read_text()).get("family")
        if family:
            return family
    except (OSError, ValueError, AttributeError):
        pass
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    names = {"AutoencoderKLWan": "wan", "AutoencoderKL": "kl", "AutoencoderKLQwenImage": "qwenimage",
             "AutoencoderKLFlux2": "flux2"}
    return names.get(cfg.get("_class_name"), cfg.get("family")) if isinstance(cfg, dict) else None


def load_decoder(model: str | os.PathLike, preset) -> tuple[object, dict]:
    """A 2x codec from a training run folder (EMA weights) or an exported folder, and what was loaded."""
    path = Path(model)
    if is_run(path):
        codec, cfg = load_run_codec(path)
        val_fraction, seed = run_split(cfg)
        return codec, {"model": str(path), "kind": "run", "val_fraction": val_fraction, "seed": seed,
                       "made_with_preset": cfg.get("preset")}
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: neither a training run (config.json, checkpoints/) nor an exported "
                                "decoder folder (config.json and weights)")
    family = export_family(path) or preset.family
    record = json.loads((path / "ldlib_export.json").read_text()) if (path / "ldlib_export.json").is_file() else {}
    made_with = record.get("preset")
    if family != preset.family:
        raise ValueError(f"{path}: a {family} decoder{f' (preset {made_with!r})' if made_with else ''}, but "
                         f"--preset {preset.name!r} is a {preset.family} VAE: its latents do not fit this decoder")
    # A TAE decoder may come alone (the shipped one): its encoder is then the preset's own, checked below.
    codec = TAECodec.from_folder(path, encoder_folder=preset.vae) if family == "tae" else load_codec(family, path)
    check_finite_weights(codec.named_parameters(), str(path))
    trained_on = record.get("encoder_sha256")
    if trained_on and codec.identity()["encoder_sha256"] != trained_on:
        raise ValueError(f"{path}: this decoder was trained on the latents of another encoder than the one it is "
                         f"loaded with ({preset.vae}); use that VAE's weights (--taef2-dir / --vae)")
    if codec.upscale != 2:
        raise ValueError(f"{path}: decoder outputs {codec.upscale}x, expected a 2x decoder")
    # The run's held-out split (exports made before ldlib recorded it, or not by ldlib, have none: None).
    return codec.eval(), {"model": str(path), "kind": "export", "val_fraction": record.get("val_fraction"),
                          "seed": record.get("split_seed"), "made_with_preset": made_with}


# ------------------------------------------------------------------------------------------------------------
# latent upscalers
# ------------------------------------------------------------------------------------------------------------


UPSCALER_SUBDIR = "upscaler"  # where train-latent-upscaler writes the model inside its run folder


def latent_upscaler_folder(model: str | os.PathLike) -> Path:
    """The model folder of a latent upscaler given as itself or as the train-latent-upscaler run that made it."""
    path = Path(model)
    if not (path / UPSCALER_WEIGHTS).is_file() and (path / UPSCALER_SUBDIR / UPSCALER_WEIGHTS).is_file():
        return path / UPSCALER_SUBDIR
    return path


def is_latent_upscaler_run(run: str | os.PathLike) -> bool:
    """Whether a folder is a train-latent-upscaler run (or a latent upscaler folder) rather than a decoder run."""
    folder = latent_upscaler_folder(run)
    return (folder / UPSCALER_CONFIG).is_file() and (folder / UPSCALER_WEIGHTS).is_file()


def load_latent_upscaler(model: str | os.PathLike, preset: Preset, codec: Codec | None = None,
                         device: str | torch.device | None = None) -> tuple[LatentUpscaler, dict]:
    """A trained latent upscaler (its folder, or a run folder holding it) for the preset's latents, and its config.

    One that was trained in another latent space (another preset's VAE) is refused in one line naming its
    config.json and both presets, before any weight is read.
    """
    folder = latent_upscaler_folder(model)
    info = read_latent_upscaler_info(folder)
    identity = (codec if codec is not None else codec_of(preset)).identity()
    have = info.get("codec") or {}
    if not same_codec(have, identity):
        made = info.get("preset", "unknown")
        raise ValueError(
            f"{folder / UPSCALER_CONFIG}: a latent upscaler for preset {made!r} ({_describe(have)}), not for "
            f"--preset {preset.name!r} ({_describe(identity)}); it only works in the latent space it was trained "
            f"in: pass --preset {made} or a latent upscaler trained for {preset.name}")
    return load_upscaler_folder(folder, device)
