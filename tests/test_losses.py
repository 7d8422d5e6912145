"""Loss terms on known inputs: L1, LPIPS (wired and differentiable), hinge, adaptive weight, GAN start/ramp."""

from __future__ import annotations

import lpips as lpips_pkg
import pytest
import torch
import torch.nn as nn
from conftest import rel_diff

from ldlib.apps.analysis import SweepConfig
from ldlib.apps.evaluate import EvalConfig
from ldlib.core.metrics import lpips_model
from ldlib.models.losses import (DecoderLoss, LossConfig, PatchDiscriminator, adaptive_gan_weight, hinge_d_loss,
                                 hinge_g_loss)
from ldlib.train.latent_upscaler import LatentUpscalerConfig


@pytest.fixture(scope="module")
def lp():
    with pytest.warns(UserWarning) if not _cached() else _null():
        return lpips_model("alex")


def _cached() -> bool:
    from ldlib.core.metrics import lpips_backbone_cached

    return lpips_backbone_cached("alex")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _imgs(seed: int, n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_l1_closed_form_and_weights():
    loss = DecoderLoss(LossConfig(l1_weight=2.0, lpips_weight=0.0))
    x = torch.zeros(1, 3, 4, 4)
    y = torch.full((1, 3, 4, 4), 0.25)
    y[..., 0, 0] = -0.75  # |diff| = 0.75 on 3 of 48 pixels, 0.25 elsewhere
    total, terms = loss.reconstruction(x, y)
    expected = (45 * 0.25 + 3 * 0.75) / 48
    assert terms["l1"].item() == pytest.approx(expected, abs=1e-7)
    assert total.item() == pytest.approx(2.0 * expected, abs=1e-6)


def test_lpips_term_matches_package_and_has_gradient(lp):
    # Offline the backbone is random (pnet_rand): still the same function as calling the package directly.
    loss = DecoderLoss(LossConfig(l1_weight=0.0, lpips_weight=3.0, lpips_net="alex"), lpips=lp)
    x, y = _imgs(0), _imgs(1)
    x.requires_grad_(True)
    total, terms = loss.reconstruction(x, y)
    direct = lp(x.detach(), y).mean()
    assert terms["lpips"].item() == pytest.approx(direct.item(), rel=1e-5)
    assert total.item() == pytest.approx(3.0 * direct.item(), rel=1e-5)
    assert loss.reconstruction(y, y)[1]["lpips"].item() == pytest.approx(0.0, abs=1e-6)
    total.backward()
    # The known bug: LPIPS under no_grad contributes nothing. Here the gradient must be real and non-zero.
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert isinstance(lp, lpips_pkg.LPIPS)


def test_hinge_losses_closed_form():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = 0, 1, 2 -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)


def test_adaptive_weight_ratio_and_clamp():
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])  # the two gradients: norms 5 and 1
    got = adaptive_gan_weight(a.clone().requires_grad_(), b)
    assert got.item() == pytest.approx(5.0 / (1.0 + 1e-4), rel=1e-6)
    assert not got.requires_grad
    # A GAN loss with no gradient at the layer: 5 / 1e-4 = 5e4, clamped to the maximum.
    assert adaptive_gan_weight(a, 0 * b).item() == pytest.approx(1e4)
    assert adaptive_gan_weight(a, 0 * b, max_weight=7.0).item() == pytest.approx(7.0)
    # reduce_grads sees both gradients (DDP averaging hook).
    seen = []
    adaptive_gan_weight(a, b, reduce_grads=lambda g: seen.append(g.clone()) or g)
    assert torch.equal(seen[0], a) and torch.equal(seen[1], b)


def _textbook_gan_step(loss, decoder, last_layer, disc, z, y, step):
    """LDM/taming's GAN step, written out: autograd.grad of each loss at the last layer, then the total's backward."""
    pred = decoder(z)
    rec, _ = loss.reconstruction(pred, y)
    disc.requires_grad_(False)
    g = -disc(pred).mean()
    disc.requires_grad_(True)
    rec_grad = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
    w = (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0, loss.cfg.adaptive_max).detach()
    total = rec + loss.cfg.gan_weight * loss.gan_factor(step) * w * g
    total.backward()
    return total.detach(), w


def test_gan_step_gradients_equal_the_textbook_two_pass_ones(lp):
    # generator differentiates LPIPS and the discriminator once; the gradients are those of the written-out recipe.
    from ldlib.apps.bench.train import _two_pass_loss

    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 12, 3, padding=1),
                            nn.PixelShuffle(2))
    disc = PatchDiscriminator(3, channels=8, layers=2).eval()  # eval: no power-iteration update between runs
    cfg = LossConfig(lpips_net="alex", gan_start=0, gan_warmup=4, gan_weight=0.7)
    loss = DecoderLoss(cfg, lpips=lp)
    z, y = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1)), _imgs(2, size=64)
    last = decoder[2].weight

    def grads():
        out = [p.grad.clone() for p in decoder.parameters()]
        decoder.zero_grad(set_to_none=True)
        return out

    want, want_w = _textbook_gan_step(loss, decoder, last, disc, z, y, step=1)
    want_grads = grads()
    total, terms = loss.generator(decoder(z), y, 1, disc, last)
    assert total.item() == pytest.approx(want.item(), rel=1e-6) and terms["total"].item() == total.item()
    assert terms["adaptive_weight"].item() == pytest.approx(want_w.item(), rel=1e-5)
    (0.25 * total).backward()  # a scaled loss (grad accumulation, a GradScaler) scales every gradient
    assert all(p.grad is None for p in disc.parameters()), "the generator loss must not train the discriminator"
    for got, ref in zip(grads(), want_grads):
        assert rel_diff(got, 0.25 * ref) <= 1e-5
    # The bench's "before" rows take their gradients the textbook way too.
    _two_pass_loss(cfg, lpips=lp).generator(decoder(z), y, 1, disc, last)[0].backward()
    for got, ref in zip(grads(), want_grads):
        assert rel_diff(got, ref) <= 1e-5


