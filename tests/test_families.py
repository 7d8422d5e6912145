"""More VAE families as presets (Qwen-Image, FLUX.2, FLUX.1, SDXL): tiny models saved with save_pretrained and
loaded through the preset, checked against diffusers' own modules and the pipelines' normalisation; the 2x head;
a training step; export and reload."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import float32_bound, reduction_length, rel_diff, train_short_run

from ldlib.build import codec_of
from ldlib.models.tiny import TINY_WAN21_VAE_CONFIG
from ldlib.presets import get_preset


KL_TINY = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def _save_tiny(kind: str, folder) -> None:
    """A seeded tiny diffusers VAE of each family, written with save_pretrained."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage

    torch.manual_seed(0)
    if kind == "qwen-image":
        vae = AutoencoderKLQwenImage(**TINY_WAN21_VAE_CONFIG)
    elif kind == "flux2":
        vae = AutoencoderKLFlux2(latent_channels=8, **KL_TINY)
        vae.bn.running_mean.normal_()  # the real VAE's statistics are far from (0, 1): make the test see them
        vae.bn.running_var.uniform_(0.5, 2.0)
    elif kind == "flux1":
        vae = AutoencoderKL(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, **KL_TINY)
    else:  # sdxl
        vae = AutoencoderKL(latent_channels=4, scaling_factor=0.13025, **KL_TINY)
    vae.eval().save_pretrained(folder)


def _expected_normalised(kind: str, vae, images: torch.Tensor) -> torch.Tensor:
    """What the family's diffusers pipeline does to encode an image (its own code or its formula)."""
    cfg = vae.config
    if kind == "qwen-image":  # QwenImage img2img: argmax latents, (z - mean) / std with the config's lists
        z = vae.encode(images.unsqueeze(2)).latent_dist.mode()[:, :, 0]
        return (z - torch.tensor(cfg.latents_mean).view(1, -1, 1, 1)) / torch.tensor(cfg.latents_std).view(1, -1, 1, 1)
    z = vae.encode(images).latent_dist.mode()
    if kind == "flux2":  # Flux2Pipeline._encode_vae_image, then back to 32 channels with its own unpatchify
        from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

        p = Flux2Pipeline._patchify_latents(z)
        p = (p - vae.bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + cfg.batch_norm_eps)
        return Flux2Pipeline._unpatchify_latents(p)
    if kind == "flux1":  # FluxPipeline: (z - shift_factor) * scaling_factor
        return (z - cfg.shift_factor) * cfg.scaling_factor
    return z * cfg.scaling_factor  # SDXL


def _load_diffusers(kind: str, folder):
    from diffusers import AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage

    cls = {"qwen-image": AutoencoderKLQwenImage, "flux2": AutoencoderKLFlux2}.get(kind, AutoencoderKL)
    return cls.from_pretrained(folder).eval()


FAMILY = {"qwen-image": "qwenimage", "flux2": "flux2", "flux1": "kl", "sdxl": "kl"}


@pytest.mark.parametrize("kind", ["qwen-image", "flux2", "flux1", "sdxl"])
def test_preset_codec_matches_diffusers_and_its_pipeline(kind, tmp_path):
    _save_tiny(kind, tmp_path / "vae")
    preset = get_preset(kind, vae=str(tmp_path / "vae"))
    assert preset.family == FAMILY[kind] and preset.vae_subfolder is None
    codec = codec_of(preset)
    vae = _load_diffusers(kind, tmp_path / "vae")
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    # Another implementation of the same convolutions sums in another order (this CPU's kernels, 2-D vs 3-D):
    # the bound is float32's for the longest dot product in the VAE, relative to the values' scale.
    bound = float32_bound(reduction_length(vae))
    with torch.no_grad():
        z = codec.encode(x)
        expected = _expected_normalised(kind, vae, x)
        assert z.shape == expected.shape and z.shape[-2:] == (4, 6)
        assert rel_diff(z, expected) < bound
        y = codec.decode(z)
        if kind == "qwen-image":
            raw = z * torch.tensor(vae.config.latents_std).view(1, -1, 1, 1) + torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
            ref = vae.decode(raw.unsqueeze(2)).sample[:, :, 0]
        else:
            ref = vae.decode(codec.denormalise(z)).sample.clamp(-1, 1)
        assert rel_diff(y, ref) < bound
        # denormalise inverts normalise (the decode side of the pipelines)
        assert rel_diff(codec.denormalise(z), codec.denormalise(expected)) < bound
        # the 2x head: untrained, it is exactly the nearest-neighbour upsample of the 1x decode
        two = codec.to_2x()
        assert two.upscale == 2 and two.conv_out.out_channels == 12
        assert rel_diff(two.decode(z), F.interpolate(y, scale_factor=2, mode="nearest")) < 1e-6


