"""codecs.py: encode/decode per family against diffusers itself, normalisation, the 2x head, export and reload."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_diff
from diffusers import AutoencoderKL, AutoencoderKLWan

from ldlib.core.images import area_downsample, load_image
from ldlib.core.metrics import psnr
from ldlib.core.samples import sample_paths
from ldlib.models.codecs import (KLCodec, TAECodec, WanCodec, fit_head_2x, load_codec, tae_decoder, tae_encoder,
                                 upscale_of, widen_conv_out)
from ldlib.models.tiny import tiny_wan_vae


ATOL = 1e-4  # float32; the wan codec may compute the same function with 2-D convs


def _images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _tiny_kl(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.5,
        shift_factor=0.1,
    ).eval()


@pytest.fixture(scope="module")
def wan() -> WanCodec:
    return WanCodec(tiny_wan_vae(0), source="tiny")


@pytest.fixture(scope="module")
def kl() -> KLCodec:
    return KLCodec(_tiny_kl(), source="tiny-kl")


def _random_tae(latent_channels: int = 4, pooled_enc=(), pooled_dec=(), seed: int = 0) -> TAECodec:
    torch.manual_seed(seed)
    return TAECodec(tae_encoder(latent_channels, pooled_enc, width=16), tae_decoder(latent_channels, pooled_dec, width=16))


# --- wan ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_wan_encode_matches_diffusers_mode_normalised(wan):
    x = _images()
    z = wan.encode(x)
    assert z.shape == (2, 16, 4, 4)
    raw = wan.vae.encode(x.unsqueeze(2)).latent_dist.mode().squeeze(2)
    mean = np.array(wan.vae.config.latents_mean).reshape(1, -1, 1, 1)
    std = np.array(wan.vae.config.latents_std).reshape(1, -1, 1, 1)
    np.testing.assert_allclose(z.numpy(), (raw.numpy() - mean) / std, atol=ATOL, rtol=1e-5)


@torch.no_grad()
def test_wan_decode_matches_diffusers(wan):
    z = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    y = wan.decode(z)
    assert y.shape == (2, 3, 32, 32)
    mean = torch.tensor(wan.vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(wan.vae.config.latents_std).view(1, -1, 1, 1)
    ref = wan.vae.decode((z * std + mean).unsqueeze(2)).sample.squeeze(2)  # diffusers' own (clamped) decode
    torch.testing.assert_close(y, ref, atol=ATOL, rtol=0)


def test_wan_decode_unclamped_has_gradient_where_saturated(wan):
    codec = copy.deepcopy(wan)
    with torch.no_grad():
        codec.conv_out.bias[0] += 5.0  # push the red channel far above 1: every red pixel saturates
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(4))
    raw = codec.decode(z, clamp=False)
    assert raw[:, 0].min() > 1
    raw[:, 0].sum().backward()
    assert codec.conv_out.bias.grad[0] == raw[:, 0].numel()  # d(sum)/d(bias) = number of pixels
    codec.zero_grad()
    codec.decode(z, clamp=True)[:, 0].sum().backward()
    assert codec.conv_out.bias.grad[0] == 0  # the clamp kills the gradient: why training uses clamp=False
    torch.testing.assert_close(codec.decode(z).detach(), raw.detach().clamp(-1, 1))


def test_normalisation_round_trip_and_formula(wan, kl):
    z = torch.randn(3, 16, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(wan.denormalise(wan.normalise(z.float())), z.float(), atol=1e-5, rtol=1e-5)
    mean = torch.tensor(wan.vae.config.latents_mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(wan.vae.config.latents_std, dtype=torch.float64).view(1, -1, 1, 1)
    torch.testing.assert_close(wan.normalise(z.float()).double(), (z - mean) / std, atol=1e-5, rtol=1e-5)
    z4 = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(kl.normalise(z4), (z4 - 0.1) * 0.5)
    torch.testing.assert_close(kl.denormalise(kl.normalise(z4)), z4, atol=1e-6, rtol=1e-6)


# --- kl ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_kl_encode_decode_match_diffusers(kl):
    x = _images()
    z = kl.encode(x)
    assert z.shape == (2, 4, 4, 4)
    torch.testing.assert_close(z, (kl.vae.encode(x).latent_dist.mode() - 0.1) * 0.5, atol=1e-6, rtol=1e-6)
    y = kl.decode(z, clamp=False)
    torch.testing.assert_close(y, kl.vae.decode(z / 0.5 + 0.1).sample, atol=1e-6, rtol=1e-6)
    assert kl.decode(z).abs().max() <= 1


# --- tae ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooled", [False, True])
def test_tae_files_round_trip_and_images_in_unit_range(tmp_path, pooled):
    enc_pool, dec_pool = ((11, 12, 13), (3, 4, 5)) if pooled else ((), ())
    codec = _random_tae(4, enc_pool, dec_pool)
    # Default width: from_files reads TAESD's 64-wide layout; write a 64-wide pair the way TAESD ships them.
    torch.manual_seed(1)
    enc, dec = tae_encoder(4, enc_pool), tae_decoder(4, dec_pool)
    torch.save(enc.state_dict(), tmp_path / "x_encoder.pth")
    torch.save(dec.state_dict(), tmp_path / "x_decoder.pth")
    loaded = load_codec("tae", tmp_path)
    assert loaded.latent_channels == 4
    x = _images(1, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), enc((x + 1) / 2))  # TAESD sees [0, 1] images
        z = torch.randn(1, 4, 4, 4)
        torch.testing.assert_close(loaded.decode(z, clamp=False), dec(z) * 2 - 1)
    assert codec.latent_channels == 4


def test_tae_bad_state_dict_names_the_file(tmp_path):
    torch.save({"nonsense": torch.zeros(1)}, tmp_path / "a_encoder.pth")
    torch.save(tae_decoder(4).state_dict(), tmp_path / "a_decoder.pth")
    with pytest.raises(ValueError, match="a_encoder.pth"):
        load_codec("tae", tmp_path)


# --- the 2x head -------------------------------------------------------------------------------------------------


def test_widen_conv_out_is_nearest_upsample():
    conv = torch.nn.Conv2d(5, 3, 3, padding=1)
    wide = widen_conv_out(conv, 2)
    assert wide.out_channels == 12 and conv.out_channels == 3
    x = torch.randn(2, 5, 6, 7)
    with torch.no_grad():
        torch.testing.assert_close(F.pixel_shuffle(wide(x), 2), F.interpolate(conv(x), scale_factor=2, mode="nearest"))
    assert upscale_of(12) == 2 and upscale_of(3) == 1
    with pytest.raises(ValueError):
        upscale_of(10)


@pytest.mark.parametrize("name", ["wan", "kl", "tae"])
@torch.no_grad()
def test_2x_head_initially_equals_nearest_upsample(name, wan, kl):
    # float64 copies: a 12- and a 3-channel conv may take different kernels (sums in another order) on other CPUs.
    codec = copy.deepcopy({"wan": wan, "kl": kl, "tae": _random_tae()}[name]).double()
    z = torch.randn(2, codec.latent_channels, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    one = codec.decode(z)
    two = codec.to_2x()
    assert two.upscale == 2 and codec.upscale == 1  # the original is untouched
    out = two.decode(z)
    assert out.shape == (2, 3, 64, 64)
    assert rel_diff(out, F.interpolate(one, scale_factor=2, mode="nearest")) <= 1e-12


def test_2x_head_on_taef2(taef2_codec):
    codec = copy.deepcopy(taef2_codec).double()  # float64: see test_2x_head_initially_equals_nearest_upsample
    z = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        assert rel_diff(codec.to_2x().decode(z), F.interpolate(codec.decode(z), scale_factor=2)) <= 1e-12


# --- least-squares head ------------------------------------------------------------------------------------------


def _last_tap(w: torch.Tensor) -> torch.Tensor:
    """The kernel an image (T=1) meets: a Wan Conv3d's last temporal tap, a Conv2d's whole kernel."""
    return w[:, :, -1] if w.dim() == 5 else w


@pytest.mark.parametrize("name", ["wan", "kl", "tae"])
@torch.no_grad()
def test_least_squares_head_recovers_a_head_that_made_hq(name, wan, kl):
    # HQ made by a known 12-channel head on the decoder's own features is fitted exactly (a closed form: the fit
    # must return that head), for every family's conv and output affine (TAE's x * 2 - 1, Wan's causal Conv3d).
    codec = copy.deepcopy({"wan": wan, "kl": kl, "tae": _random_tae()}[name]).double()
    truth = codec.to_2x()
    g = torch.Generator().manual_seed(5)
    truth.conv_out.weight.copy_(torch.randn(truth.conv_out.weight.shape, generator=g, dtype=torch.float64) * 0.1)
    truth.conv_out.bias.copy_(torch.randn(12, generator=g, dtype=torch.float64) * 0.1)
    z = torch.randn(6, codec.latent_channels, 4, 4, generator=g, dtype=torch.float64)
    hq = truth.decode(z, clamp=False)
    # A ridge far below float64's noise: the random TAE's ReLUs leave some features dead (all zero), whose weights
    # no data determines; they are left at 0 and change no output.
    weight, bias = fit_head_2x(codec, [(z[:4], hq[:4]), (z[4:], hq[4:])], ridge=1e-12)
    assert weight.shape == truth.conv_out.weight.shape
    if name != "tae":
        assert rel_diff(_last_tap(weight), _last_tap(truth.conv_out.weight)) < 1e-6
        assert rel_diff(bias, truth.conv_out.bias) < 1e-6
    fitted = codec.to_2x("least-squares", [(z, hq)], ridge=1e-12)
    assert rel_diff(fitted.decode(z, clamp=False), hq) < 1e-6
    assert codec.upscale == 1  # the 1x codec is untouched


@torch.no_grad()
def test_least_squares_head_matches_numpy_ridge_regression():
    # An independent computation: the last conv's input taken with a forward hook, 3x3 neighbourhoods cut with
    # numpy, the ridge normal equations solved by numpy against pixel_unshuffle of HQ mapped into [0, 1]. A float64
    # codec: the fit's products are in the decoder's precision, which is then the only rounding either side.
    codec = _random_tae().double()
    g = torch.Generator().manual_seed(7)
    z = torch.randn(3, 4, 4, 4, generator=g)
    hq = torch.rand(3, 3, 64, 64, generator=g, dtype=torch.float64) * 2 - 1
    ridge = 1e-2
    weight, bias = fit_head_2x(codec, [(z, hq)], ridge=ridge)

    captured = []
    handle = codec.conv_out.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].double().numpy()))
    codec.decode(z)
    handle.remove()
    feats = np.pad(captured[0], ((0, 0), (0, 0), (1, 1), (1, 1)))
    n, c, h, w = captured[0].shape
    cols = [feats[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)]  # tap (i, j) of channel ch
    x = np.stack(cols, axis=2).reshape(n, c * 9, h, w).transpose(0, 2, 3, 1).reshape(-1, c * 9)
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    target = (F.pixel_unshuffle(hq.double(), 2).numpy() + 1) / 2  # TAE decodes conv_out * 2 - 1
    y = target.transpose(0, 2, 3, 1).reshape(-1, 12)
    gram = x.T @ x
    gram += np.eye(len(gram)) * ridge * np.diag(gram).mean()
    sol = np.linalg.solve(gram, x.T @ y)
    expected_w = sol[:-1].T.reshape(12, c, 3, 3)
    assert rel_diff(weight, torch.from_numpy(expected_w)) < 1e-9
    assert rel_diff(bias, torch.from_numpy(sol[-1])) < 1e-9


@torch.no_grad()
def test_least_squares_head_beats_nearest_on_real_photos(taef2_codec):
    # taef2 on a real photo: the fitted head's 2x decode is closer to HQ than the nearest start, on the crops it was
    # fitted on and on other crops of the photo.
    photo = load_image(sample_paths()[0])
    hq = area_downsample(photo[..., : photo.shape[-2] // 256 * 256, : photo.shape[-1] // 256 * 256], 2)
    crops = torch.cat([hq[..., i:i + 128, j:j + 128] for i in range(0, 256, 128) for j in range(0, 384, 128)], 0)
    z = taef2_codec.encode(area_downsample(crops, 2))
    fitted = taef2_codec.to_2x("least-squares", [(z[:3], crops[:3])])
    nearest = taef2_codec.to_2x()
    for part in (slice(0, 3), slice(3, 6)):
        assert psnr(fitted.decode(z[part]), crops[part]).mean() > psnr(nearest.decode(z[part]), crops[part]).mean()


def test_to_2x_refuses_unknown_init_and_missing_data(wan):
    with pytest.raises(ValueError, match="one of nearest, least-squares"):
        wan.to_2x("bicubic")
    with pytest.raises(ValueError, match="fit_data"):
        wan.to_2x("least-squares")
    with pytest.raises(ValueError, match="1x codec"):
        fit_head_2x(wan.to_2x(), [])


# --- export / reload ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_wan_2x_export_loads_in_diffusers_and_matches(tmp_path, wan):
    two = wan.to_2x()
    with torch.no_grad():  # make the head differ from a plain repeat so the test sees real weights
        two.conv_out.weight.add_(torch.randn_like(two.conv_out.weight) * 0.01)
    two.save_pretrained(tmp_path / "vae2x")
    vae = AutoencoderKLWan.from_pretrained(tmp_path / "vae2x")
    assert vae.config.out_channels == 12
    z = torch.randn(1, 16, 4, 4)
    ours = two.decode(z)
    theirs = F.pixel_shuffle(vae.decode(two.denormalise(z).unsqueeze(2)).sample.squeeze(2), 2)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    reloaded = load_codec("wan", tmp_path / "vae2x")
    assert reloaded.upscale == 2
    torch.testing.assert_close(reloaded.decode(z), ours, atol=ATOL, rtol=0)
    # The encoder side is unchanged by the 2x head.
    assert reloaded.identity()["encoder_sha256"] == wan.identity()["encoder_sha256"]


@torch.no_grad()
def test_kl_and_pipeline_folder_loading(tmp_path, kl):
    kl.to_2x().save_pretrained(tmp_path / "pipe" / "vae")  # a pipeline folder keeps its VAE under vae/
    reloaded = load_codec("kl", tmp_path / "pipe")
    assert reloaded.upscale == 2
    z = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(reloaded.decode(z), kl.to_2x().decode(z), atol=1e-6, rtol=0)


@torch.no_grad()
def test_tae_2x_save_and_reload(tmp_path):
    two = _random_tae().to_2x()
    two.save_pretrained(tmp_path / "tae2x")
    reloaded = load_codec("tae", tmp_path / "tae2x")
    assert reloaded.upscale == 2
    z = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(reloaded.decode(z), two.decode(z))


@torch.no_grad()
def test_tae_2x_decoder_alone_in_float16_reloads_beside_its_encoder(tmp_path):
    two = _random_tae().to_2x()
    two.save_pretrained(tmp_path / "vae")  # the VAE's own folder: where the encoder lives
    two.save_pretrained(tmp_path / "dec", decoder_only=True, dtype=torch.float16)
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == ["config.json", "decoder.safetensors"]
    with pytest.raises(FileNotFoundError, match=r"dec: no \*encoder.*nor in"):
        TAECodec.from_folder(tmp_path / "dec", encoder_folder=tmp_path / "dec")
    reloaded = TAECodec.from_folder(tmp_path / "dec", encoder_folder=tmp_path / "vae")
    # Independent expectation: the same decoder with each weight rounded to float16 and back.
    rounded = copy.deepcopy(two)
    for p in rounded.decoder.parameters():
        p.copy_(p.half().float())
    assert reloaded.identity()["encoder_sha256"] == two.identity()["encoder_sha256"]
    z = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(reloaded.decode(z), rounded.decode(z), atol=1e-6, rtol=0)


def test_identity_tracks_encoder_weights(wan):
    other = WanCodec(tiny_wan_vae(1), source="tiny")
    assert wan.identity() == WanCodec(tiny_wan_vae(0), source="tiny").identity()
    assert wan.identity()["encoder_sha256"] != other.identity()["encoder_sha256"]


def test_bad_shapes_are_clear_errors(wan):
    with pytest.raises(ValueError, match="multiple of 8"):
        wan.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="16 x h x w"):
        wan.decode(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="unknown codec family"):
        load_codec("vqgan", "x")


# --- real weights ------------------------------------------------------------------------------------------------


def test_taef2_reconstructs_a_real_photo_above_30db(taef2_codec):
    from ldlib.core.samples import sample_photos

    x = load_image(sample_photos() / "p06_fur_dog.jpg")
    lq = area_downsample(x[..., 1800:2824, 1200:2224], 4)  # the recipe: 0.5x, 512 crop, 0.5x -> 256 LQ
    with torch.no_grad():
        rec = taef2_codec.decode(taef2_codec.encode(lq))
    value = psnr(rec, lq).item()
    assert value > 30.0, f"taef2 round-trip PSNR {value:.2f} dB"
