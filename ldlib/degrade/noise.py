"""Flow-matching noising ``x_s = (1 - s) * x0 + s * eps`` and the degrader base class (noise, then ``denoise``).

Two ways to call a degrader: ``degrade(latents, sigma, generator)`` draws the noise of the whole batch from one
generator (pictures, sweeps); ``degrade_samples(latents, sigma, generators, ids)`` draws each sample's noise from its
own generator, so a sample's degradation does not depend on the batch or the process it lands in.
"""

from __future__ import annotations

from typing import Sequence

import torch


def sigma_tensor(sigma: float | torch.Tensor, latents: torch.Tensor,
                 device: str | torch.device | None = None) -> torch.Tensor:
    """sigma as an (N, 1, 1, 1) tensor of latents' dtype on latents' device or ``device`` (a float: every sample)."""
    s = torch.as_tensor(sigma, dtype=latents.dtype, device=device or latents.device)
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


def sample_noise(latents: torch.Tensor, sigma: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """eps like latents, sample i drawn on the CPU from generators[i] (zeros where sigma is 0, nothing drawn).

    Drawn on the CPU and moved: the same generators give the same noise on every device.
    """
    if len(generators) != latents.shape[0]:
        raise ValueError(f"need one generator per sample: {len(generators)} for {latents.shape[0]} latents")
    eps = [torch.randn(latents.shape[1:], generator=g, dtype=latents.dtype) if float(s) > 0
           else torch.zeros(latents.shape[1:], dtype=latents.dtype) for s, g in zip(sigma.tolist(), generators)]
    return torch.stack(eps).to(latents.device)


class Degrader:
    """Base of the noising degraders: ``denoise(x_sigma, sigma)`` maps noised latents back (identity here).

    Samples at sigma 0 come back unchanged (bit-identical) and cost no model call.
    """

    def denoise(self, x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Map noised latents back towards sigma 0 (per-sample sigma, shape (N,))."""
        return x_sigma

    @torch.no_grad()
    def degrade(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Noise the batch to sigma with one generator, then ``denoise``."""
        s = sigma_tensor(sigma, latents)
        return self._finish(latents, add_noise(latents, sigma, generator), s)

    @torch.no_grad()
    def degrade_samples(
        self, latents: torch.Tensor, sigma: torch.Tensor, generators: Sequence[torch.Generator],
        ids: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(degraded latents, sigma used): sample i noised with generators[i], one ``denoise`` for the batch.

        Which samples to noise is decided on a host copy of sigma: with latents on a GPU nothing is read back.
        """
        s_host = sigma_tensor(sigma, latents, device="cpu")
        s = s_host.to(latents.device)
        x_sigma = (1 - s) * latents + s * sample_noise(latents, s_host.flatten(), generators)
        return self._finish(latents, x_sigma, s, s_host.flatten()), s_host.flatten().float()

    def coverage(self, ids: Sequence[str]) -> float:
        """Share of the given pair ids this degrader can degrade (cached data may cover some only)."""
        return 1.0

    def to(self, device: str | torch.device) -> "Degrader":
        """Move the degrader's model (if any) to device; returns self."""
        return self

    def _finish(self, latents: torch.Tensor, x_sigma: torch.Tensor, s: torch.Tensor,
                s_host: torch.Tensor | None = None) -> torch.Tensor:
        # The active samples from sigma on the host when the caller has it there (no device read).
        active = ((s_host if s_host is not None else s.flatten()) > 0).nonzero().flatten()
        if len(active) == 0:
            return latents.clone()
        out = self.denoise(x_sigma[active], s.flatten()[active])
        if out.shape != x_sigma[active].shape:
            raise ValueError(f"{type(self).__name__} returned shape {tuple(out.shape)}, expected {tuple(x_sigma[active].shape)}")
        result = latents.clone()
        result[active] = out.to(latents.dtype)
        return result


class NoiseDegrader(Degrader):
    """The noising alone (no denoising): a baseline, and the stand-in when no teacher exists."""
