"""images.py: loading in every colour mode, EXIF orientation, errors, saving, and the exact area downsample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldlib.core.images import (ImageLoadError, area_downsample, load_image, load_rgb8, open_image, rgb8, save_image,
                               to_tensor, to_uint8)


def _rng_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# --- area downsample ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_area_downsample_is_block_mean(factor):
    x = torch.randn(2, 3, 12 * factor, 6 * factor, dtype=torch.float64)
    n, c, h, w = x.shape
    ref = x.numpy().reshape(n, c, h // factor, factor, w // factor, factor).mean(axis=(3, 5))
    np.testing.assert_allclose(area_downsample(x, factor).numpy(), ref, rtol=0, atol=1e-12)


def test_area_downsample_factor2_explicit_blocks():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    expected = np.array([[(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4], [(8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4]])
    np.testing.assert_array_equal(area_downsample(x, 2)[0, 0].numpy(), expected)


def test_area_downsample_rejects_bad_sizes():
    with pytest.raises(ValueError, match="not divisible"):
        area_downsample(torch.zeros(1, 3, 5, 4), 2)
    with pytest.raises(ValueError, match="positive integer"):
        area_downsample(torch.zeros(1, 3, 4, 4), 0)


# --- loading: modes ----------------------------------------------------------------------------------------------


def test_rgb_png_round_trip_exact(tmp_path):
    a = _rng_image(17, 23)
    Image.fromarray(a).save(tmp_path / "x.png")
    x = load_image(tmp_path / "x.png")
    assert x.shape == (1, 3, 17, 23) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(to_uint8(x), a)
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), a / 127.5 - 1, atol=1e-6)


def test_greyscale_L_replicates_channels(tmp_path):
    g = _rng_image(8, 9)[..., 0]
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    a, _ = load_rgb8(tmp_path / "g.png")
    np.testing.assert_array_equal(a, np.repeat(g[..., None], 3, axis=2))


def test_float_greyscale_crops_keep_the_whole_images_scale(tmp_path):
    # A 0..255 float TIFF whose left half is a shadow (<= 1.0): a crop of the shadow alone stays dark.
    a = np.full((16, 32), 150.0, np.float32)
    a[:, :16] = 0.8
    Image.fromarray(a, "F").save(tmp_path / "f.tif")
    whole, _ = load_rgb8(tmp_path / "f.tif")
    with open_image(tmp_path / "f.tif") as img:
        shadow, note = rgb8(img, (0, 0, 16, 16))
    np.testing.assert_array_equal(whole[0, [0, 31]], [[1, 1, 1], [150, 150, 150]])  # rint(0.8), on the 0..255 scale
    np.testing.assert_array_equal(shadow, whole[:16, :16])
    assert note == "float greyscale scaled to 8 bits"
    # A [0, 1] float image is still scaled by 255.
    Image.fromarray(np.full((4, 4), 0.5, np.float32), "F").save(tmp_path / "unit.tif")
    with open_image(tmp_path / "unit.tif") as img:
        assert (rgb8(img, (0, 0, 2, 2))[0] == 128).all()


def _matrix_profile(name: str, columns: np.ndarray, gamma_u8f8: int) -> bytes:
    """A minimal ICC v2 RGB profile: colorant columns (XYZ, D50) and one gamma curve (u8Fixed8) for all channels."""
    import struct

    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    def xyz(v) -> bytes:
        return b"XYZ " + bytes(4) + b"".join(s15(c) for c in v)

    text = name.encode() + b"\0"
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, gamma_u8f8) + bytes(2)
    tags = [(b"desc", b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(12 + 67)),
            (b"wtpt", xyz((0.9642, 1.0, 0.8249))), (b"rXYZ", xyz(columns[:, 0])), (b"gXYZ", xyz(columns[:, 1])),
            (b"bXYZ", xyz(columns[:, 2])), (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, body in tags:
        body += bytes(-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (struct.pack(">I", offset + len(data)) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ " + bytes(12)
              + b"acsp" + bytes(28) + s15(0.9642) + s15(1.0) + s15(0.8249))
    return header + bytes(128 - len(header)) + struct.pack(">I", len(tags)) + table + data


def test_a_wide_gamut_profile_is_converted_to_srgb_and_an_srgb_one_left_alone(tmp_path):
    # A Display P3 photo (phones tag theirs so): its numbers are P3's. Expected, in numpy: P3's gamma 2.2 curve and
    # colorants (D50) to XYZ, then the inverse of littleCMS's sRGB colorants, clipped, and sRGB's own curve.
    from PIL import ImageCms

    p3 = np.array([[0.5151, 0.2920, 0.1571], [0.2412, 0.6922, 0.0666], [-0.0011, 0.0419, 0.7841]])
    icc = _matrix_profile("Display P3 (test)", p3, 563)  # 563 / 256: gamma 2.2 as the curve stores it
    colours = np.array([[40, 160, 60], [128, 128, 128], [250, 20, 20], [10, 40, 200]], np.uint8)
    pixels = np.repeat(colours[None], 6, axis=0)  # 6 x 4 x 3
    Image.fromarray(pixels).save(tmp_path / "p3.png", icc_profile=icc)
    got, note = load_rgb8(tmp_path / "p3.png")
    assert note == "converted from Display P3 (test) to sRGB"

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).profile
    to_srgb = np.linalg.inv(np.array([srgb.red_colorant[0], srgb.green_colorant[0], srgb.blue_colorant[0]]).T)
    linear = np.clip(to_srgb @ p3 @ ((colours / 255.0) ** (563 / 256)).T, 0, 1).T
    encoded = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    want = np.rint(encoded * 255)
    assert np.abs(got[0].astype(float) - want).max() <= 2, (got[0], want)
    assert np.abs(got[0].astype(float) - colours).max() > 20  # the conversion is not a no-op
    # The same through a crop (the pair builder's path), and with alpha: converted, then composited on white.
    with open_image(tmp_path / "p3.png") as img:
        np.testing.assert_array_equal(rgb8(img, (1, 1, 3, 4))[0], got[1:4, 1:3])
    rgba = np.concatenate([pixels, np.full((6, 4, 1), 255, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "p3a.png", icc_profile=icc)
    got_a, note_a = load_rgb8(tmp_path / "p3a.png")
    np.testing.assert_array_equal(got_a, got)
    assert note_a == "converted from Display P3 (test) to sRGB; alpha composited on white"
    # A palette image with the profile: its colours converted the same; a 16-bit one is left as it is, and says so.
    Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(tmp_path / "p3p.png",
                                                                                      icc_profile=icc)
    np.testing.assert_array_equal(load_rgb8(tmp_path / "p3p.png")[0], got)
    Image.fromarray(np.full((4, 4), 1000, np.uint16)).save(tmp_path / "p3i.png", icc_profile=icc)
    assert load_rgb8(tmp_path / "p3i.png")[1].startswith("colour profile not applied to a I")
    # littleCMS's own sRGB profile leaves the numbers as they are, with no note; a profile is judged by what it does,
    # not by its name: one named sRGB with sRGB's colorants but a plain gamma 2.2 curve (more than a level off in
    # the shadows) is converted.
    Image.fromarray(pixels).save(tmp_path / "srgb.png", icc_profile=ImageCms.ImageCmsProfile(
        ImageCms.createProfile("sRGB")).tobytes())
    got_s, note_s = load_rgb8(tmp_path / "srgb.png")
    np.testing.assert_array_equal(got_s, pixels)
    assert note_s == ""
    columns = np.array([srgb.red_colorant[0], srgb.green_colorant[0], srgb.blue_colorant[0]]).T
    Image.fromarray(pixels).save(tmp_path / "g22.png", icc_profile=_matrix_profile("sRGB (gamma 2.2)", columns, 563))
    assert load_rgb8(tmp_path / "g22.png")[1] == "converted from sRGB (gamma 2.2) to sRGB"


def test_16bit_greyscale_png_scaled_not_clipped(tmp_path):
    v = np.array([[0, 257, 32768, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    Image.fromarray(v).save(tmp_path / "g16.png")  # Pillow writes a 16-bit greyscale PNG (mode I;16)
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    a, note = load_rgb8(tmp_path / "g16.png")
    expected = np.clip(np.rint(v / 257.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(a[..., 0], expected)
    np.testing.assert_array_equal(a[..., 2], expected)
    assert "16-bit" in note


def _write_png16_rgb(path, v: np.ndarray) -> None:
    """A 48-bit RGB PNG written from the spec (Pillow cannot write one)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w, _ = v.shape
    rows = b"".join(b"\x00" + v[y].astype(">u2").tobytes() for y in range(h))  # filter type 0 per row
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16bit_rgb_png_within_one_level(tmp_path):
    v = np.random.default_rng(1).integers(0, 65536, size=(6, 7, 3)).astype(np.uint16)
    _write_png16_rgb(tmp_path / "rgb16.png", v)
    a, _ = load_rgb8(tmp_path / "rgb16.png")
    assert np.abs(a.astype(np.int32) - np.rint(v / 257.0).astype(np.int32)).max() <= 1


