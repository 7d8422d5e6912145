"""The flow-matching velocity call of a Wan-style transformer (the teacher), with optional classifier-free guidance.

Convention: ``x_s = (1 - s) x0 + s eps``; the model predicts ``v = eps - x0``, sees latents as one frame
(N x C x 1 x H x W) and ``timestep = 1000 * s`` per sample; bf16 autocast on CUDA.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn


def flow_velocity(model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, prompt_embeds: torch.Tensor,
                  guidance_scale: float | None = None, negative_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """The model's velocity (float32, N x C x H x W) at per-sample sigma (N,); guidance on when guidance_scale is set."""
    param = next(model.parameters())
    n = x.shape[0]
    hidden = x.unsqueeze(2).to(param.dtype)  # N, C, T=1, H, W
    timestep = (sigma * 1000).to(device=x.device, dtype=torch.float32)
    cond = prompt_embeds.to(device=x.device, dtype=param.dtype).expand(n, -1, -1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if x.device.type == "cuda" else nullcontext()
    with autocast:
        v = model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=cond, return_dict=False)[0]
        if guidance_scale is not None:
            uncond = negative_embeds.to(device=x.device, dtype=param.dtype).expand(n, -1, -1)
            v_u = model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=uncond, return_dict=False)[0]
            v = v_u + guidance_scale * (v - v_u)
    return v.squeeze(2).float()
