"""Image mode of the Wan VAE (ldlib.models.wan_image) against diffusers' own AutoencoderKLWan encode/decode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldlib.models import wan_image
from ldlib.models.codecs import WanCodec
from ldlib.models.tiny import TINY_WAN_VAE_CONFIG
from ldlib.presets import get_preset


diffusers = pytest.importorskip("diffusers")
AutoencoderKLWan = diffusers.AutoencoderKLWan

from conftest import rel_diff

from ldlib.build import codec_of


# float32 results of the same function summed in another order agree to a few float32 epsilons of their scale:
# 1e-4 relative leaves two orders of magnitude for other CPUs' kernels; a wrong path differs by O(1).
TOL = 1e-4


def _vae(seed: int = 0, **config) -> AutoencoderKLWan:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan(**config).eval()


def _images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _latents(n: int, hw: int, seed: int = 2, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, hw, hw, generator=g) * scale


def _diffusers_encode(vae, x: torch.Tensor) -> torch.Tensor:
    """Raw posterior mode from diffusers' public encode (video layout, one frame)."""
    return vae.encode(x.unsqueeze(2)).latent_dist.mode().squeeze(2)


def _diffusers_decode(vae, z: torch.Tensor) -> torch.Tensor:
    """diffusers' public decode (clamped to [-1, 1]) of raw latents, one frame."""
    return vae.decode(z.unsqueeze(2)).sample.squeeze(2)


