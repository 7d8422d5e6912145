"""The proxy degrader: noise, then a trained proxy net (``ldlib.models.proxy``) in place of the teacher."""

from __future__ import annotations

import torch
import torch.nn as nn

from .noise import Degrader


class ProxyDegrader(Degrader):
    """A trained proxy ``net(x_sigma, sigma) -> latents`` standing in for the teacher (``ldlib.train.proxy``)."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def to(self, device: str | torch.device) -> "ProxyDegrader":
        """Move the net to device (eval mode); returns self."""
        self.net = self.net.to(device).eval()
        return self

    def denoise(self, x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The proxy net at per-sample sigma, without gradients: its output is a training input."""
        with torch.no_grad():
            return self.net(x_sigma, sigma)
