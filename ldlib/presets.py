"""The preset registry: name -> frozen record (which VAE, which teacher transformer, which sizes), pure data.

One switch from CI-size to real models. ``PRESETS`` drives every ``--preset`` choice and help; adding a preset is one
entry in ``_TABLE``. Turning a preset into models (its codec, teacher, text encoder) is ``ldlib.build``'s job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from .core.samples import ASSETS_DIR


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
TAEF2_ENV = "LDLIB_TAEF2_DIR"
TAEF2_TEACHER_ENV = "LDLIB_TAEF2_TEACHER"


@dataclass(frozen=True)
class Preset:
    """A named bundle: codec family and source, teacher transformer source, and pair sizes."""

    name: str
    family: str
    vae: str  # hub id, local folder, "tiny" (models.tiny), or "taef2" (resolved by get_preset: taef2_dir)
    vae_subfolder: str | None = None
    vae_config: str | None = None  # architecture of a single-file vae: a diffusers VAE folder or config.json
    transformer: str | None = None  # hub id, local folder, "tiny", "taef2" (taef2_teacher_dir), None: no teacher
    transformer_subfolder: str | None = None
    hq_size: int = 512  # HQ crop (px); LQ is hq_size // lq_factor
    lq_factor: int = 2
    pre_downsample: int = 2  # area downsample of the source before cropping
    spatial_factor: int = 8  # pixels per latent cell of the VAE (every preset's VAE: 8); LQ sides must be multiples
    flow_shift: float = 3.0  # the scheduler shift the model's pipelines use (recorded; the degrader uses raw sigmas)
    seed: int = 0  # seed of the random weights of "tiny" models
    decoder_2x: str | None = None  # a trained 2x decoder shipped with ldlib (a folder of ldlib/assets), None: none
    latent_upscaler: str | None = None  # a trained latent 2x upscaler shipped with ldlib (ldlib/assets), None: none
    note: str = ""

    @property
    def random_weights(self) -> bool:
        """Whether the preset's VAE is randomly initialised (results then show plumbing, not quality)."""
        return self.vae == "tiny"

    @property
    def lq_size(self) -> int:
        """Size of the LQ input (px)."""
        return self.hq_size // self.lq_factor

    @property
    def text_encoder_id(self) -> str:
        """What identifies the preset's text encoder (the key of cached prompt embeddings)."""
        if self.transformer is None:
            raise ValueError(f"preset {self.name!r} has no diffusion transformer, hence no text encoder")
        return f"tiny-umt5-seed{self.seed}" if self.transformer == "tiny" else self.transformer


def taef2_teacher_dir(path: str | os.PathLike | None = None) -> Path:
    """Folder of the taef2 teacher: the argument, else $LDLIB_TAEF2_TEACHER, else the packaged default.

    Not checked here (building pairs and encoding need no teacher); loading it gives a clear error when absent.
    """
    if path is not None:
        return Path(path)
    if os.environ.get(TAEF2_TEACHER_ENV):
        return Path(os.environ[TAEF2_TEACHER_ENV])
    return ASSETS_DIR / "teacher_taef2"


def taef2_dir(path: str | os.PathLike | None = None) -> Path:
    """Folder of the taef2 weights: the argument, else $LDLIB_TAEF2_DIR, else the weights shipped in ldlib/assets."""
    if path is not None:
        folder, origin = Path(path), "the path given"
    elif os.environ.get(TAEF2_ENV):
        folder, origin = Path(os.environ[TAEF2_ENV]), f"${TAEF2_ENV}"
    else:
        folder, origin = ASSETS_DIR / "taef2", "the weights shipped with ldlib"
    if not any(folder.glob("*encoder.safetensors")) and not any(folder.glob("*encoder.pth")):
        raise FileNotFoundError(
            f"taef2 weights not found in {folder} ({origin}); set {TAEF2_ENV} to a folder holding "
            "taef2_encoder/decoder (.safetensors or .pth)"
        )
    return folder


