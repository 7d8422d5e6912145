"""Latent degraders: what a diffusion model does to latents, applied in the normalised latent space.

One interface for all: ``degrader.degrade(latents, sigma, generator) -> latents`` with sigma a float or a
per-sample tensor of shape (N,). Flow matching noises as ``x_s = (1 - s) * x0 + s * eps``.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Degrader(Protocol):
    """Anything that degrades normalised latents to a strength sigma."""

    def degrade(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor: ...


def sigma_tensor(sigma: float | torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """sigma as an (N, 1, 1, 1) tensor on latents' device and dtype (a float applies to every sample)."""
    s = torch.as_tensor(sigma, dtype=latents.dtype, device=latents.device)
    if s.dim() == 0:
        s = s.expand(latents.shape[0])
    if s.shape != (latents.shape[0],):
        raise ValueError(f"sigma must be a float or a ({latents.shape[0]},) tensor, got shape {tuple(s.shape)}")
    return s.view(-1, *([1] * (latents.dim() - 1)))


def add_noise(
    latents: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Flow-matching noising ``(1 - s) * x0 + s * eps`` with eps ~ N(0, 1) drawn from generator."""
    eps = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    s = sigma_tensor(sigma, latents)
    return (1 - s) * latents + s * eps


class NoiseDegrader:
    """The noising alone (no denoising): a baseline, and the offline stand-in when no teacher exists."""

    def degrade(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Return ``(1 - s) * x0 + s * eps``."""
        return add_noise(latents, sigma, generator)