def test_rgba_and_la_composited_on_white(tmp_path):
    rgb = _rng_image(5, 6, seed=2)
    alpha = np.random.default_rng(3).integers(0, 256, size=(5, 6), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(tmp_path / "a.png")
    a, note = load_rgb8(tmp_path / "a.png")
    al = alpha[..., None] / 255.0
    expected = rgb * al + 255.0 * (1 - al)
    assert np.abs(a - expected).max() <= 1.0
    assert "white" in note
    Image.fromarray(np.dstack([rgb[..., 0], alpha]), mode="LA").save(tmp_path / "la.png")
    a, _ = load_rgb8(tmp_path / "la.png")
    assert np.abs(a[..., 1] - (rgb[..., 0] * al[..., 0] + 255.0 * (1 - al[..., 0]))).max() <= 1.0


def test_palette_with_and_without_transparency(tmp_path):
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    idx = np.array([[0, 1], [2, 0]], dtype=np.uint8)
    p = Image.fromarray(idx, mode="P")
    p.putpalette(palette)
    p.save(tmp_path / "p.png")
    a, _ = load_rgb8(tmp_path / "p.png")
    np.testing.assert_array_equal(a[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(a[0, 1], [0, 255, 0])
    np.testing.assert_array_equal(a[1, 0], [0, 0, 255])
    p.save(tmp_path / "pt.png", transparency=1)  # index 1 (green) fully transparent -> white
    a, _ = load_rgb8(tmp_path / "pt.png")
    np.testing.assert_array_equal(a[0, 1], [255, 255, 255])
    np.testing.assert_array_equal(a[0, 0], [255, 0, 0])


def test_cmyk_converted_to_rgb(tmp_path):
    # With K = 0, every CMYK -> RGB convention agrees: R = 255 - C, G = 255 - M, B = 255 - Y.
    cmy = _rng_image(4, 5, seed=4)
    cmyk = np.dstack([cmy, np.zeros((4, 5), np.uint8)])
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.tif")
    a, note = load_rgb8(tmp_path / "c.tif")
    np.testing.assert_array_equal(a, 255 - cmy)
    assert "CMYK" in note


def test_exif_orientation_applied(tmp_path):
    # Stored 40 wide x 20 high: left half red, right half blue. Orientation 6 = rotate 90 degrees clockwise
    # for display, so the loaded image is 20 wide x 40 high with red on top.
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out, _ = load_rgb8(tmp_path / "r.jpg")
    assert out.shape == (40, 20, 3)
    expected = np.rot90(a, k=-1)  # clockwise
    assert np.abs(out[2:18].astype(int) - expected[2:18].astype(int)).max() < 40  # JPEG, away from the edge
    assert out[5, 10, 0] > 200 and out[35, 10, 2] > 200


# --- loading: errors ---------------------------------------------------------------------------------------------


def test_not_an_image_raises_one_error_naming_the_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(ImageLoadError, match="notes.txt"):
        load_image(f)


def test_truncated_file_raises(tmp_path):
    Image.fromarray(_rng_image(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.png"):
        load_image(tmp_path / "cut.png")


def test_missing_file_raises(tmp_path):
    with pytest.raises(ImageLoadError, match="nope.png"):
        load_image(tmp_path / "nope.png")


def test_decompression_bomb_raises(tmp_path, monkeypatch):
    Image.fromarray(_rng_image(40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageLoadError, match="big.png.*too many pixels"):
        load_image(tmp_path / "big.png")


# --- saving ------------------------------------------------------------------------------------------------------


def test_save_image_round_trip_and_no_temp_left(tmp_path):
    a = _rng_image(9, 11, seed=5)
    save_image(to_tensor(a), tmp_path / "sub" / "y.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "sub" / "y.png")), a)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["y.png"]


def test_to_uint8_clamps_and_rounds():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    np.testing.assert_array_equal(to_uint8(x)[0, :, 0], [0, 0, 128, 255, 255])  # 127.5 rounds half to even: 128
