"""Decoder losses: L1 + LPIPS + a hinge GAN with a spectral-norm patch discriminator and the adaptive GAN weight.

The recipe follows latent-diffusion / taming autoencoder training: the GAN term is off before ``gan_start``, then
weighted by ``|grad L_rec| / (|grad L_gan| + 1e-4)`` at the decoder's last layer (clamped to [0, 1e4]) times
``gan_weight``. Images are N x 3 x H x W in [-1, 1]; predictions are the decoder's raw (unclamped) output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from ..core.config import check_finite
from ..core.metrics import check_lpips_net, lpips_model


@dataclass
class LossConfig:
    """Weights and switches of the decoder loss (defaults: the LDM autoencoder recipe, with an earlier, ramped GAN)."""

    l1_weight: float = field(default=1.0, metadata={"help": "weight of pixel L1 against HQ"})
    lpips_weight: float = field(default=1.0, metadata={"help": "weight of LPIPS (LDM's perceptual_weight)"})
    lpips_net: Literal["alex", "vgg", "squeeze"] = field(default="vgg", metadata={"help": "LPIPS backbone (LDM: vgg; alex is cheaper)"})
    gan_weight: float = field(default=0.5, metadata={"help": "GAN weight, times the adaptive weight (LDM's disc_weight; 0: no GAN)"})
    gan_start: int = field(default=1000, metadata={"help": "optimiser step from which both GAN terms are on"})
    # A discriminator switched on late at full strength can wreck reconstructions: ramp it in.
    gan_warmup: int = field(default=500, metadata={"help": "steps of the linear ramp of the GAN weight after gan-start"})
    adaptive_max: float = field(default=1e4, metadata={"help": "clamp of the adaptive GAN weight"})
    disc_channels: int = field(default=64, metadata={"help": "width of the first discriminator layer"})
    disc_layers: int = field(default=3, metadata={"help": "strided discriminator layers (3: 70 px receptive field)"})

    def __post_init__(self) -> None:
        check_finite(self)
        for name in ("l1_weight", "lpips_weight", "gan_weight", "adaptive_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"LossConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.gan_start < 0 or self.gan_warmup < 0:
            raise ValueError(f"gan_start and gan_warmup must be >= 0, got {self.gan_start}, {self.gan_warmup}")
        if self.l1_weight == 0 and self.lpips_weight == 0:  # the GAN alone has no target: nothing to reconstruct
            raise ValueError("LossConfig.l1_weight and LossConfig.lpips_weight are both 0: nothing pulls the output "
                             "towards HQ")
        check_lpips_net(self.lpips_net, "LossConfig.lpips_net")


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming layout) with spectral norm instead of BatchNorm.

    Spectral norm bounds the discriminator's Lipschitz constant without batch statistics, so it behaves the same at
    batch 1, under gradient accumulation and under DDP (no cross-rank BatchNorm sync needed).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        seq: list[nn.Module] = [spectral_norm(nn.Conv2d(in_channels, channels, 4, 2, 1)), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers + 1):
            nxt = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            seq += [spectral_norm(nn.Conv2d(ch, nxt, 4, stride, 1)), nn.LeakyReLU(0.2)]
            ch = nxt
        seq.append(spectral_norm(nn.Conv2d(ch, 1, 4, 1, 1)))
        self.net = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-patch real/fake logits, N x 1 x h x w."""
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``0.5 * (mean relu(1 - real) + mean relu(1 + fake))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss ``-mean(fake logits)``."""
    return -logits_fake.mean()


def adaptive_gan_weight(
    rec_grad: torch.Tensor,
    gan_grad: torch.Tensor,
    max_weight: float = 1e4,
    reduce_grads: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``|grad L_rec| / (|grad L_gan| + 1e-4)`` from the two losses' gradients at the last layer, clamped to
    [0, max_weight], detached.

    ``reduce_grads`` averages the two gradients across processes first (DDP), so every rank uses the weight a
    single process would compute on the global batch.
    """
    if reduce_grads is not None:
        rec_grad, gan_grad = reduce_grads(rec_grad), reduce_grads(gan_grad)
    w = rec_grad.float().norm() / (gan_grad.float().norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()


class _KnownGradient(torch.autograd.Function):
    """A scalar equal to ``value`` whose gradient at ``x`` is ``grad`` (the loss side, differentiated already)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return value.detach().clone()

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        if torch.is_grad_enabled():  # create_graph: the loss side's second derivatives would be silently missing
            raise RuntimeError("the GAN step's loss has no second derivative (no create_graph / double backward)")
        (grad,) = ctx.saved_tensors
        return upstream * grad, None, None


class DecoderLoss(nn.Module):
    """L1 + LPIPS reconstruction loss and the GAN terms; holds the frozen LPIPS network (not the discriminator)."""

    def __init__(self, cfg: LossConfig | None = None, lpips: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg or LossConfig()
        if lpips is None and self.cfg.lpips_weight > 0:
            lpips = lpips_model(self.cfg.lpips_net)
        self.lpips = lpips

    def gan_factor(self, step: int) -> float:
        """Multiplier of the generator's GAN term at an optimiser step: 0 before gan_start, then a linear ramp to 1."""
        if step < self.cfg.gan_start or self.cfg.gan_weight == 0:
            return 0.0
        if self.cfg.gan_warmup == 0:
            return 1.0
        return min(1.0, (step - self.cfg.gan_start + 1) / self.cfg.gan_warmup)

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms (generator and discriminator) are on at this step."""
        return self.gan_factor(step) > 0

    def reconstruction(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted L1 + LPIPS (batch means) and the unweighted terms."""
        pred, target = pred.float(), target.float()
        l1 = (pred - target).abs().mean()
        terms = {"l1": l1}
        loss = self.cfg.l1_weight * l1
        if self.cfg.lpips_weight > 0:
            # Gradients must flow through LPIPS into pred: never evaluate this under no_grad.
            lp = self.lpips(pred, target).mean()
            terms["lpips"] = lp
            loss = loss + self.cfg.lpips_weight * lp
        terms["rec"] = loss
        return loss, terms

    def generator(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        step: int,
        discriminator: nn.Module | None = None,
        last_layer: torch.Tensor | None = None,
        reduce_grads: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total decoder loss at a step: reconstruction, plus the adaptively weighted GAN term once it is on.

        The discriminator's parameters get no gradient from this loss (they are frozen for the call). With the GAN
        on, the loss side is differentiated here already: the returned loss's backward starts at pred (once; no
        double backward).
        """
        factor = self.gan_factor(step)
        if factor == 0:
            loss, terms = self.reconstruction(pred, target)
            terms["total"] = loss
            return loss, terms
        if discriminator is None or last_layer is None:
            raise ValueError("the GAN term is on at this step: pass discriminator and last_layer")
        pred = pred.float()
        rec, terms = self.reconstruction(pred, target)
        flags = [p.requires_grad for p in discriminator.parameters()]
        discriminator.requires_grad_(False)
        try:
            g = hinge_g_loss(discriminator(pred))
        finally:
            for p, f in zip(discriminator.parameters(), flags):
                p.requires_grad_(f)
        # Both terms are differentiated once, down to the prediction. The adaptive weight needs their gradients at
        # the last layer, which only that layer's backward gives from there; the backward of the returned loss
        # then starts from the prediction. The textbook way (autograd.grad of each loss at the last layer, then
        # the total's backward) runs the LPIPS and discriminator backwards twice: a taef2 GAN step took 1.10-1.12x
        # as long with 7-30 % more peak memory (bench train, 2 CPU cores). The same gradients to float rounding.
        # (The two graphs share nothing past pred: each is freed by its own grad call.)
        rec_out, gan_out = torch.autograd.grad(rec, pred)[0], torch.autograd.grad(g, pred)[0]
        rec_grad = torch.autograd.grad(pred, last_layer, rec_out, retain_graph=True)[0]
        gan_grad = torch.autograd.grad(pred, last_layer, gan_out, retain_graph=True)[0]
        w = adaptive_gan_weight(rec_grad, gan_grad, self.cfg.adaptive_max, reduce_grads)
        coef = self.cfg.gan_weight * factor * w
        total = rec.detach() + coef * g.detach()
        terms.update(g_loss=g.detach(), adaptive_weight=w, gan_factor=torch.tensor(factor), total=total)
        return _KnownGradient.apply(pred, total, rec_out + coef * gan_out), terms

    def discriminator_loss(
        self, discriminator: nn.Module, pred: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss of the discriminator on HQ (real) vs detached predictions (fake), one forward for both."""
        n = target.shape[0]
        # One forward over [real; fake]: DDP expects one forward per backward (and no BatchNorm mixes them).
        logits = discriminator(torch.cat([target.float(), pred.detach().float()]))
        real, fake = logits[:n], logits[n:]
        loss = hinge_d_loss(real, fake)
        return loss, {"d_loss": loss.detach(), "logits_real": real.detach().mean(), "logits_fake": fake.detach().mean()}
