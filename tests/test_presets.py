"""presets.py: lookup, tiny models are seeded, taef2 path resolution, and the real from_pretrained loading path."""

from __future__ import annotations

import pytest
import torch

from ldlib.build import codec_of, transformer_of
from ldlib.models.tiny import tiny_wan_transformer, tiny_wan_vae
from ldlib.presets import PRESETS, TAEF2_ENV, get_preset, taef2_dir


def test_every_named_preset_resolves(monkeypatch, tmp_path):
    (tmp_path / "taef2_encoder.pth").write_bytes(b"")
    monkeypatch.setenv(TAEF2_ENV, str(tmp_path))
    for name in PRESETS:
        p = get_preset(name)
        assert p.name == name and p.family in ("wan", "kl", "tae", "qwenimage", "flux2")
        assert p.lq_size * p.lq_factor == p.hq_size
    assert get_preset("wan2.1-1.3b").vae == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert get_preset("wan2.1-14b").transformer_subfolder == "transformer"
    assert get_preset("tiny", hq_size=256).hq_size == 256
    # the hub ids the README's presets table names
    hub = {n: (get_preset(n).vae, get_preset(n).vae_subfolder) for n in ("qwen-image", "flux2", "flux1", "sdxl")}
    assert hub == {"qwen-image": ("Qwen/Qwen-Image", "vae"), "flux2": ("black-forest-labs/FLUX.2-dev", "vae"),
                   "flux1": ("black-forest-labs/FLUX.1-schnell", "vae"),
                   "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "vae")}


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset 'sd15'.*tiny"):
        get_preset("sd15")


def test_taef2_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(TAEF2_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=TAEF2_ENV):
        taef2_dir()
    (tmp_path / "taef2_encoder.pth").write_bytes(b"")
    monkeypatch.setenv(TAEF2_ENV, str(tmp_path))
    assert taef2_dir() == tmp_path
    assert taef2_dir(tmp_path) == tmp_path  # an explicit argument wins


def test_tiny_models_are_seeded():
    a, b, c = tiny_wan_vae(0), tiny_wan_vae(0), tiny_wan_vae(1)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.decoder.conv_out.weight, c.decoder.conv_out.weight)
    t0, t1 = tiny_wan_transformer(0), tiny_wan_transformer(0)
    assert torch.equal(t0.proj_out.weight, t1.proj_out.weight)
    # Seeding the tiny models must not disturb the caller's random stream.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_wan_vae(5)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_preset_codec_shapes():
    p = get_preset("tiny")
    codec = codec_of(p)
    x = torch.zeros(1, 3, p.lq_size, p.lq_size)
    with torch.no_grad():
        z = codec.encode(x)
    assert z.shape == (1, 16, p.lq_size // 8, p.lq_size // 8)


def test_hub_style_preset_loads_through_from_pretrained(tmp_path):
    """The wan2.1 presets load with from_pretrained(repo, subfolder=...); exercise that path on a local folder."""
    vae, transformer = tiny_wan_vae(0), tiny_wan_transformer(0)
    vae.save_pretrained(tmp_path / "vae")
    transformer.save_pretrained(tmp_path / "transformer")
    p = get_preset("wan2.1-1.3b", vae=str(tmp_path), transformer=str(tmp_path))
    codec = codec_of(p)
    assert codec.family == "wan" and codec.latent_channels == 16
    assert torch.equal(codec.vae.decoder.conv_out.weight, vae.decoder.conv_out.weight)
    model = transformer_of(p)
    assert torch.equal(model.proj_out.weight, transformer.proj_out.weight)


def test_taef2_preset_loads_real_weights(taef2_codec):
    assert taef2_codec.family == "tae" and taef2_codec.latent_channels == 32
    n = sum(p.numel() for p in taef2_codec.decoder.parameters())
    assert n == 1_338_499  # the figure published with taef2 (ldlib/assets/SOURCES.md)


def test_taef2_default_is_the_shipped_weights(monkeypatch):
    from ldlib.core.samples import ASSETS_DIR

    monkeypatch.delenv(TAEF2_ENV, raising=False)
    assert taef2_dir() == ASSETS_DIR / "taef2"
    assert (ASSETS_DIR / "SOURCES.md").is_file() and (ASSETS_DIR / "taef2" / "LICENSE").is_file()


def test_shipped_taef2_equals_the_published_pth(tmp_path):
    # The shipped safetensors are the published .pth tensors, unchanged; needs the .pth files beside the repo.
    import torch
    from safetensors.torch import load_file

    from ldlib.core.samples import ASSETS_DIR
    from ldlib.presets import SHARED_DIR

    src = SHARED_DIR / "models" / "taef2"
    if not (src / "taef2_encoder.pth").is_file():
        pytest.skip(f"{src}: the published .pth files are not beside the repo (the shipped copy is what runs)")
    for part in ("encoder", "decoder"):
        ref = torch.load(src / f"taef2_{part}.pth", map_location="cpu", weights_only=True)
        ours = load_file(str(ASSETS_DIR / "taef2" / f"taef2_{part}.safetensors"))
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