def _assert_matches_diffusers(vae, size: int, batch: int = 2) -> None:
    x = _images(batch, size)
    z = _latents(batch, size // 8)
    with torch.no_grad():
        ref_z = _diffusers_encode(vae, x)
        ours_z = wan_image.encode_mode(vae, x)
        ref_x = _diffusers_decode(vae, z)
        ours_x = wan_image.decode(vae, z)
    assert ours_z.shape == ref_z.shape == (batch, 16, size // 8, size // 8)
    assert rel_diff(ours_z, ref_z) <= TOL
    assert ours_x.shape == ref_x.shape == (batch, 3, size, size)
    assert rel_diff(ours_x.clamp(-1, 1), ref_x) <= TOL
    assert ref_z.abs().max() > 1e-2 and ref_x.abs().max() > 1e-2  # not a trivially zero comparison


def test_tiny_preset_encode_decode_match_diffusers():
    vae = codec_of(get_preset("tiny")).vae
    _assert_matches_diffusers(vae, 64)


def test_residual_variant_matches_diffusers():
    # Wan 2.2-style residual down/up blocks (AvgDown3D / DupUp3D shortcuts, first_chunk handling).
    _assert_matches_diffusers(_vae(3, **TINY_WAN_VAE_CONFIG, is_residual=True), 64)


def test_full_size_default_config_matches_diffusers():
    # The real Wan 2.1 VAE architecture (default AutoencoderKLWan config), random seeded weights, small images.
    _assert_matches_diffusers(_vae(0), 32, batch=1)


def test_codec_image_mode_matches_diffusers_path_and_normalisation():
    vae = _vae(0, **TINY_WAN_VAE_CONFIG)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(8.0)  # random weights decode to small values; push some past +-1
    img, ref = WanCodec(vae), WanCodec(vae, image_mode=False)
    assert img.image_mode and not ref.image_mode
    x = _images(2, 64)
    z = _latents(2, 8, scale=3.0)
    with torch.no_grad():
        lat = img.encode(x)
        # Normalisation checked independently: (mode - mean) / std from the config.
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
        assert rel_diff(lat, (_diffusers_encode(vae, x) - mean) / std) <= TOL
        assert rel_diff(lat, ref.encode(x)) <= TOL
        raw, raw_ref = img.decode(z, clamp=False), ref.decode(z, clamp=False)
        clamped = img.decode(z)
    assert rel_diff(raw, raw_ref) <= TOL
    assert raw.abs().max() > 1.0  # clamp=False really returns the unclamped output
    assert torch.equal(clamped, raw.clamp(-1, 1))
    assert rel_diff(clamped, _diffusers_decode(vae, z * std + mean)) <= TOL


def test_decoder_gradients_match_diffusers_path():
    # float64: both paths compute the same function, so they agree to double precision whatever the CPU's kernels.
    codec = WanCodec(_vae(0, **TINY_WAN_VAE_CONFIG)).to_2x().double()
    ref = WanCodec(codec.vae, image_mode=False)  # the same parameters, diffusers' forward
    codec.vae.decoder.train()  # training mode, as the training loop runs it
    z = _latents(1, 8, scale=2.0).double()
    target = _images(1, 128, seed=5).double()
    params = [p for p in codec.decoder_parameters()]

    def grads(c: WanCodec) -> list[torch.Tensor | None]:
        out = c.decode(z, clamp=False)
        loss = (out - target).abs().mean() + out.pow(2).mean()
        return list(torch.autograd.grad(loss, params, allow_unused=True))

    g_img, g_ref = grads(codec), grads(ref)
    # Unused in both paths: the upsample3d time_convs, which diffusers skips on the first (only) chunk.
    unused = [i for i, g in enumerate(g_ref) if g is None]
    assert unused == [i for i, g in enumerate(g_img) if g is None]
    assert len(params) - len(unused) > 10
    for p, a, b in zip(params, g_img, g_ref):
        if b is None:
            continue
        assert a.shape == p.shape
        assert rel_diff(a, b) <= 1e-9
    # The widened head's weight gets a gradient on its data tap (and exactly zero on the zero-padded taps).
    w = codec.conv_out.weight
    gw = g_img[[i for i, p in enumerate(params) if p is w][0]]
    assert gw[:, :, -1].abs().sum() > 0 and torch.equal(gw[:, :, :-1], torch.zeros_like(gw[:, :, :-1]))


def test_to_2x_is_nearest_upsample_and_export_roundtrip(tmp_path):
    codec = WanCodec(_vae(0, **TINY_WAN_VAE_CONFIG))
    codec2 = codec.to_2x()
    assert codec2.image_mode and codec2.upscale == 2
    z = _latents(1, 8, scale=2.0)
    with torch.no_grad():
        # float64: a 12- and a 3-channel conv may take different kernels (sums in another order) on other CPUs.
        one = codec.double().decode(z.double(), clamp=False)
        two = codec2.double().decode(z.double(), clamp=False)
    codec2.float()  # back to float32 (exactly the same weights) for the export below
    assert two.shape == (1, 3, 128, 128)
    assert rel_diff(two, F.interpolate(one, scale_factor=2, mode="nearest")) <= 1e-12
    codec2.save_pretrained(tmp_path / "vae2x")
    loaded = AutoencoderKLWan.from_pretrained(tmp_path / "vae2x").eval()
    assert loaded.config.out_channels == 12
    with torch.no_grad():
        theirs = F.pixel_shuffle(_diffusers_decode(loaded, codec2.denormalise(z)), 2)
        ours = codec2.decode(z)
    assert rel_diff(ours, theirs) <= TOL


def test_unsupported_config_raises_clear_error():
    vae = _vae(0, **dict(TINY_WAN_VAE_CONFIG, patch_size=2))
    with pytest.raises(ValueError, match="patch_size"):
        WanCodec(vae).encode(_images(1, 32))
    with pytest.raises(ValueError, match="patch_size"):
        wan_image.decode(vae, _latents(1, 4))
    with pytest.raises(ValueError, match="N x C x h x w"):
        wan_image.decode(_vae(0, **TINY_WAN_VAE_CONFIG), _latents(1, 4).unsqueeze(2))


def test_codec_and_train_benches_smoke(tmp_path, monkeypatch):
    # The benches' plumbing at tiny size (the real runs use the full-size config: `python -m ldlib bench codec`).
    import functools
    import json

    from ldlib.apps import bench

    for name, size in (("codec", {"size": 64}), ("train-wan", {"hq": 64})):
        small = functools.partial(bench.BENCHES[name], vae_config=TINY_WAN_VAE_CONFIG, **size)
        monkeypatch.setitem(bench.BENCHES, name, small)
    results = bench.run_benches("codec", tmp_path, quick=True)
    results.update(bench.run_benches("train-wan", tmp_path, quick=True))
    for name in ("codec", "train-wan"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["rows"] == results[name]["rows"]
        assert "speed-up" in (tmp_path / f"{name}.md").read_text()
    codec_rows = results["codec"]["rows"]
    assert [r["variant"] for r in codec_rows] == ["diffusers", "image mode"] * 2
    assert all(r["wall_s"] > 0 and r["max_rel_diff"] <= TOL for r in codec_rows)
    assert all(v > 0 for v in results["codec"]["ratios"].values())
    train = results["train-wan"]
    assert [r["variant"] for r in train["rows"]] == ["diffusers", "image mode"]
    # float32 backward through the whole decoder and LPIPS, summed in another order: the two paths agree to a small
    # fraction of the largest gradient (0.1% seen on one CPU type); a wrong path differs by O(1). The exact check
    # is test_decoder_gradients_match_diffusers_path, in float64.
    assert train["gradient_check"]["max_abs_diff"] <= 1e-2 * train["gradient_check"]["largest_gradient"]
    assert train["gradient_check"]["largest_gradient"] > 0
