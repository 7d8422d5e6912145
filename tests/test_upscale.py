"""upscale: tiling that blends to a partition of unity and shares GroupNorm statistics, tiled vs whole decodes,
and the command (images, latent files, --scale 1, --compare, a bad input skipped, a model of another family)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import rel_diff, train_short_run
from PIL import Image
from safetensors.torch import save_file

from ldlib.apps.cli import main
from ldlib.apps.upscale import UpscaleConfig, decode_tiled, encode_tiled, group_norms, run_tiled, tile_spans
from ldlib.build import codec_of
from ldlib.core.images import area_downsample, load_image, save_image
from ldlib.presets import get_preset


@pytest.mark.parametrize("size", [1, 5, 7, 9, 32, 33, 47, 64, 65, 100, 107, 257])
@pytest.mark.parametrize("tile,overlap", [(32, 8), (16, 8), (24, 4), (64, 16), (4, 0), (8, 3)])
def test_tile_spans_cover_overlap_and_align(size, tile, overlap):
    spans = tile_spans(size, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == size
    assert all(a % 2 == 0 for a, _ in spans)  # even starts: FLUX.2's 2x2 normalisation keeps its phase
    assert all(b - a <= tile for a, b in spans) or spans == [(0, size)]  # the memory bound holds
    assert len({b - a for a, b in spans[:-1]}) <= 1 and 0 <= (spans[0][1] - spans[0][0]) - (spans[-1][1] - spans[-1][0]) <= 1
    for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
        assert a0 < a1 and b1 - a1 > 0 and b0 - a1 >= overlap  # each neighbour pair overlaps by >= overlap
        assert b0 < b1


def test_blend_weights_are_a_partition_of_unity():
    """For a function without context (nearest 8x upsample) the blended tiles give back the whole result exactly."""
    x = torch.randn(1, 3, 45, 70, generator=torch.Generator().manual_seed(0))
    fn = lambda t: F.interpolate(t, scale_factor=8, mode="nearest")  # noqa: E731
    out = run_tiled(fn, x, unit_in=1, unit_out=8, tile=16, overlap=6)
    assert rel_diff(out, fn(x)) < 1e-6


def test_shared_group_norm_statistics_make_tiles_exact():
    """A net whose only non-pointwise op is GroupNorm: tiled == whole with shared statistics, not without."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 8, 1), nn.GroupNorm(4, 8),
                        nn.Conv2d(8, 3, 1)).eval()
    x = torch.randn(1, 3, 40, 56) + torch.linspace(-2, 2, 56)  # statistics that differ across the image
    with torch.no_grad():
        whole = net(x)
        shared = run_tiled(net, x, 1, 1, tile=16, overlap=4, norms=group_norms([net]))
        local = run_tiled(net, x, 1, 1, tile=16, overlap=4)
    assert rel_diff(shared, whole) < 1e-5
    assert rel_diff(local, whole) > 1e-2


def _tiled_vs_whole(codec, z, tile=12, overlap=6):
    with torch.no_grad():
        whole = codec.decode(z)
        tiled = decode_tiled(codec, z, tile=tile, overlap=overlap)
    d = (tiled - whole).abs()
    return d.max().item(), d.mean().item()


def test_tiled_decode_is_close_to_whole_tiny_wan():
    """Tiny Wan (random weights, global attention in the middle block): stated tolerance max 0.25, mean 0.02."""
    codec = codec_of(get_preset("tiny")).to_2x()
    z = torch.randn(1, 16, 20, 26, generator=torch.Generator().manual_seed(1))
    mx, mean = _tiled_vs_whole(codec, z)
    assert mx < 0.25 and mean < 0.02, (mx, mean)


