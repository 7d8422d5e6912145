"""Shared fixtures: the real taef2 codec and a tiny pair set (both from ldlib's shipped assets), and small helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

from ldlib.build import codec_of


# Tests are small; two intra-op threads is what this project's CI machines have anyway.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def taef2_codec():
    """The real pretrained taef2 codec (the weights shipped in ldlib/assets/taef2)."""
    from ldlib.presets import get_preset

    return codec_of(get_preset("taef2"))


@pytest.fixture(scope="session")
def tiny_pairset(tmp_path_factory) -> dict:
    """A tiny-preset pair set built from the sample photos (2 crops each) with its latent cache: paths and codec."""
    from ldlib.core.samples import sample_photos
    from ldlib.data.latents import default_cache_dir, encode_pairs
    from ldlib.data.pairs import PairSpec, build_pairs
    from ldlib.presets import get_preset

    root = tmp_path_factory.mktemp("tiny_pairset")
    photos = sample_photos()
    pairs = root / "pairs"
    preset = get_preset("tiny")
    build_pairs(photos, pairs, PairSpec.from_preset(preset, crops_per_image=2), workers=1, progress=False)
    codec = codec_of(preset)
    latents = default_cache_dir(pairs, preset.name)
    encode_pairs(pairs, codec, latents, batch_size=8, progress=False, device="cpu")
    return {"photos": photos, "pairs": pairs, "latents": latents, "preset": preset, "codec": codec}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the largest |b|: a tolerance that does not depend on the values' scale.

    Two float32 computations of the same function that sum in another order (another CPU's kernels, batching)
    differ by a few float32 epsilons of the magnitudes involved, not by a fixed absolute amount.
    """
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-30)


def reduction_length(*modules: torch.nn.Module) -> int:
    """The longest dot product any conv or linear layer of the modules computes (its fan-in: in/groups x kernel)."""
    n = 1
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, torch.nn.modules.conv._ConvNd):
                n = max(n, layer.in_channels // layer.groups * int(torch.tensor(layer.kernel_size).prod()))
            elif isinstance(layer, torch.nn.Linear):
                n = max(n, layer.in_features)
    return n


def float32_bound(n: int) -> float:
    """Relative bound for two float32 computations of one function that sum length-n products in another order.

    Each sum's rounding error is at most n * u (u = eps / 2: Higham's gamma_n) of the magnitudes summed; two of
    them differ by up to twice that, n * eps, relative to the values' scale (rel_diff divides by max |b|).
    """
    return n * torch.finfo(torch.float32).eps


@contextmanager
def read_only_folder(path: Path) -> Iterator[Path]:
    """Make an existing folder unwritable for this process for the block (chmod; as root, chattr +i), or skip."""
    path = Path(path)
    mode = path.stat().st_mode
    path.chmod(0o555)
    immutable = False
    if os.access(path, os.W_OK) and shutil.which("chattr"):  # root ignores permission bits, not the immutable flag
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    if os.access(path, os.W_OK):
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(mode)
        pytest.skip("cannot make a folder read-only for this user here (root without chattr +i)")
    try:
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(mode)


def train_short_run(out, preset: str = "tiny", vae: str | None = None, count: int = 2, codec=None):
    """A real run folder: one decoder training step (lr 1e-3, no warm-up, EMA = live weights) on sampled pairs.

    Returns ``(run folder, the TensorPairs it trained on)``; LPIPS on its seeded random backbone (offline-safe).
    """
    import warnings

    from ldlib.core.metrics import lpips_model
    from ldlib.data.datasets import sample_tensor_pairs
    from ldlib.models.losses import DecoderLoss, LossConfig
    from ldlib.presets import get_preset
    from ldlib.train.decoder import TrainConfig, train_decoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lp = lpips_model("alex")
    codec = codec or codec_of(get_preset(preset, **({"vae": vae} if vae else {})))
    data = sample_tensor_pairs(codec, count=count, hq_size=32, seed=1)
    cfg = TrainConfig(preset=preset, vae=vae, steps=1, batch=count, warmup_steps=0, lr=1e-3, ema_decay=0.0,
                      val_every=100, val_count=1, loss=LossConfig(lpips_net="alex", gan_start=100))
    train_decoder(cfg, out, data, None, codec=codec, loss_fn=DecoderLoss(cfg.loss, lpips=lp))
    return out, data
