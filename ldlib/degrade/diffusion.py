"""The diffusion degrader: noise to sigma, then the teacher's own Euler loop back to 0 on explicit raw sigmas."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..models.velocity import flow_velocity
from .noise import Degrader, sigma_tensor


def sigma_grid(sigma: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-sample Euler grids, N x (steps + 1): row i is ``s_i * (1 - k / steps)``, k = 0..steps (ends at 0)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    k = torch.arange(steps + 1, dtype=sigma.dtype, device=sigma.device)
    return sigma.reshape(-1, 1) * (1 - k / steps)


def euler(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
          grid: torch.Tensor) -> torch.Tensor:
    """Flow-matching Euler along per-sample sigma grids (N x (steps + 1)): ``x <- x + (s_next - s) * v(x, s)``.

    A pure function of (velocity, x, sigmas), as k-diffusion's samplers: the degrader, the teacher's samples and its
    evaluation all run this one loop.
    """
    for k in range(grid.shape[1] - 1):
        v = velocity(x, grid[:, k])
        x = x + (grid[:, k + 1] - grid[:, k]).view(-1, 1, 1, 1) * v
    return x


class DiffusionDegrader(Degrader):
    """Noise to sigma, then denoise back to 0 with a flow-matching transformer (Wan's WanTransformer3DModel).

    The Euler loop is our own, on explicit raw sigmas (no scheduler shift): with per-sample sigmas every sample
    follows its own grid ``s_i * (1 - k / steps)`` and all take the same step index k together, so one batched
    transformer call per step serves samples at different noise levels. ``last_grid`` (N x (steps + 1), CPU)
    records the sigmas actually used by the latest call. The transformer sees N x C x 1 x H x W (an image is one
    frame), ``timestep = sigma * 1000`` per sample, and predicts the velocity ``v = eps - x0``.
    """

    def __init__(
        self,
        transformer: nn.Module,
        prompt_embeds: torch.Tensor,
        steps: int = 1,
        guidance_scale: float | None = None,
        negative_embeds: torch.Tensor | None = None,
        batch_size: int | None = None,
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if guidance_scale is not None and guidance_scale != 1.0 and negative_embeds is None:
            raise ValueError("classifier-free guidance needs negative_embeds (the unconditional embedding)")
        if prompt_embeds.dim() != 3 or prompt_embeds.shape[0] != 1:
            raise ValueError(f"prompt_embeds must be 1 x L x D, got {tuple(prompt_embeds.shape)}")
        text_dim = getattr(getattr(transformer, "config", None), "text_dim", None)
        if text_dim is not None and prompt_embeds.shape[-1] != text_dim:
            raise ValueError(f"prompt_embeds width {prompt_embeds.shape[-1]} != the transformer's text_dim {text_dim}")
        self.transformer = transformer
        self.prompt_embeds = prompt_embeds
        self.negative_embeds = negative_embeds
        self.steps = int(steps)
        self.guidance_scale = guidance_scale
        self.batch_size = batch_size
        self.last_grid: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> "DiffusionDegrader":
        """Move the transformer to device; returns self."""
        self.transformer = self.transformer.to(device)
        return self

    def with_steps(self, steps: int) -> "DiffusionDegrader":
        """The same teacher (shared transformer and embeddings) with another number of Euler steps."""
        return DiffusionDegrader(self.transformer, self.prompt_embeds, steps, self.guidance_scale,
                                 self.negative_embeds, self.batch_size)

    @property
    def uses_guidance(self) -> bool:
        """Whether classifier-free guidance is on (off by default)."""
        return self.guidance_scale is not None and self.guidance_scale != 1.0

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity (float32, N x C x H x W) at per-sample sigma (N,)."""
        return flow_velocity(self.transformer, x, sigma, self.prompt_embeds,
                             self.guidance_scale if self.uses_guidance else None, self.negative_embeds)

    @torch.no_grad()
    def denoise(self, x_sigma: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """Euler-integrate x_sigma from sigma to 0 in ``steps`` steps; samples at sigma 0 come back unchanged."""
        if x_sigma.dim() != 4:
            raise ValueError(f"latents must be N x C x H x W, got shape {tuple(x_sigma.shape)}")
        s = sigma_tensor(sigma, x_sigma.float()).flatten()
        if (s < 0).any() or (s > 1).any():
            raise ValueError(f"sigma must lie in [0, 1], got {s.tolist()}")
        grid = sigma_grid(s, self.steps)
        self.last_grid = grid.cpu()
        # Samples at sigma 0 are returned as they are (bit-identical) and cost no transformer call.
        active = (s > 0).nonzero().flatten()
        out = x_sigma.clone()
        if len(active) == 0:
            return out
        x0, grid_a = x_sigma[active].float(), grid[active]
        bs = self.batch_size or len(active)
        outs = []
        for i in range(0, len(active), bs):
            outs.append(euler(self.velocity, x0[i : i + bs], grid_a[i : i + bs]))
        out[active] = torch.cat(outs).to(x_sigma.dtype)
        return out
