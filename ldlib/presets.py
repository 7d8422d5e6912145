"""Named presets: which VAE, which teacher transformer, which sizes. One switch from CI-size to real models."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .models.codecs import Codec, WanCodec, load_codec
from .core.samples import ASSETS_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
TAEF2_ENV = "LDLIB_TAEF2_DIR"
TAEF2_TEACHER_ENV = "LDLIB_TAEF2_TEACHER"

# A tiny AutoencoderKLWan: the real architecture (causal 3-D convs, RMS norms, 8x spatial factor, 16 latent
# channels so real Wan latents fit), a few thousand times fewer weights.
TINY_WAN_VAE_CONFIG = dict(
    base_dim=16,
    z_dim=16,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
)

# A tiny VAE of the Wan 2.1 *architecture* (4 stages, 2 residual blocks: what the original single-file layout,
# diffusers' converter and ComfyUI assume; dim_mult [1, 2, 4, 4] fixes where the decoder's channel shortcut sits).
# Used for Wan single-file round trips and as the tiny Qwen-Image VAE; the `tiny` preset's VAE is smaller still.
TINY_WAN21_VAE_CONFIG = dict(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
)

# A tiny WanTransformer3DModel with the real block structure (patch 1x2x2, velocity output, text cross-attention).
TINY_WAN_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=64,
)

# The real Wan 2.1 T2V 1.3B transformer config (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json);
# used to build a random-weight model of the real size for timing (no download needed).
WAN21_1_3B_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=1024,
)


@dataclass(frozen=True)
class Preset:
    """A named bundle: codec family and source, teacher transformer source, and pair sizes."""

    name: str
    family: str
    vae: str  # hub id, local folder, or "tiny" (built in-process from TINY_WAN_VAE_CONFIG)
    vae_subfolder: str | None = None
    vae_config: str | None = None  # architecture of a single-file vae: a diffusers VAE folder or config.json
    transformer: str | None = None  # hub id, local folder, "tiny", or None (no diffusion teacher)
    transformer_subfolder: str | None = None
    hq_size: int = 512  # HQ crop (px); LQ is hq_size // lq_factor
    lq_factor: int = 2
    pre_downsample: int = 2  # area downsample of the source before cropping
    spatial_factor: int = 8  # pixels per latent cell of the VAE (every preset's VAE: 8); LQ sides must be multiples
    flow_shift: float = 3.0  # the scheduler shift the model's pipelines use (recorded; the degrader uses raw sigmas)
    seed: int = 0  # seed of the random weights of "tiny" models
    note: str = ""

    @property
    def random_weights(self) -> bool:
        """Whether the preset's VAE is randomly initialised (results then show plumbing, not quality)."""
        return self.vae == "tiny"

    @property
    def lq_size(self) -> int:
        """Size of the LQ input (px)."""
        return self.hq_size // self.lq_factor

    def load_codec(self, device: str | torch.device | None = None) -> Codec:
        """The preset's frozen VAE as a codec, in eval mode, on device (CPU by default)."""
        if self.vae == "tiny":
            codec: Codec = WanCodec(tiny_wan_vae(self.seed), source="tiny")
        else:
            codec = load_codec(self.family, self.vae, subfolder=self.vae_subfolder, vae_config=self.vae_config)
        return codec.eval().to(device or "cpu")

    def load_transformer(self, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        """The preset's diffusion transformer (the teacher), or a clear error when the preset has none."""
        if self.transformer is None:
            raise ValueError(f"preset {self.name!r} has no diffusion transformer (no teacher exists for it offline)")
        from diffusers import WanTransformer3DModel

        if self.trained_teacher:
            from .train.teacher import load_teacher

            model = load_teacher(self.transformer, device, dtype)[0]
        elif self.transformer == "tiny":
            model = tiny_wan_transformer(self.seed)
            model = model.to(dtype=dtype) if dtype != torch.float32 else model
        else:  # torch_dtype here (not .to) keeps the modules diffusers wants in float32
            model = WanTransformer3DModel.from_pretrained(
                self.transformer, subfolder=self.transformer_subfolder, torch_dtype=dtype
            )
        return model.eval().to(device or "cpu")

    @property
    def trained_teacher(self) -> bool:
        """Whether the teacher is a folder made by train-teacher (taef2, or any such folder): fixed prompt embedding."""
        from .train.teacher import is_teacher_folder

        return self.transformer is not None and (self.family == "tae" or is_teacher_folder(self.transformer))

    def fixed_prompt_embeds(self) -> torch.Tensor | None:
        """The 1 x L x D prompt embedding a trained teacher runs with (None: the prompt is text-encoded)."""
        if not self.trained_teacher:
            return None
        from .train.teacher import load_prompt_embeds, read_teacher_info

        read_teacher_info(self.transformer)  # a clear error (how to train one) when the folder is not a teacher
        return load_prompt_embeds(self.transformer)

    @property
    def text_encoder_id(self) -> str:
        """What identifies the preset's text encoder (the key of cached prompt embeddings)."""
        if self.transformer is None:
            raise ValueError(f"preset {self.name!r} has no diffusion transformer, hence no text encoder")
        return f"tiny-umt5-seed{self.seed}" if self.transformer == "tiny" else self.transformer

    def load_text_encoder(self, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        """The pipeline's tokenizer and UMT5 text encoder (tiny: a byte tokenizer and a seeded tiny UMT5)."""
        if self.transformer is None:
            raise ValueError(f"preset {self.name!r} has no diffusion transformer, hence no text encoder")
        if self.transformer == "tiny":
            tokenizer, model = ByteTokenizer(), tiny_umt5_encoder(self.seed)
        else:
            # Wan-AI/*-Diffusers keep the tokenizer and the UMT5-XXL encoder beside the transformer.
            from transformers import AutoTokenizer, UMT5EncoderModel

            tokenizer = AutoTokenizer.from_pretrained(self.transformer, subfolder="tokenizer")
            model = UMT5EncoderModel.from_pretrained(self.transformer, subfolder="text_encoder", dtype=dtype)
        return tokenizer, model.eval().to(device=device or "cpu", dtype=dtype)


def tiny_wan_vae(seed: int = 0):
    """A seeded, randomly initialised tiny AutoencoderKLWan (the real architecture, tiny widths)."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan(**TINY_WAN_VAE_CONFIG).eval()


def tiny_wan_transformer(seed: int = 0):
    """A seeded, randomly initialised tiny WanTransformer3DModel."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**TINY_WAN_TRANSFORMER_CONFIG).eval()


# A tiny UMT5 encoder whose width matches TINY_WAN_TRANSFORMER_CONFIG["text_dim"] (the real one is UMT5-XXL, 4096).
TINY_UMT5_CONFIG = dict(
    vocab_size=259,  # ByteTokenizer: pad 0, eos 1, unk 2, then the 256 byte values
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    feed_forward_proj="gated-gelu",
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


def tiny_umt5_encoder(seed: int = 0):
    """A seeded, randomly initialised tiny transformers UMT5EncoderModel (the real architecture, tiny widths)."""
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UMT5EncoderModel(UMT5Config(**TINY_UMT5_CONFIG)).eval()


class ByteTokenizer:
    """UTF-8 bytes as token ids, called like a transformers tokenizer (T5 conventions: pad 0, eos 1 appended).

    The tiny preset's stand-in for the UMT5 sentencepiece tokenizer, which cannot be downloaded offline.
    """

    pad_token_id, eos_token_id, offset = 0, 1, 3

    def __call__(
        self,
        texts: str | list[str],
        padding: str = "max_length",
        max_length: int = 512,
        truncation: bool = True,
        add_special_tokens: bool = True,
        return_attention_mask: bool = True,
        return_tensors: str = "pt",
    ):
        """Token ids and attention mask (a BatchEncoding), padded to max_length (only padding="max_length", tensors "pt")."""
        if padding != "max_length" or return_tensors != "pt":
            raise ValueError("ByteTokenizer supports padding='max_length' and return_tensors='pt' only")
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.full((len(texts), max_length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for i, text in enumerate(texts):
            row = [b + self.offset for b in text.encode("utf-8")]
            limit = max_length - 1 if add_special_tokens else max_length
            if len(row) > limit and not truncation:
                raise ValueError(f"prompt of {len(row)} tokens exceeds max_length {max_length}")
            row = row[:limit] + ([self.eos_token_id] if add_special_tokens else [])
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        from transformers import BatchEncoding  # a dict with attribute access, as real tokenizers return

        return BatchEncoding({"input_ids": ids, "attention_mask": mask})


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


PRESETS = ("tiny", "taef2", "wan2.1-1.3b", "wan2.1-14b", "qwen-image", "flux2", "flux1", "sdxl")


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
    if name == "tiny":
        preset = Preset(
            "tiny", "wan", vae="tiny", transformer="tiny", hq_size=128,
            note="random tiny Wan VAE + transformer built from configs; runs anywhere in seconds (CI)",
        )
    elif name == "taef2":
        preset = Preset(
            "taef2", "tae", vae=str(taef2_dir(taef2_path)), transformer=str(taef2_teacher_dir(taef2_teacher)),
            hq_size=512, flow_shift=1.0,
            note="real pretrained tiny autoencoder for the FLUX.2 latent space (32 channels) and the small "
                 "flow-matching teacher ldlib trains in it (train-teacher)",
        )
    elif name == "wan2.1-1.3b":
        repo = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
        preset = Preset(
            name, "wan", vae=repo, vae_subfolder="vae", transformer=repo, transformer_subfolder="transformer",
            hq_size=512, note="real Wan 2.1 VAE and 1.3B transformer from the hub (needs network once)",
        )
    elif name == "wan2.1-14b":
        repo = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
        preset = Preset(
            name, "wan", vae=repo, vae_subfolder="vae", transformer=repo, transformer_subfolder="transformer",
            hq_size=512, note="real Wan 2.1 VAE and 14B transformer from the hub (needs network once, a big GPU)",
        )
    elif name == "qwen-image":
        # Qwen-Image's VAE: the Wan 2.1 architecture, decoder fine-tuned for images; latents normalised like Wan's.
        preset = Preset(
            name, "qwenimage", vae="Qwen/Qwen-Image", vae_subfolder="vae", hq_size=512,
            note="Qwen-Image VAE (AutoencoderKLQwenImage) from the hub; no teacher in ldlib (decoder training, export)",
        )
    elif name == "flux2":
        preset = Preset(
            name, "flux2", vae="black-forest-labs/FLUX.2-dev", vae_subfolder="vae", hq_size=512,
            note="FLUX.2 VAE (AutoencoderKLFlux2, 32 channels, BatchNorm-normalised latents); gated repo on the hub",
        )
    elif name == "flux1":
        # FLUX.1 [schnell] (Apache-2.0) ships the same VAE as FLUX.1 [dev]: latents (z - 0.1159) * 0.3611.
        preset = Preset(
            name, "kl", vae="black-forest-labs/FLUX.1-schnell", vae_subfolder="vae", hq_size=512,
            note="FLUX.1 VAE (AutoencoderKL, 16 channels, shift_factor/scaling_factor from its config)",
        )
    elif name == "sdxl":
        preset = Preset(
            name, "kl", vae="stabilityai/stable-diffusion-xl-base-1.0", vae_subfolder="vae", hq_size=512,
            note="SDXL VAE (AutoencoderKL, 4 channels, latents z * 0.13025); encodes in float32 (fp16 overflows)",
        )
    else:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    if overrides.get("vae") and "vae_subfolder" not in overrides and Path(str(overrides["vae"])).exists():
        # A local VAE replaces the hub repo: its layout is detected (VAE folder, pipeline folder, single file),
        # the hub repo's subfolder does not apply.
        overrides["vae_subfolder"] = None
    return replace(preset, **overrides) if overrides else preset