def test_tiled_decode_is_close_to_whole_taef2(taef2_codec):
    """taef2 (GroupNorm statistics shared), small tiles on a real photo's latents: stated tolerance max 0.3,
    mean 0.025 (8-pixel tiles are far inside TAESD's receptive field; the default 64 does much better)."""
    from ldlib.core.samples import sample_photos

    x = load_image(Path(sample_photos()) / "p11_texture_paintbrushes.jpg")
    x = area_downsample(x[..., :2448, :2448], 8)[..., 40:136, 100:228]  # 96 x 128: latents 12 x 16, 2 x 3 tiles
    codec = taef2_codec.to_2x()
    with torch.no_grad():
        z = codec.encode(x)
    mx, mean = _tiled_vs_whole(codec, z, tile=8, overlap=4)
    assert mx < 0.3 and mean < 0.025, (mx, mean)
    with torch.no_grad():  # the tiled encoder: sharing its three GroupNorms' statistics brings it closer (by 15-35%
        # on the photos tried: with 8-pixel tiles the encoder's ~18-pixel receptive field dominates the error)
        shared = (encode_tiled(codec, x, tile=8, overlap=4) - z).abs().mean().item()
        local = (run_tiled(codec.encode, x, 8, 1, tile=8, overlap=4) - z).abs().mean().item()
    assert shared < local and shared < 0.15 * z.abs().mean().item(), (shared, local)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_short_run(tmp_path_factory.mktemp("run"))[0]


def _photo(path, h=44, w=60, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)).save(path)
    return path


def test_upscale_image_scale_and_compare(tiny_run, tmp_path, capsys):
    from ldlib.build import load_run_codec

    img = _photo(tmp_path / "in.png")  # 44 x 60: not a multiple of 8, padded and cropped back
    out = tmp_path / "out"
    args = ["upscale", str(img), "--model", str(tiny_run), "--out", str(out), "--tile", "4", "--overlap", "2"]
    # (tiles of 4 latent pixels: the 6 x 8 latents of this 48 x 64 padded input take several tiles)
    assert main(args + ["--compare"]) == 0
    two = load_image(out / "in_2x.png")
    assert two.shape == (1, 3, 88, 120)
    assert load_image(out / "in_compare.png").shape == (1, 3, 88, 240)
    assert "peak memory" in capsys.readouterr().out
    assert main(args + ["--scale", "1"]) == 0
    one = load_image(out / "in_1x.png")
    assert one.shape == (1, 3, 44, 60)
    # --scale 1 is the area-downsampled 2x output (up to the 8-bit rounding of both PNGs)
    assert (one - area_downsample(two, 2)).abs().max().item() <= 2 / 255 + 1e-6
    # and the 2x output is what the run's decoder makes of the preset encoder's latents (tiled both ways)
    codec, _ = load_run_codec(tiny_run)
    x = F.pad(load_image(img), (0, 4, 0, 4), mode="replicate")
    with torch.no_grad():
        expect = decode_tiled(codec, encode_tiled(codec_of(get_preset("tiny")), x, 8, 4), 4, 2)[..., :88, :120]
    assert (two - expect).abs().max().item() <= 1 / 127.5 + 1e-6


def test_upscale_latent_files_normalised_and_raw(tiny_run, tmp_path):
    codec = codec_of(get_preset("tiny"))
    z = torch.randn(1, 16, 6, 5, generator=torch.Generator().manual_seed(2))
    save_file({"latents": z[0]}, str(tmp_path / "norm.safetensors"))
    torch.save(codec.denormalise(z).unsqueeze(2), tmp_path / "raw.pt")  # Wan's N x C x 1 x h x w
    out = tmp_path / "out"
    assert main(["upscale", str(tmp_path / "norm.safetensors"), "--model", str(tiny_run), "--out", str(out)]) == 0
    assert main(["upscale", str(tmp_path / "raw.pt"), "--model", str(tiny_run), "--out", str(out),
                 "--latents", "raw"]) == 0
    a, b = load_image(out / "norm_2x.png"), load_image(out / "raw_2x.png")
    assert a.shape == (1, 3, 96, 80)
    assert (a - b).abs().max().item() <= 1 / 127.5 + 1e-6


