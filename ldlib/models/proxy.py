"""The proxy net: a small conv net that mimics the diffusion teacher, and its folder format (safetensors + JSON).

``ProxyNet`` is sigma-conditioned, ``out = x_sigma - sigma * v_hat(x_sigma, sigma)``, so the identity at sigma 0 by
construction; ``save_proxy`` / ``load_proxy`` write and read ``proxy.safetensors`` + ``proxy.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..core.files import atomic_write_bytes


class ProxyNet(nn.Module):
    """A small fully-convolutional stand-in for the teacher, conditioned on sigma.

    Parameterised like the teacher's one Euler step: ``out = x_sigma - sigma * v_hat(x_sigma, sigma)``, so it is
    the identity at sigma 0 by construction and starts (zero-initialised output conv) as "return x_sigma". The
    body is diffusers' ResnetBlock2D with scale/shift (FiLM) conditioning on a sinusoidal embedding of
    ``sigma * 1000`` (the teacher's timestep).
    """

    def __init__(self, channels: int = 16, width: int = 64, blocks: int = 4, emb_dim: int = 128, groups: int = 8) -> None:
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding
        from diffusers.models.resnet import ResnetBlock2D

        self.config = {"channels": channels, "width": width, "blocks": blocks, "emb_dim": emb_dim, "groups": groups}
        self.emb_dim = emb_dim
        self.time_embedding = TimestepEmbedding(emb_dim, emb_dim)
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            ResnetBlock2D(in_channels=width, temb_channels=emb_dim, groups=groups, time_embedding_norm="scale_shift")
            for _ in range(blocks)
        )
        self.norm_out = nn.GroupNorm(groups, width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Predict the teacher's output for x_sigma at per-sample sigma (N,)."""
        from diffusers.models.embeddings import get_timestep_embedding

        s = sigma.to(device=x_sigma.device, dtype=torch.float32).reshape(-1)
        temb = get_timestep_embedding(s * 1000, self.emb_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        temb = self.time_embedding(temb.to(x_sigma.dtype))
        h = self.conv_in(x_sigma)
        for block in self.blocks:
            h = block(h, temb)
        v = self.conv_out(torch.nn.functional.silu(self.norm_out(h)))
        return x_sigma - s.view(-1, 1, 1, 1).to(x_sigma.dtype) * v


PROXY_WEIGHTS = "proxy.safetensors"
PROXY_CONFIG = "proxy.json"


def save_proxy(net: ProxyNet, folder: str | os.PathLike, extra: dict | None = None) -> None:
    """Write ``proxy.safetensors`` + ``proxy.json`` (architecture config and anything in extra) atomically."""
    from safetensors.torch import save

    folder = Path(folder)
    sd = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(folder / PROXY_WEIGHTS, save(sd))
    atomic_write_bytes(folder / PROXY_CONFIG, json.dumps({**(extra or {}), "config": net.config}, indent=2).encode())


def load_proxy(folder: str | os.PathLike, device: str | torch.device | None = None) -> ProxyNet:
    """A trained ProxyNet from a folder written by save_proxy (eval mode)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / PROXY_CONFIG).is_file() or not (folder / PROXY_WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder}: no trained proxy ({PROXY_WEIGHTS} + {PROXY_CONFIG}); train one with train-proxy")
    cfg = json.loads((folder / PROXY_CONFIG).read_text())["config"]
    net = ProxyNet(**cfg)
    net.load_state_dict(load_file(str(folder / PROXY_WEIGHTS)))
    return net.eval().to(device or "cpu")
