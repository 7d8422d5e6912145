"""Image quality metrics on [-1, 1] tensors."""

from __future__ import annotations

import torch


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of two N x C x H x W batches in [-1, 1] (peak-to-peak 2)."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))


# torchvision's ImageNet weights that lpips' backbones load (lpips' own linear heads ship inside the package).
_LPIPS_BACKBONE_WEIGHTS = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample ``|x - ref| / |ref|`` (Frobenius norms over all but the first dimension)."""
    # At least float32 (half-precision norms of a whole latent overflow or round); float64 stays float64.
    dtype = torch.promote_types(torch.promote_types(x.dtype, ref.dtype), torch.float32)
    x, ref = x.to(dtype), ref.to(dtype)
    return (x - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-12)


def lpips_backbone_cached(net: str = "alex") -> bool:
    """Whether torchvision's pretrained weights for lpips' backbone are in the torch.hub cache (no download)."""
    import os

    import torch.hub
    import torchvision.models as tvm

    if net not in _LPIPS_BACKBONE_WEIGHTS:
        raise ValueError(f"lpips net must be one of {', '.join(_LPIPS_BACKBONE_WEIGHTS)}, got {net!r}")
    url = getattr(tvm, _LPIPS_BACKBONE_WEIGHTS[net]).IMAGENET1K_V1.url
    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url)))


LPIPS_NETS = ("alex", "vgg", "squeeze")


def check_lpips_net(net: str, where: str) -> None:
    """Refuse an LPIPS backbone lpips does not have, naming the setting."""
    if net not in LPIPS_NETS:
        raise ValueError(f"{where} must be {' | '.join(LPIPS_NETS)}, got {net!r}")


def lpips_model(net: str = "alex", seed: int = 0) -> torch.nn.Module:
    """A frozen LPIPS module (inputs in [-1, 1]); ``.backbone_pretrained`` says whether its backbone is real.

    lpips' learned linear heads ship in the package, but the backbone comes from torchvision's download. Offline
    and uncached, the backbone is randomly initialised (seeded) and a warning says so: such LPIPS values compare
    runs made with the same model only, they are not the published metric.
    """
    import warnings

    import lpips

    check_lpips_net(net, "lpips_model's net")
    pretrained = lpips_backbone_cached(net)
    if not pretrained:
        warnings.warn(
            f"LPIPS: torchvision's {net} weights are not in the torch.hub cache ({torch.hub.get_dir()}); "
            "using a seeded RANDOM backbone (pnet_rand=True): values are comparable only within this setup",
            stacklevel=2,
        )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # torchvision's "pretrained= is deprecated" notices come from inside lpips; they are not ours to fix.
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        torch.manual_seed(seed)
        model = lpips.LPIPS(net=net, pnet_rand=not pretrained, verbose=False)
    model.eval().requires_grad_(False)
    model.backbone_pretrained = pretrained
    return model


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of two N x C x H x W batches in [-1, 1]: scikit-image with Wang et al.'s settings.

    Gaussian window sigma 1.5, population covariances, data range 2, mean over channels (``channel_axis``).
    """
    from skimage.metrics import structural_similarity

    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim expects two N x C x H x W batches of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    a = x.detach().float().cpu().numpy()
    b = y.detach().float().cpu().numpy()
    values = [
        structural_similarity(a[i], b[i], data_range=2.0, channel_axis=0, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False)
        for i in range(len(a))
    ]
    return torch.tensor(values, dtype=torch.float32)


def high_band(h: int, w: int, cutoff: float = 0.5) -> torch.Tensor:
    """Boolean h x w mask of the 2-D FFT bins with max(|f_y|, |f_x|) > cutoff * Nyquist (fftfreq layout)."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64).abs().view(-1, 1)  # cycles / px; Nyquist = 0.5
    fx = torch.fft.fftfreq(w, dtype=torch.float64).abs().view(1, -1)
    return torch.maximum(fy, fx) > cutoff * 0.5


def _spectral_energy(x: torch.Tensor) -> torch.Tensor:
    """N x H x W energy of the 2-D FFT, channels summed."""
    if x.dim() != 4:
        raise ValueError(f"expected N x C x H x W, got shape {tuple(x.shape)}")
    return torch.fft.fft2(x.double()).abs().pow(2).sum(1)


def hf_energy(x: torch.Tensor, cutoff: float = 0.5) -> torch.Tensor:
    """Per-image 2-D FFT energy (channels summed, per pixel) at max(|f_y|, |f_x|) > cutoff * Nyquist."""
    h, w = x.shape[-2:]
    energy = _spectral_energy(x) / (h * w)
    return (energy * high_band(h, w, cutoff)).flatten(1).sum(1) / (h * w)


def high_freq_share(x: torch.Tensor, cutoff: float = 0.5) -> torch.Tensor:
    """Per-sample share of 2-D FFT energy with max(|f_y|, |f_x|) > cutoff * Nyquist (NaN for an all-zero sample)."""
    energy = _spectral_energy(x)
    total = energy.flatten(1).sum(1)
    share = (energy * high_band(*x.shape[-2:], cutoff)).flatten(1).sum(1) / total
    return torch.where(total > 0, share, torch.full_like(share, float("nan"))).float()


def white_noise_hf_share(h: int, w: int, cutoff: float = 0.5) -> float:
    """The expected ``high_freq_share`` of white noise on an h x w grid (0.75 in the limit; less on tiny grids)."""
    return high_band(h, w, cutoff).double().mean().item()


def speckle_ratio(x: torch.Tensor, ref: torch.Tensor, cutoff: float = 0.5) -> torch.Tensor:
    """Per-image high-frequency energy of x relative to ref (the "speckle" statistic): 1 = as much fine detail as
    the reference, > 1 = extra grain / speckle, < 1 = blur.

    The default band (above half the HQ Nyquist frequency) is exactly what a 2x upscale must invent: an LQ image
    has no energy there.
    """
    return (hf_energy(x, cutoff) / hf_energy(ref, cutoff).clamp_min(1e-20)).float()


def haarpsi(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image HaarPSI (piq) of two N x 3 x H x W batches in [-1, 1]: a perceptual similarity in [0, 1] that needs
    no downloaded weights (Reisenhofer et al. 2018)."""
    import piq

    to01 = lambda t: ((t.detach().float() + 1) / 2).clamp(0, 1)  # noqa: E731
    return piq.haarpsi(to01(x), to01(y), data_range=1.0, reduction="none").float()


def colour_shift(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-image distance between the mean RGB colours of x and ref, in 8-bit levels (images in [-1, 1])."""
    return ((x.float().mean((2, 3)) - ref.float().mean((2, 3))) * 127.5).norm(dim=1)