def test_upscale_batch_skips_bad_inputs_with_one_line_each(tiny_run, tmp_path, capsys):
    good = _photo(tmp_path / "good.png")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"latents": torch.zeros(1, 32, 4, 4)}, str(wrong))
    out = tmp_path / "out"
    code = main(["upscale", str(corrupt), str(wrong), str(good), "--model", str(tiny_run), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2 and "Traceback" not in captured.err
    assert errors[0].startswith("error: ") and "corrupt.jpg" in errors[0] and "not a decodable image" in errors[0]
    assert "wrong.safetensors" in errors[1] and "32 channels" in errors[1] and "takes 16" in errors[1]
    assert (out / "good_2x.png").is_file() and "2 of 3" not in captured.out and "1 of 3" in captured.out


def test_upscale_refuses_inputs_whose_outputs_would_overwrite_each_other(tiny_run, tmp_path, capsys):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, b = _photo(tmp_path / "a" / "x.png"), _photo(tmp_path / "b" / "x.png", seed=1)
    out = tmp_path / "out"
    code = main(["upscale", str(a), str(b), "--model", str(tiny_run), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(a) in err[0] and str(b) in err[0] and "overwrite" in err[0]
    assert not out.exists()  # refused before anything was written


def test_upscale_never_overwrites_another_inputs_output_of_another_stem(tiny_run, tmp_path, capsys):
    """A 2-latent file x.pt writes x_0_2x.png and x_1_2x.png; an image x_1.png writes x_1_2x.png too. Whichever
    comes second fails with one line naming both, the first one's outputs stay, and the exit code is 1."""
    from ldlib.build import load_run_codec

    codec, _ = load_run_codec(tiny_run)
    z = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    latents = tmp_path / "x.pt"
    torch.save(z, latents)
    image = _photo(tmp_path / "x_1.png", h=48, w=48)  # a multiple of 16: no padding
    with torch.no_grad():
        z_image = encode_tiled(codec_of(get_preset("tiny")), load_image(image), 128, 32)
        expect = {"latent": decode_tiled(codec, z[1:2]), "image": decode_tiled(codec, z_image)}
    for order, first in (([latents, image], "latent"), ([image, latents], "image")):
        out = tmp_path / f"out_{first}_first"
        code = main(["upscale", *map(str, order), "--model", str(tiny_run), "--out", str(out)])
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert code == 1 and len(err) == 1 and "Traceback" not in captured.err
        assert str(latents) in err[0] and str(image) in err[0] and "x_1_2x.png" in err[0] and "overwrite" in err[0]
        assert "1 of 2 inputs done" in captured.out
        # x_1_2x.png is the first input's decode, not the second's
        assert (load_image(out / "x_1_2x.png") - expect[first]).abs().max().item() <= 1 / 127.5 + 1e-6
        names = sorted(p.name for p in out.iterdir())
        assert names == (["x_0_2x.png", "x_1_2x.png"] if first == "latent" else ["x_1_2x.png"])


def test_upscale_refuses_a_model_of_another_family(tiny_run, tmp_path, capsys):
    img = _photo(tmp_path / "in.png")
    code = main(["upscale", str(img), "--model", str(tiny_run), "--preset", "flux2", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "a wan decoder (trained with preset 'tiny')" in err[0] and "'flux2' is a flux2 VAE" in err[0]


def test_upscale_config_validation():
    for bad in (dict(scale=3), dict(latents="scaled"), dict(tile=8, overlap=5), dict(tile=-1)):
        with pytest.raises(ValueError):
            UpscaleConfig(**bad)


# --- issue 28, item 8: progress on long inputs, no silent overwrite -------------------------------------------------


def test_upscale_shows_progress_over_the_tiles_of_a_large_input(tiny_run, tmp_path, capsys):
    img = _photo(tmp_path / "big.png")
    args = ["upscale", str(img), "--model", str(tiny_run), "--out", str(tmp_path / "out"), "--tile", "4", "--overlap", "2"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "big.png: decode" in err and "100%" in err, err  # tqdm's bar on stderr (the 1x encode is one tile here)
    assert main(args + ["--quiet", "--overwrite"]) == 0
    assert "big.png: decode" not in capsys.readouterr().err


def test_upscale_never_replaces_an_existing_file_without_overwrite(tiny_run, tmp_path, capsys):
    img = _photo(tmp_path / "in.png")
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "in_2x.png"
    mine.write_bytes(b"the user's own file")
    args = ["upscale", str(img), "--model", str(tiny_run), "--out", str(out)]
    assert main(args) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and str(mine) in err[0] and "--overwrite" in err[0], err
    assert mine.read_bytes() == b"the user's own file"
    assert main(args + ["--overwrite"]) == 0
    assert load_image(mine).shape == (1, 3, 88, 120)


# --- the 2x decoder shipped for taef2 -------------------------------------------------------------------------------


def _held_out_crops(n: int = 4, size: int = 512) -> torch.Tensor:
    """n 512 px crops of p09 (a photo the shipped decoder never trained on) after the recipe's 0.5x area step."""
    from ldlib.core.samples import sample_paths

    photo = load_image(next(p for p in sample_paths() if p.name.startswith("p09")))
    half = area_downsample(photo[..., : photo.shape[-2] // 2 * 2, : photo.shape[-1] // 2 * 2], 2)
    h, w = half.shape[-2:]
    spots = [(h // 4, w // 4), (h // 4, w // 2), (h // 2, w // 4), (h // 2, w // 2)][:n]
    return torch.cat([half[..., y: y + size, x: x + size] for y, x in spots])


def test_shipped_decoder_beats_decoding_and_bicubic_on_a_held_out_photo(taef2_codec):
    from ldlib.build import load_decoder
    from ldlib.presets import shipped_decoder

    preset = get_preset("taef2")
    ours, _ = load_decoder(shipped_decoder(preset), preset)
    hq = _held_out_crops()
    with torch.no_grad():
        z = taef2_codec.encode(area_downsample(hq, 2))
        ours_img, base = ours.decode(z).clamp(-1, 1), taef2_codec.decode(z)
    bicubic = F.interpolate(base, scale_factor=2, mode="bicubic", align_corners=False).clamp(-1, 1)

    def psnr(a, b):  # numpy, per image: 10 log10(peak^2 / mse) on [-1, 1] images (peak-to-peak 2)
        mse = ((a.numpy().astype(np.float64) - b.numpy()) ** 2).reshape(len(a), -1).mean(1)
        return 10 * np.log10(4.0 / mse)

    gain = psnr(ours_img, hq) - psnr(bicubic, hq)
    # Measured at release: +0.5 dB or more on every crop; a broken or mismatched asset falls well below.
    assert gain.min() > 0.2, gain


def test_upscale_a_photo_with_no_other_argument_uses_the_shipped_decoder(tmp_path, monkeypatch, capsys):
    from ldlib.build import load_decoder
    from ldlib.presets import shipped_decoder

    img = tmp_path / "photo.png"
    save_image(_held_out_crops(1, 256), img)
    monkeypatch.chdir(tmp_path)  # the default --out (runs/upscale) lands here
    assert main(["upscale", str(img)]) == 0
    assert "taef2_2x" in capsys.readouterr().out
    two = load_image(tmp_path / "runs" / "upscale" / "photo_2x.png")
    assert two.shape == (1, 3, 512, 512)
    preset = get_preset("taef2")
    ours, _ = load_decoder(shipped_decoder(preset), preset)
    with torch.no_grad():  # 256 px: one tile, so the output is the plain decode of the plain encode
        expect = ours.decode(codec_of(preset).encode(load_image(img))).clamp(-1, 1)
    assert (two - expect).abs().max().item() <= 1 / 127.5 + 1e-6


def test_upscale_without_model_for_a_preset_that_ships_none_says_so(tmp_path, capsys):
    img = _photo(tmp_path / "in.png")
    assert main(["upscale", str(img), "--preset", "tiny", "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert "ships no trained 2x decoder for preset 'tiny'" in err and "taef2" in err and "--model" in err
