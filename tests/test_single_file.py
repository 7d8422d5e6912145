"""The original Wan 2.1 single-file layout: our writer is the exact inverse of diffusers' converter, and presets
load single files (original layout, .safetensors or weights-only pickles) offline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_diff

from ldlib.build import codec_of
from ldlib.models.codecs import WanCodec
from ldlib.models.single_file import LayoutError, original_wan_state_dict, published_config, save_original_wan
from ldlib.models.tiny import TINY_WAN21_VAE_CONFIG, TINY_WAN_VAE_CONFIG
from ldlib.presets import get_preset


def _tiny_wan21(seed: int = 0, **overrides):
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan(**{**TINY_WAN21_VAE_CONFIG, **overrides}).eval()


def _latents(n=1, h=4, w=6, seed=0):
    return torch.randn(n, 16, h, w, generator=torch.Generator().manual_seed(seed))


def test_converter_inverts_our_layout_tiny_2x():
    """diffusers' own converter applied to our file's state dict gives back ours, key for key, value for value."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    codec = WanCodec(_tiny_wan21()).to_2x()
    ours = codec.vae.state_dict()
    original = original_wan_state_dict(codec.vae)
    assert original["decoder.head.2.weight"].shape[0] == 12  # what ComfyUI reads to detect a 2x decoder
    assert "decoder.conv_out.weight" not in original and "conv2.weight" in original and "encoder.conv1.weight" in original
    back = convert_wan_vae_to_diffusers(dict(original))
    assert sorted(back) == sorted(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_converter_inverts_our_layout_full_size():
    """The published Wan 2.1 architecture (base_dim 96), on meta tensors: the key mapping only."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    with init_empty_weights():
        vae = AutoencoderKLWan(out_channels=12)
    original = original_wan_state_dict(vae)
    assert tuple(original["decoder.head.2.weight"].shape) == (12, 96, 3, 3, 3)
    # Keys the original Wan code names (decoder.upsamples is flat: 4 stages x 3 residual blocks + 3 resamples).
    for key in ("decoder.upsamples.14.residual.6.weight", "decoder.upsamples.11.resample.1.weight",
                "decoder.upsamples.3.time_conv.weight", "decoder.upsamples.4.shortcut.weight",
                "decoder.middle.1.to_qkv.weight", "encoder.downsamples.2.resample.1.weight", "conv1.weight"):
        assert key in original, key
    back = convert_wan_vae_to_diffusers(dict(original))
    assert sorted(back) == sorted(vae.state_dict())


def test_published_config_is_wan21():
    """The class defaults used as the offline config are the Wan 2.1 VAE's architecture (as ComfyUI hard-codes it)."""
    from diffusers import AutoencoderKLWan

    cfg = published_config(AutoencoderKLWan)
    assert (cfg["base_dim"], cfg["z_dim"], cfg["dim_mult"], cfg["num_res_blocks"], cfg["attn_scales"],
            cfg["temperal_downsample"]) == (96, 16, [1, 2, 4, 4], 2, [], [False, True, True])
    assert len(cfg["latents_mean"]) == len(cfg["latents_std"]) == 16


def test_refuses_a_config_the_converter_would_scramble():
    from diffusers import AutoencoderKLWan

    with pytest.raises(LayoutError, match="num_res_blocks"):
        original_wan_state_dict(AutoencoderKLWan(**TINY_WAN_VAE_CONFIG))  # the tiny preset: 1 residual block
    with pytest.raises(LayoutError, match="is_residual"):
        original_wan_state_dict(_tiny_wan21(is_residual=True))


def test_saved_file_loads_with_from_single_file_and_decodes_the_same(tmp_path):
    from diffusers import AutoencoderKLWan

    codec = WanCodec(_tiny_wan21()).to_2x()
    with torch.no_grad():
        codec.vae.decoder.conv_out.weight.add_(0.01 * torch.randn_like(codec.vae.decoder.conv_out.weight))
    folder = tmp_path / "cfg"
    codec.vae.save_config(folder)
    path = save_original_wan(codec.vae, tmp_path / "vae2x.safetensors")
    vae = AutoencoderKLWan.from_single_file(str(path), config=str(folder), local_files_only=True).eval()
    z = _latents()
    with torch.no_grad():
        expected = codec.decode(z)
        raw = codec.denormalise(z)
        got = F.pixel_shuffle(vae.decode(raw.unsqueeze(2)).sample.squeeze(2), 2)
    assert got.shape == expected.shape == (1, 3, 64, 96)
    assert rel_diff(got, expected) < 1e-4


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_preset_accepts_an_original_layout_file(tmp_path, suffix):
    from diffusers import AutoencoderKLWan

    vae = _tiny_wan21(seed=3)
    vae.save_config(tmp_path / "cfg")
    path = tmp_path / f"wan_2.1_vae{suffix}"
    if suffix == ".safetensors":
        save_original_wan(vae, path)
    else:
        torch.save(original_wan_state_dict(vae), path)  # read back with weights_only=True
    preset = get_preset("wan2.1-1.3b", vae=str(path), vae_config=str(tmp_path / "cfg"))
    assert preset.vae_subfolder is None
    codec = codec_of(preset)
    assert isinstance(codec.vae, AutoencoderKLWan) and codec.upscale == 1
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = WanCodec(vae)
    with torch.no_grad():
        assert rel_diff(codec.encode(x), ref.encode(x)) < 1e-5
        assert rel_diff(codec.decode(_latents()), ref.decode(_latents())) < 1e-5


def test_single_file_without_matching_config_says_what_to_pass(tmp_path):
    path = save_original_wan(_tiny_wan21(), tmp_path / "tiny.safetensors")
    # No --vae-config: the published Wan 2.1 config (base_dim 96) does not fit a tiny file.
    with pytest.raises(ValueError, match="--vae-config"):
        codec_of(get_preset("wan2.1-1.3b", vae=str(path)))
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken.safetensors"):
        codec_of(get_preset("wan2.1-1.3b", vae=str(bad)))


def test_single_file_pickles_are_read_weights_only(tmp_path):
    """A pickle holding anything but tensors is refused by torch's weights_only loader, with the file named."""
    import collections

    path = tmp_path / "evil.pth"
    torch.save({"decoder.head.2.weight": torch.zeros(3), "x": collections.Counter("abc")}, path)
    with pytest.raises(ValueError, match="evil.pth"):
        codec_of(get_preset("wan2.1-1.3b", vae=str(path)))