def test_gan_step_with_a_bf16_prediction_and_no_double_backward(lp):
    # Under bf16 autocast the prediction is bf16: its gradient comes back through the float copy the losses see.
    from ldlib.apps.bench.train import _two_pass_loss

    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 12, 3, padding=1),
                            nn.PixelShuffle(2))
    disc = PatchDiscriminator(3, channels=8, layers=2).eval()
    cfg = LossConfig(lpips_net="alex", gan_start=0, gan_warmup=0)
    z, y = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1)), _imgs(2, size=64)
    grads = []
    for loss in (DecoderLoss(cfg, lpips=lp), _two_pass_loss(cfg, lpips=lp)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = decoder(z)
        assert pred.dtype == torch.bfloat16
        loss.generator(pred, y, 1, disc, decoder[2].weight)[0].backward()
        grads.append([p.grad.clone() for p in decoder.parameters()])
        decoder.zero_grad(set_to_none=True)
    # The two add the terms' gradients in different precisions (fp32 once vs bf16 per term): bf16 rounding apart.
    for got, ref in zip(*grads):
        assert rel_diff(got, ref) <= 2e-2
    # The known gradient is not itself differentiable: a double backward fails instead of silently losing terms.
    total, _ = DecoderLoss(cfg, lpips=lp).generator(decoder(z), y, 1, disc, decoder[2].weight)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(total, list(decoder.parameters()), create_graph=True)


class _Boom(nn.Module):
    def forward(self, x):
        raise AssertionError("discriminator called before gan_start")


def test_gan_off_before_start_then_ramped(lp):
    cfg = LossConfig(lpips_weight=0.0, gan_start=10, gan_warmup=4, gan_weight=0.5)
    loss = DecoderLoss(cfg, lpips=lp)
    assert [loss.gan_factor(s) for s in (0, 9, 10, 11, 13, 100)] == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    x, y = _imgs(2), _imgs(3)
    total, terms = loss.generator(x, y, step=9, discriminator=_Boom(), last_layer=None)
    assert total.item() == terms["rec"].item() and "g_loss" not in terms

    # On: total = rec + gan_weight * factor * w * g, with w from the decoder's last layer.
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    disc = PatchDiscriminator(3, channels=8, layers=2)
    pred = conv(x)
    total, terms = loss.generator(pred, y, step=11, discriminator=disc, last_layer=conv.weight)
    expected = terms["rec"] + 0.5 * 0.5 * terms["adaptive_weight"] * terms["g_loss"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["adaptive_weight"].item() > 0
    total.backward()
    assert all(p.grad is None for p in disc.parameters()), "the generator loss must not train the discriminator"
    assert all(p.requires_grad for p in disc.parameters())
    assert conv.weight.grad is not None


def test_discriminator_loss_and_spectral_norm():
    torch.manual_seed(0)
    disc = PatchDiscriminator(3, channels=8, layers=2)
    loss = DecoderLoss(LossConfig(lpips_weight=0.0))
    x, y = _imgs(4, size=64), _imgs(5, size=64)
    disc.eval()  # eval: no power-iteration update between the calls compared
    d, terms = loss.discriminator_loss(disc, x, y)
    logits_real, logits_fake = disc(y), disc(x)
    assert d.item() == pytest.approx(hinge_d_loss(logits_real, logits_fake).item(), rel=1e-5)
    assert logits_real.shape[1] == 1 and logits_real.shape[-1] > 1  # a map of patch logits
    # Spectral norm: each conv's (reshaped) weight has largest singular value ~1 after power iterations.
    conv = disc.net[0]
    disc.train()
    for _ in range(30):
        disc(y)
    sv = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2).item()
    assert sv == pytest.approx(1.0, rel=0.05)


def test_bad_config_is_rejected():  # (a bad lpips_net: the parametrized test below)
    with pytest.raises(ValueError, match="gan_weight"):
        LossConfig(gan_weight=-1)


@pytest.mark.parametrize("make, name", [
    (lambda: LossConfig(lpips_net="resnet"), "LossConfig.lpips_net"),
    (lambda: LatentUpscalerConfig(lpips_net="resnet"), "LatentUpscalerConfig.lpips_net"),
    (lambda: EvalConfig(lpips_net="resnet"), "EvalConfig.lpips_net"),
    (lambda: SweepConfig(lpips_net="resnet"), "SweepConfig.lpips_net"),
    (lambda: lpips_model("resnet"), "lpips_model's net"),
])
def test_an_lpips_backbone_lpips_lacks_is_refused_naming_the_setting(make, name):
    # every setting that picks an LPIPS backbone goes through the one check, before any weights are built
    with pytest.raises(ValueError, match=f"{name} must be alex \\| vgg \\| squeeze, got 'resnet'"):
        make()
