"""The latent 2x upscaler: ``C x h x w -> C x 2h x 2w`` in a VAE's normalised latent space, and its folder format.

"Hires fix" upscales a latent and lets the diffusion model refine it at the larger size. Resizing a latent like an
image (bilinear, bicubic) smears channels that are not colours; decoding, resizing and encoding again is slow and
blurs. ``LatentUpscaler`` is a small residual conv net trained on (LQ latent, HQ latent) pairs of one crop: it
adds a learned sub-pixel residual (``pixel_shuffle``) to the nearest-neighbour 2x of its input, and its last conv
starts at zero, so an untrained one *is* nearest upsampling, exactly.

A folder (``save_latent_upscaler``; what ``ldlib/assets/latent_upscaler_<preset>`` ships)::

    latent_upscaler.safetensors   the weights (float32, or float16 for shipping)
    config.json                   "format", the architecture ("config"), and what the caller records: the codec
                                  identity of its latent space, the preset, data, command, metrics

Which latent space a folder belongs to is checked where presets are known (``ldlib.build.load_latent_upscaler``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.files import atomic_write_bytes
from .decoder import check_finite_weights

FORMAT = "ldlib-latent-upscaler/1"
WEIGHTS = "latent_upscaler.safetensors"
CONFIG = "config.json"
MAX_PARAMETERS = 5_000_000  # "a few million at most": a latent upscaler far bigger than this is a decoder


class ResBlock(nn.Module):
    """conv 3x3 -> SiLU -> conv 3x3, added to the input (no normalisation: tiles and batches behave alike)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(x)))


class LatentUpscaler(nn.Module):
    """``up(z) = nearest_2x(z) + pixel_shuffle(conv_out(silu(blocks(conv_in(z)))), 2)``, in normalised latents.

    ``channels``: the VAE's latent channels; ``width`` x ``depth`` residual blocks run at the input's resolution
    (the cheap side), and ``conv_out`` (zero-initialised) predicts the 4 sub-pixels of each output cell, so the
    untrained net returns ``F.interpolate(z, scale_factor=2, mode="nearest")`` bit for bit.
    """

    def __init__(self, channels: int, width: int = 192, depth: int = 6) -> None:
        super().__init__()
        if channels < 1 or width < 1 or depth < 0:
            raise ValueError(f"LatentUpscaler: need channels, width >= 1 and depth >= 0, got {channels}, {width}, {depth}")
        self.config = {"channels": int(channels), "width": int(width), "depth": int(depth), "factor": 2}
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.conv_out = nn.Conv2d(width, 4 * channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        n = sum(p.numel() for p in self.parameters())
        if n > MAX_PARAMETERS:
            raise ValueError(f"LatentUpscaler: width {width} x depth {depth} makes {n / 1e6:.1f}M parameters; "
                             f"a latent upscaler stays under {MAX_PARAMETERS / 1e6:g}M (lower width or depth)")

    @property
    def channels(self) -> int:
        return self.config["channels"]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """N x C x h x w normalised latents -> N x C x 2h x 2w."""
        if z.dim() != 4 or z.shape[1] != self.channels:
            raise ValueError(f"LatentUpscaler expects N x {self.channels} x h x w latents, got shape {tuple(z.shape)}")
        base = F.interpolate(z, scale_factor=2, mode="nearest")
        h = self.conv_in(z)
        for block in self.blocks:
            h = block(h)
        return base + F.pixel_shuffle(self.conv_out(F.silu(h)), 2).to(base.dtype)


def nearest_2x(z: torch.Tensor) -> torch.Tensor:
    """The simplest latent 2x (what an untrained LatentUpscaler returns)."""
    return F.interpolate(z, scale_factor=2, mode="nearest")


def save_latent_upscaler(net: LatentUpscaler, folder: str | os.PathLike, info: dict | None = None,
                         dtype: torch.dtype = torch.float32) -> Path:
    """Write ``latent_upscaler.safetensors`` (in ``dtype``) + ``config.json`` (format, architecture, info) atomically."""
    from safetensors.torch import save

    folder = Path(folder)
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(folder / WEIGHTS, save(sd, metadata={"format": FORMAT}))
    doc = {"format": FORMAT, "config": net.config, "dtype": str(dtype).replace("torch.", ""), **(info or {})}
    atomic_write_bytes(folder / CONFIG, json.dumps(doc, indent=2).encode() + b"\n")
    return folder


def read_latent_upscaler_info(folder: str | os.PathLike) -> dict:
    """config.json of a latent upscaler folder; FileNotFoundError / ValueError naming it when it is not one."""
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder}: not a latent upscaler ({WEIGHTS} + {CONFIG}); train one with "
                                "`python -m ldlib train-latent-upscaler`")
    try:
        info = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: unreadable ({e})") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{path}: not a latent upscaler's config (format {FORMAT!r} expected)")
    return info


def load_latent_upscaler(folder: str | os.PathLike, device: str | torch.device | None = None
                         ) -> tuple[LatentUpscaler, dict]:
    """(the net in float32 and eval mode, its config.json) from a folder written by save_latent_upscaler."""
    from safetensors.torch import load_file

    folder = Path(folder)
    info = read_latent_upscaler_info(folder)
    arch = dict(info["config"])
    arch.pop("factor", None)
    net = LatentUpscaler(**arch)
    sd = {k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items()}
    check_finite_weights(sd.items(), str(folder / WEIGHTS))
    net.load_state_dict(sd)
    return net.eval().requires_grad_(False).to(device or "cpu"), info