def test_qwen_image_mode_is_exact_both_ways(tmp_path):
    """ldlib's 2-D image mode on AutoencoderKLQwenImage equals diffusers' own 3-D path for one frame."""
    from ldlib.models.codecs import QwenImageCodec

    _save_tiny("qwen-image", tmp_path / "vae")
    vae = _load_diffusers("qwen-image", tmp_path / "vae")
    fast, slow = QwenImageCodec(vae, image_mode=True), QwenImageCodec(vae, image_mode=False)
    x = torch.rand(1, 3, 40, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    bound = float32_bound(reduction_length(vae))  # 2-D and 3-D convolutions sum in another order
    with torch.no_grad():
        z = slow.encode(x)
        assert rel_diff(fast.encode(x), z) < bound
        assert rel_diff(fast.decode(z, clamp=False), slow.decode(z, clamp=False)) < bound


@pytest.mark.parametrize("kind", ["qwen-image", "flux2", "sdxl"])
def test_train_export_reload(kind, tmp_path):
    """One training step through the preset, export (default formats), reload with diffusers alone: same decode."""
    from diffusers import AutoencoderKLWan

    from ldlib.apps.export import export_run
    from ldlib.build import load_run_codec
    from ldlib.models.single_file import read_state_dict

    _save_tiny(kind, tmp_path / "vae")
    codec = codec_of(get_preset(kind, vae=str(tmp_path / "vae")))
    _, data = train_short_run(tmp_path / "run", kind, str(tmp_path / "vae"), count=1, codec=codec)
    out = export_run(tmp_path / "run", tmp_path / "export")
    info = json.loads((out / "ldlib_export.json").read_text())
    ours, _ = load_run_codec(tmp_path / "run")
    z = data.latents
    with torch.no_grad():
        expected = ours.decode(z)
        assert rel_diff(expected, codec.to_2x().decode(z)) > 1e-4  # trained weights, not the widened init
        if kind == "qwen-image":
            assert info["formats"] == ["diffusers", "wan"]
            vae = AutoencoderKLWan.from_pretrained(out).eval()  # Qwen's 2x decoder is saved as AutoencoderKLWan
            assert vae.config.out_channels == 12 and vae.config.latents_mean == codec.vae.config.latents_mean
            single = AutoencoderKLWan.from_single_file(str(out / info["files"][-1]), config=str(out)).eval()
            raw = ours.denormalise(z).unsqueeze(2)
            for v in (vae, single):
                assert rel_diff(F.pixel_shuffle(v.decode(raw).sample[:, :, 0], 2), expected) < 1e-4
            assert read_state_dict(out / info["files"][-1])["decoder.head.2.weight"].shape[0] == 12
            reloaded = codec_of(get_preset(kind, vae=str(tmp_path / "vae")))  # and ldlib reads the export back
            from ldlib.build import load_decoder

            back, _ = load_decoder(out, get_preset(kind, vae=str(tmp_path / "vae")))
            assert rel_diff(back.decode(z), expected) < 1e-5 and reloaded.upscale == 1
        else:
            assert info["formats"] == ["diffusers"]
            vae = _load_diffusers(kind, out)
            assert vae.config.out_channels == 12
            got = F.pixel_shuffle(vae.decode(ours.denormalise(z)).sample, 2).clamp(-1, 1)
            assert rel_diff(got, expected) < 1e-4