_TABLE: dict[str, Preset] = {p.name: p for p in (
    Preset("tiny", "wan", vae="tiny", transformer="tiny", hq_size=128,
           note="random tiny Wan VAE + transformer built from configs; runs anywhere in seconds (CI)"),
    Preset("taef2", "tae", vae="taef2", transformer="taef2", hq_size=512, flow_shift=1.0, decoder_2x="taef2_2x",
           latent_upscaler="latent_upscaler_taef2",
           note="real pretrained tiny autoencoder for the FLUX.2 latent space (32 channels) and the small "
                "flow-matching teacher ldlib trains in it (train-teacher)"),
    Preset("wan2.1-1.3b", "wan", vae="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", vae_subfolder="vae",
           transformer="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", transformer_subfolder="transformer", hq_size=512,
           note="real Wan 2.1 VAE and 1.3B transformer from the hub (needs network once)"),
    Preset("wan2.1-14b", "wan", vae="Wan-AI/Wan2.1-T2V-14B-Diffusers", vae_subfolder="vae",
           transformer="Wan-AI/Wan2.1-T2V-14B-Diffusers", transformer_subfolder="transformer", hq_size=512,
           note="real Wan 2.1 VAE and 14B transformer from the hub (needs network once, a big GPU)"),
    # Qwen-Image's VAE: the Wan 2.1 architecture, decoder fine-tuned for images; latents normalised like Wan's.
    Preset("qwen-image", "qwenimage", vae="Qwen/Qwen-Image", vae_subfolder="vae", hq_size=512,
           note="Qwen-Image VAE (AutoencoderKLQwenImage) from the hub; no teacher in ldlib (decoder training, export)"),
    Preset("flux2", "flux2", vae="black-forest-labs/FLUX.2-dev", vae_subfolder="vae", hq_size=512,
           note="FLUX.2 VAE (AutoencoderKLFlux2, 32 channels, BatchNorm-normalised latents); gated repo on the hub"),
    # FLUX.1 [schnell] (Apache-2.0) ships the same VAE as FLUX.1 [dev]: latents (z - 0.1159) * 0.3611.
    Preset("flux1", "kl", vae="black-forest-labs/FLUX.1-schnell", vae_subfolder="vae", hq_size=512,
           note="FLUX.1 VAE (AutoencoderKL, 16 channels, shift_factor/scaling_factor from its config)"),
    Preset("sdxl", "kl", vae="stabilityai/stable-diffusion-xl-base-1.0", vae_subfolder="vae", hq_size=512,
           note="SDXL VAE (AutoencoderKL, 4 channels, latents z * 0.13025); encodes in float32 (fp16 overflows)"),
)}

PRESETS = tuple(_TABLE)
PRESET_HELP = " | ".join(PRESETS)  # every --preset help lists the registry, never a copy of it


def shipped_decoder(preset: Preset) -> Path | None:
    """The folder of the preset's shipped 2x decoder (``ldlib/assets/<decoder_2x>``); None when it has none."""
    return ASSETS_DIR / preset.decoder_2x if preset.decoder_2x else None


def shipped_latent_upscaler(preset: Preset) -> Path | None:
    """The folder of the preset's shipped latent 2x upscaler (``ldlib/assets/<latent_upscaler>``); None when none."""
    return ASSETS_DIR / preset.latent_upscaler if preset.latent_upscaler else None


def vae_overrides(cfg) -> dict:
    """The ``vae`` / ``vae_config`` preset overrides a run config (dataclass or dict) carries, when set."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    return {k: get(k) for k in ("vae", "vae_config") if get(k)}


def get_preset(name: str, taef2_path: str | os.PathLike | None = None,
               taef2_teacher: str | os.PathLike | None = None, **overrides) -> Preset:
    """Look up a preset by name; keyword overrides replace fields (e.g. ``hq_size=256``).

    ``taef2_teacher``: the taef2 preset's trained teacher folder (default: see ``taef2_teacher_dir``).
    ``vae=`` a local folder or file replaces the hub VAE: a diffusers VAE folder, a pipeline folder (``vae/``
    inside), or one weights file (original Wan layout for wan / qwen-image; its architecture from ``vae_config=``
    or the family's published config).
    """
    if name not in _TABLE:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    preset = _TABLE[name]
    if preset.vae == "taef2":  # the shipped taef2 folders, or the ones the caller / environment names
        preset = replace(preset, vae=str(taef2_dir(taef2_path)), transformer=str(taef2_teacher_dir(taef2_teacher)))
    if overrides.get("vae") and "vae_subfolder" not in overrides and Path(str(overrides["vae"])).exists():
        # A local VAE replaces the hub repo: its layout is detected (VAE folder, pipeline folder, single file),
        # the hub repo's subfolder does not apply.
        overrides["vae_subfolder"] = None
    return replace(preset, **overrides) if overrides else preset
