"""Evaluation metrics and tables, and export -> from_pretrained -> the same output as the in-memory model."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_diff
from PIL import Image
from scipy import stats

from ldlib.apps.cli import main
from ldlib.apps.evaluate import (EvalConfig, bicubic_2x, compare, evaluate_decoders, lanczos_2x, markdown_table,
                                 run_evaluation, verdict, write_report)
from ldlib.apps.export import export_run
from ldlib.build import codec_of, load_run_codec
from ldlib.core.metrics import colour_shift, haarpsi, hf_energy, lpips_model, speckle_ratio, ssim
from ldlib.data.datasets import sample_tensor_pairs
from ldlib.data.pairs import read_manifest, split_by_source
from ldlib.models.losses import DecoderLoss, LossConfig
from ldlib.presets import get_preset
from ldlib.train.decoder import TrainConfig, train_decoder


@pytest.fixture(scope="module")
def lp():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lpips_model("alex")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, lp):
    codec = codec_of(get_preset("tiny"))
    data = sample_tensor_pairs(codec, count=2, hq_size=32, seed=1)
    cfg = TrainConfig(preset="tiny", steps=2, batch=2, warmup_steps=1, lr=1e-3, ema_decay=0.5, val_every=100, val_count=1,
                      loss=LossConfig(lpips_net="alex", gan_start=100))
    out = tmp_path_factory.mktemp("run")
    train_decoder(cfg, out, data, None, codec=codec, loss_fn=DecoderLoss(cfg.loss, lpips=lp))
    return out, codec, data


@pytest.fixture(scope="module")
def split_run(tmp_path_factory, tiny_pairset, lp):
    """A tiny run trained on a pair set with a split other than evaluate's old fallback (0.4, seed 1), its export."""
    root = tmp_path_factory.mktemp("split")
    cfg = TrainConfig(preset="tiny", steps=1, batch=2, warmup_steps=0, val_every=100, val_count=1, val_fraction=0.4,
                      split_seed=1, loss=LossConfig(lpips_net="alex", gan_start=100))
    train_decoder(cfg, root / "run", pairs=tiny_pairset["pairs"], latents=tiny_pairset["latents"],
                  loss_fn=DecoderLoss(cfg.loss, lpips=lp))
    return root / "run", export_run(root / "run", root / "export")


def _held_out(pairs, val_fraction, seed) -> tuple[list[str], list[str], set[str]]:
    """(held-out pair ids, their sources, training sources) by the split function training uses, on the manifest."""
    records = read_manifest(pairs)
    train_ids, val_ids = split_by_source(records, val_fraction, seed)
    source = {r["id"]: r["source"] for r in records}
    return val_ids, sorted({source[i] for i in val_ids}), {source[i] for i in train_ids}


def _img(seed, n=2, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_ssim_matches_skimage_and_bounds():
    from skimage.metrics import structural_similarity

    x = _img(0)
    y = (x + 0.2 * _img(1)).clamp(-1, 1)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    # float64 on both sides: the bound is about the formula, not about two float32 filter implementations' rounding
    # (1e-6 is ~16 float32 epsilons at 0.9). skimage's Gaussian window is truncated a little differently: 7e-8 here.
    got = ssim(x.double(), y.double())
    ref = structural_similarity(x[1].double().numpy(), y[1].double().numpy(), data_range=2.0, channel_axis=0,
                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert got[1].item() == pytest.approx(ref, abs=1e-6)
    assert 0 < got.min() < 1 and ssim(x, (x + 0.5 * _img(2)).clamp(-1, 1)).mean() < ssim(x, y).mean()


def test_speckle_ratio_closed_form():
    # A checkerboard (+-a) is all energy at Nyquist: hf_energy = a^2 * channels; a constant has none.
    size = 16
    board = ((torch.arange(size).view(-1, 1) + torch.arange(size).view(1, -1)) % 2 * 2 - 1).float()
    x = 0.5 * board.expand(1, 3, size, size)
    assert hf_energy(x).item() == pytest.approx(3 * 0.25, rel=1e-6)
    assert hf_energy(torch.full((1, 3, size, size), 0.3)).item() == pytest.approx(0.0, abs=1e-12)
    assert speckle_ratio(2 * x, x).item() == pytest.approx(4.0, rel=1e-6)
    # Blurring removes high frequencies: ratio < 1.
    y = _img(3, n=1, size=64)
    blur = F.avg_pool2d(F.pad(y, (1, 1, 1, 1), mode="reflect"), 3, stride=1)
    assert speckle_ratio(blur, y).item() < 0.5


def test_upsamplers():
    x = _img(4, n=1, size=8)
    assert torch.allclose(bicubic_2x(x), F.interpolate(x, scale_factor=2, mode="bicubic"))
    lz = lanczos_2x(x)
    ref = np.asarray(Image.fromarray(x[0, 1].numpy()).resize((16, 16), Image.Resampling.LANCZOS))
    assert lz.shape == (1, 3, 16, 16) and np.allclose(lz[0, 1].numpy(), ref)
    const = torch.full((1, 3, 8, 8), 0.25)
    assert torch.allclose(lanczos_2x(const), torch.full((1, 3, 16, 16), 0.25), atol=1e-5)


def test_evaluate_tables_and_verdict(tiny_run, lp, tmp_path):
    run, codec, data = tiny_run
    ours, _ = load_run_codec(run)
    cfg = EvalConfig(sigmas=(0.0, 0.12), batch=2)
    rows = evaluate_decoders(codec, {"ours": ours}, data, cfg, lpips=lp, progress=False)
    assert {(r["method"], r["sigma"]) for r in rows} == {
        (m, s) for m in ("decoder+bicubic", "decoder+lanczos", "ours") for s in (0.0, 0.12)}
    # Recompute one cell independently: bicubic baseline PSNR at sigma 0.
    with torch.no_grad():
        base = F.interpolate(codec.decode(data.latents), scale_factor=2, mode="bicubic").clamp(-1, 1)
    mse = ((base - data.hq) ** 2).flatten(1).mean(1)
    expected = (10 * torch.log10(4 / mse)).mean().item()
    cell = next(r for r in rows if r["method"] == "decoder+bicubic" and r["sigma"] == 0.0)
    assert cell["psnr"] == pytest.approx(expected, rel=1e-5) and cell["n"] == 2
    noisy = next(r for r in rows if r["method"] == "decoder+bicubic" and r["sigma"] == 0.12)
    assert noisy["psnr"] != cell["psnr"]  # the degradation is applied

    doc = write_report(rows, tmp_path / "ev", cfg, {"lpips_backbone_pretrained": False})
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["rows"] == rows
    assert "### PSNR" in (tmp_path / "ev" / "eval.md").read_text()
    assert (tmp_path / "ev" / "eval.png").stat().st_size > 1000
    # Two pairs of a random tiny model: no verdict either way, and the report says why.
    assert doc["verdict"]["ours_beats_baselines"] is None and "too few" in doc["verdict"]["summary"]
    tiny = write_report(rows, tmp_path / "ev2", cfg, {"random_models": True})
    assert tiny["verdict"]["ours_beats_baselines"] is None and "random models" in tiny["verdict"]["summary"]
    assert "| ours |" in markdown_table(rows)


def _row(method, psnr, lpips, sources, seeds=None):
    per = {"psnr": list(psnr), "lpips": list(lpips)}
    row = {"method": method, "sigma": 0.0, "per_pair": per, "sources": sources,
           "psnr": float(np.mean(psnr)), "lpips": float(np.mean(lpips))}
    if seeds is not None:
        row["seeds"] = list(seeds)
    return row


def test_verdict_is_a_paired_test_over_photos():
    # Was a test of the old rule (mean beyond 2 standard errors of the pairs, same sign on every photo, at least 8
    # pairs) on 2 photos; the rule is now a paired t-test over per-photo means with at least 3 photos, so the same
    # cases are built on 4 photos of 3 crops each, and the standard error is the photos', not the pairs'.
    rng = np.random.default_rng(0)
    n, sources = 12, [f"p{i}.jpg" for i in range(4) for _ in range(3)]
    base = rng.normal(25, 2, n)  # per-pair PSNR of a baseline: the pairs differ a lot among themselves
    lp = rng.uniform(0.2, 0.4, n)
    rows = [_row("decoder+bicubic", base, lp, sources), _row("decoder+lanczos", base - 0.1, lp + 0.01, sources),
            _row("ours", base + 0.5 + rng.normal(0, 0.05, n), lp - 0.02 + rng.normal(0, 0.002, n), sources)]
    v = verdict(rows, metrics=("psnr", "lpips"))
    assert v["ours_beats_baselines"] is True and not v["failures"]
    assert "t-test over held-out photos" in v["summary"] and "4 photos" in v["summary"]
    # The standard error is numpy's, of the per-photo mean differences (crops of one photo are not independent).
    c = next(c for c in v["comparisons"] if c["baseline"] == "decoder+bicubic" and c["metric"] == "psnr")
    photo = (np.asarray(rows[2]["per_pair"]["psnr"]) - base).reshape(4, 3).mean(1)
    assert c["mean_diff"] == pytest.approx(photo.mean()) and c["se"] == pytest.approx(photo.std(ddof=1) / 2)
    assert (c["n_photos"], c["n_pairs"], c["df"]) == (4, 12, 3)
    assert list(c["per_photo_mean_diff"].values()) == pytest.approx(list(photo))

    # A higher mean that the photos do not support is no win: +0.5 dB on average, +-3 dB from photo to photo.
    rows[2] = _row("ours", base + 0.5 + 3.0 * np.repeat([1, -1, 1, -1], 3), lp - 0.02, sources)
    v = verdict(rows, metrics=("psnr",))
    assert v["ours_beats_baselines"] is False and {c["call"] for c in v["failures"]} == {"no clear difference"}
    # One photo's large win is no win either (+3 dB on one photo, -0.2 on the three others; the old rule's
    # "same sign on every photo" case, now decided by the spread between photos).
    rows[2] = _row("ours", base + np.repeat([3.0, -0.2, -0.2, -0.2], 3), lp - 0.02, sources)
    assert verdict(rows, metrics=("psnr",))["ours_beats_baselines"] is False
    # Worse is said as worse; fewer than MIN_PHOTOS photos give no verdict at all.
    rows[2] = _row("ours", base - 1.0 + rng.normal(0, 0.05, n), lp + 0.05 + rng.normal(0, 0.002, n), sources)
    assert {c["call"] for c in verdict(rows, metrics=("psnr", "lpips"))["comparisons"]} == {"worse"}
    few = [_row(r["method"], r["per_pair"]["psnr"][:6], r["per_pair"]["lpips"][:6], sources[:6]) for r in rows]
    v = verdict(few, metrics=("psnr",))
    assert v["ours_beats_baselines"] is None and "too few held-out photos" in v["summary"] and "2 here" in v["summary"]
    assert {c["call"] for c in v["comparisons"]} == {"too few photos"}


def test_compare_t_and_p_against_closed_forms():
    # 3 photos with 2, 1 and 3 pairs: per-photo means 0.1, 0.3, 0.5 (the pooled pair mean would be 1.9 / 6).
    sources = ["a", "a", "b", "c", "c", "c"]
    d = np.array([0.0, 0.2, 0.3, 0.4, 0.5, 0.6])
    base = np.full(6, 20.0)
    c = compare(_row("ours", base + d, np.zeros(6), sources), _row("b", base, np.zeros(6), sources), "psnr")
    m = np.array([0.1, 0.3, 0.5])
    se = m.std(ddof=1) / np.sqrt(3)  # 0.2 / sqrt(3)
    t = m.mean() / se
    assert c["mean_diff"] == pytest.approx(0.3) and c["se"] == pytest.approx(se) and c["t"] == pytest.approx(t)
    # Student's t with 2 degrees of freedom, two-sided: p = 1 - |t| / sqrt(2 + t^2).
    assert c["df"] == 2 and c["p"] == pytest.approx(1 - abs(t) / np.sqrt(2 + t * t), rel=1e-9)
    assert c["p"] == pytest.approx(0.1217, abs=1e-4) and c["call"] == "no clear difference"
    assert (c["n_photos"], c["n_pairs"], c["n_seeds"]) == (3, 6, 1)
    assert c["per_photo_mean_diff"] == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.5})

    # 2 photos: 1 degree of freedom, the Cauchy case, p = 1 - 2 atan(|t|) / pi; t and p are reported, but the
    # default minimum makes no call, and a test allowed at 2 photos calls it by p.
    two = ["a", "a", "b"]
    d = np.array([0.9, 1.1, 1.1])  # photo means 1.0 and 1.1: t = 1.05 / 0.05 = 21
    ours, b = _row("ours", 20 + d, np.zeros(3), two), _row("b", np.full(3, 20.0), np.zeros(3), two)
    c = compare(ours, b, "psnr")
    t = 1.05 / (np.std([1.0, 1.1], ddof=1) / np.sqrt(2))
    assert c["t"] == pytest.approx(t) and c["p"] == pytest.approx(1 - 2 * np.arctan(abs(t)) / np.pi, rel=1e-9)
    assert c["call"] == "too few photos" and c["p"] < 0.05
    assert compare(ours, b, "psnr", min_photos=2)["call"] == "better"

    # Every photo moved by exactly the same amount: no spread to doubt it (t infinite, p 0); no move at all: no call.
    three = ["a", "b", "c"]
    c = compare(_row("ours", np.full(3, 20.5), np.zeros(3), three), _row("b", np.full(3, 20.0), np.zeros(3), three),
                "psnr")
    assert (c["se"], c["t"], c["p"], c["call"]) == (0.0, float("inf"), 0.0, "better")
    c = compare(_row("ours", np.full(3, 20.0), np.zeros(3), three), _row("b", np.full(3, 20.0), np.zeros(3), three),
                "psnr")
    assert np.isnan(c["t"]) and np.isnan(c["p"]) and c["call"] == "no clear difference"


def test_compare_photo_is_the_unit():
    # Many crops of one photo add no power: 3 photos with the same per-photo means, one pair each or fifty each
    # (spread around the photo's mean), give the same test; a t-test over the 150 pairs would call it.
    m = np.array([0.05, 0.4, 0.15])
    one = compare(_row("ours", 20 + m, np.zeros(3), ["a", "b", "c"]), _row("b", np.full(3, 20.0), np.zeros(3),
                                                                           ["a", "b", "c"]), "psnr")
    spread = np.tile(np.linspace(-0.05, 0.05, 50), 3)
    d = np.repeat(m, 50) + spread
    src = list(np.repeat(["a", "b", "c"], 50))
    many = compare(_row("ours", 20 + d, np.zeros(150), src), _row("b", np.full(150, 20.0), np.zeros(150), src), "psnr")
    for k in ("mean_diff", "se", "t", "p"):
        assert many[k] == pytest.approx(one[k])
    assert (many["n_pairs"], many["n_photos"], many["call"]) == (150, 3, "no clear difference")
    pooled_p = 2 * stats.t.sf(abs(d.mean() / (d.std(ddof=1) / np.sqrt(150))), 149)
    assert pooled_p < 1e-6  # what treating crops as independent would have claimed

    # Seeds are nested in photos: averaged within a photo (each seed with equal weight), never units of their own.
    src = ["a"] * 4 + ["b"] * 2 + ["c"] * 2
    seeds = [0, 1, 1, 1, 0, 1, 0, 1]
    d = np.array([0.0, 1.0, 1.0, 1.0, 0.2, 0.4, 0.6, 0.6])  # photo a: seed 0 -> 0.0, seed 1 -> 1.0: mean 0.5
    ours, b = _row("ours", 20 + d, np.zeros(8), src, seeds), _row("b", np.full(8, 20.0), np.zeros(8), src)
    c = compare(ours, b, "psnr")
    assert c["per_photo_mean_diff"] == pytest.approx({"a": 0.5, "b": 0.3, "c": 0.6})
    assert (c["n_photos"], c["n_pairs"], c["n_seeds"], c["df"]) == (3, 8, 2, 2)
    del ours["seeds"]  # the same grouping passed as an argument; without it photo a's mean is its pairs' (0.75)
    assert compare(ours, b, "psnr", seeds=seeds)["per_photo_mean_diff"] == c["per_photo_mean_diff"]
    assert compare(ours, b, "psnr")["per_photo_mean_diff"]["a"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="same pairs"):
        compare(ours, _row("b", np.full(7, 20.0), np.zeros(7), src[:7]), "psnr")
    with pytest.raises(ValueError, match="different photos"):
        compare(ours, _row("b", np.full(8, 20.0), np.zeros(8), src[::-1]), "psnr")
    with pytest.raises(ValueError, match="different seeds"):
        compare(ours, _row("b", np.full(8, 20.0), np.zeros(8), src, seeds[::-1]), "psnr", seeds=seeds)


def test_compare_ten_photos_nine_worse_is_worse():
    # The case that made the rule change: 10 photos, nine worse, a 0.41 dB deficit with standard error 0.12.
    z = np.array([-1.6, -1.0, -0.8, -0.5, -0.3, 0.0, 0.2, 0.4, 0.6, 3.0])
    z = (z - z.mean()) / z.std(ddof=1)
    m = -0.41 + 0.12 * np.sqrt(10) * z
    assert (m < 0).sum() == 9 and m.max() > 0
    sources = [f"p{i:02d}" for i in range(10) for _ in range(4)]
    d = np.repeat(m, 4) + np.tile([-0.1, 0.1, -0.05, 0.05], 10)
    c = compare(_row("ours", 30 + d, np.zeros(40), sources), _row("b", np.full(40, 30.0), np.zeros(40), sources),
                "psnr")
    assert c["mean_diff"] == pytest.approx(-0.41) and c["se"] == pytest.approx(0.12)
    assert c["t"] == pytest.approx(-0.41 / 0.12) and c["df"] == 9
    assert c["p"] == pytest.approx(2 * stats.t.sf(0.41 / 0.12, 9)) and 0.005 < c["p"] < 0.01
    assert c["call"] == "worse"
    # The old rule (beyond 2 standard errors AND the same sign on every photo) said "no clear difference" here,
    # and would have said so for any number of photos as long as one disagreed.
    old_call = ("worse" if c["mean_diff"] < -2 * c["se"] and all(v < 0 for v in c["per_photo_mean_diff"].values())
                else "no clear difference")
    assert old_call == "no clear difference"


def test_compare_direction_of_lower_is_better_metrics():
    sources = [f"p{i}" for i in range(5)]
    base = np.array([0.30, 0.25, 0.40, 0.35, 0.20])
    lower = base - np.array([0.02, 0.03, 0.025, 0.02, 0.03])  # ours has lower LPIPS on every photo: better
    rows = (_row("ours", np.zeros(5), lower, sources), _row("b", np.zeros(5), base, sources))
    c = compare(*rows, "lpips")
    assert c["call"] == "better" and c["mean_diff"] == pytest.approx(0.025) and c["t"] > 0
    c = compare(*reversed(rows), "lpips")
    assert c["call"] == "worse" and c["mean_diff"] == pytest.approx(-0.025) and c["t"] < 0
    # Higher is better for PSNR: the same numbers read the other way round.
    assert compare(_row("ours", lower, np.zeros(5), sources), _row("b", base, np.zeros(5), sources),
                   "psnr")["call"] == "worse"


def test_compare_too_few_photos():
    # However large and consistent the gain, one or two photos make no call; no sources at all count as one photo.
    d = np.full(40, 2.0) + np.tile([0.0, 0.1], 20)
    for sources in (["a"] * 40, ["a", "b"] * 20, None):
        c = compare(_row("ours", 20 + d, np.zeros(40), sources), _row("b", np.full(40, 20.0), np.zeros(40), sources),
                    "psnr")
        assert c["call"] == "too few photos" and c["n_pairs"] == 40
    assert c["n_photos"] == 1 and np.isnan(c["t"]) and np.isnan(c["p"]) and c["se"] == float("inf")
    with pytest.raises(ValueError, match="min_photos"):
        compare(_row("ours", d, d, ["a"] * 40), _row("b", d, d, ["a"] * 40), "psnr", min_photos=1)


def test_haarpsi_and_colour_shift():
    import piq

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 48, 48, generator=g) * 2 - 1
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert torch.allclose(haarpsi(x, x), torch.ones(2))
    torch.testing.assert_close(haarpsi(noisy, x), piq.haarpsi((noisy + 1) / 2, (x + 1) / 2, reduction="none"))
    assert (haarpsi(noisy, x) < 0.99).all()
    shifted = x + torch.tensor([2 / 255, 0.0, -4 / 255]).view(1, 3, 1, 1)  # +1 and -2 levels in [-1, 1] units
    torch.testing.assert_close(colour_shift(shifted, x), torch.full((2,), 5 ** 0.5), rtol=1e-4, atol=0)


def test_export_wan_roundtrip(tiny_run, tmp_path):
    from diffusers import AutoencoderKLWan

    run, codec, data = tiny_run
    out = export_run(run, tmp_path / "export")
    assert "pixel_shuffle" in (out / "README.md").read_text()
    ours, _ = load_run_codec(run)  # EMA weights, in memory
    # float64: ldlib's image-mode decode and diffusers' video decode sum in other orders; in float64 they agree to
    # double rounding whatever the CPU's kernels (in float32 the bound would depend on them).
    z = data.latents.double()
    ours = ours.double()
    with torch.no_grad():
        expected = ours.decode(z)
        vae = AutoencoderKLWan.from_pretrained(out).eval()  # diffusers itself, no ldlib code in the path
        assert vae.config.out_channels == 12
        vae = vae.double()
        raw = z * ours.latents_std.double() + ours.latents_mean.double()
        x = vae.decode(raw.unsqueeze(2)).sample.squeeze(2)
        got = F.pixel_shuffle(x, 2)
    assert got.shape == expected.shape == (2, 3, 32, 32)
    assert rel_diff(got, expected) <= 1e-9
    # The export is not the untrained widening: the trained weights made it through.
    with torch.no_grad():
        untrained = codec.to_2x().decode(z)
    assert (untrained - expected).abs().max().item() > 1e-3
    # Encoder weights unchanged.
    enc_a = dict(vae.encoder.named_parameters())
    assert all(torch.equal(enc_a[k], p) for k, p in codec.vae.encoder.named_parameters())


def test_export_tae_roundtrip(taef2_codec, tmp_path, lp):
    from ldlib.models.codecs import TAECodec

    data = sample_tensor_pairs(taef2_codec, count=1, hq_size=32, seed=2)
    cfg = TrainConfig(preset="taef2", steps=1, batch=1, warmup_steps=1, lr=1e-3, ema_decay=0.0, val_every=100,
                      loss=LossConfig(lpips_net="alex", gan_start=100))
    run = tmp_path / "run"
    train_decoder(cfg, run, data, None, codec=taef2_codec, loss_fn=DecoderLoss(cfg.loss, lpips=lp))
    out = export_run(run, tmp_path / "export")
    loaded = TAECodec.from_folder(out)
    ours, _ = load_run_codec(run)
    with torch.no_grad():
        assert torch.equal(loaded.decode(data.latents), ours.decode(data.latents))
    assert loaded.upscale == 2 and loaded.conv_out.out_channels == 12


def test_export_tae_decoder_alone_in_float16_loads_beside_the_vae_encoder(taef2_codec, tmp_path, lp):
    from ldlib.build import load_decoder

    data = sample_tensor_pairs(taef2_codec, count=1, hq_size=32, seed=2)
    cfg = TrainConfig(preset="taef2", steps=1, batch=1, warmup_steps=1, lr=1e-3, ema_decay=0.0, val_every=100,
                      loss=LossConfig(lpips_net="alex", gan_start=100))
    run = tmp_path / "run"
    train_decoder(cfg, run, data, None, codec=taef2_codec, loss_fn=DecoderLoss(cfg.loss, lpips=lp))
    with pytest.raises(ValueError, match="same files"):
        export_run(run, tmp_path / "both", formats=["tae", "tae-decoder"])
    out = export_run(run, tmp_path / "export", formats=["tae-decoder"])
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "decoder.safetensors",
                                                       "ldlib_export.json"]
    preset = get_preset("taef2")
    loaded, _ = load_decoder(out, preset)
    # Independent expectation: the run's decoder with every weight rounded to float16 and back.
    ours, _ = load_run_codec(run)
    with torch.no_grad():
        for p in ours.decoder.parameters():
            p.copy_(p.half().float())
        assert torch.equal(loaded.decode(data.latents), ours.decode(data.latents))
    info = json.loads((out / "ldlib_export.json").read_text())
    info["encoder_sha256"] = "0" * 64  # as if trained on another encoder's latents
    (out / "ldlib_export.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="another encoder"):
        load_decoder(out, preset)


def test_checkpoint_curves_match_the_evaluation_of_each_checkpoint(tiny_run, lp):
    from ldlib.apps.evaluate import checkpoint_curves, plot_curves
    from ldlib.degrade.noise import NoiseDegrader

    run, codec, data = tiny_run
    curves = checkpoint_curves(run, codec, data, sigmas=(0.0, 0.12), degrader=NoiseDegrader(), batch=1,
                               progress=False)
    assert curves["steps"] == [2]
    ours, _ = load_run_codec(run)
    rows = evaluate_decoders(codec, {"ours": ours}, data, EvalConfig(sigmas=(0.0, 0.12), batch=2), lpips=lp,
                             progress=False)
    for r in rows:
        got = curves["ours"][r["sigma"]] if r["method"] == "ours" else curves.get(r["method"], {}).get(r["sigma"])
        if got is None:
            continue
        for m in ("psnr", "haarpsi", "colour_shift"):
            value = got[m][0] if r["method"] == "ours" else got[m]
            assert value == pytest.approx(r[m], rel=1e-5, abs=1e-6), (r["method"], r["sigma"], m)
    assert len(plot_curves(curves).axes) == 3


def test_comparison_images_show_the_samples_the_evaluation_scored(tiny_run, lp):
    # Crops titled with a PSNR must be the evaluation's own degraded samples: same noise, same number.
    from ldlib.apps.evaluate import comparison_images
    from ldlib.build import parse_degrader
    from ldlib.core.metrics import psnr

    run, codec, data = tiny_run
    ours, _ = load_run_codec(run)
    rows = evaluate_decoders(codec, {"ours": ours}, data, EvalConfig(sigmas=(0.12,), batch=2), lpips=lp,
                             progress=False)
    per_pair = next(r for r in rows if r["method"] == "ours")["per_pair"]["psnr"]
    noise = parse_degrader("noise")  # the EvalConfig default the evaluation above used
    images = comparison_images(codec, {"ours": ours}, [data[1]], 0.12, noise, seed=0, indices=[1])
    assert psnr(images["ours"], images["HQ"]).item() == pytest.approx(per_pair[1], rel=1e-5)
    shifted = comparison_images(codec, {"ours": ours}, [data[1]], 0.12, noise, seed=0)  # keyed 0: another draw
    assert not torch.equal(shifted["decoder+bicubic"], images["decoder+bicubic"])


def test_evaluating_an_export_scores_the_photos_its_run_held_out(split_run, tiny_pairset, tmp_path):
    run, export = split_run
    pairs = tiny_pairset["pairs"]
    val_ids, held, trained = _held_out(pairs, 0.4, 1)
    assert held and not set(held) & trained
    # The old fallback split (0.1, seed 0) holds out a photo this run trained on: the test tells the two apart.
    assert set(_held_out(pairs, 0.1, 0)[1]) & trained
    record = json.loads((export / "ldlib_export.json").read_text())
    assert (record["val_fraction"], record["split_seed"]) == (0.4, 1)
    docs = {}
    for name, model in (("run", run), ("export", export)):
        docs[name] = doc = run_evaluation(model, pairs, tmp_path / name, "tiny", EvalConfig(sigmas=(0.0,), batch=4))
        ours = next(r for r in doc["rows"] if r["method"] == "ours")
        assert ours["n"] == len(val_ids) and sorted(set(ours["sources"])) == held
        assert doc["info"]["held_out_sources"] == held
        assert (doc["info"]["val_fraction"], doc["info"]["split_seed"]) == (0.4, 1)
    # The same pairs in the same order, decoded by the same (EMA) weights.
    per_pair = [next(r for r in docs[k]["rows"] if r["method"] == "ours")["per_pair"]["psnr"] for k in docs]
    assert per_pair[1] == pytest.approx(per_pair[0], rel=1e-5)


def test_an_export_that_records_no_split_is_refused_for_held_out_pairs(split_run, tiny_pairset, tmp_path, capsys):
    import shutil

    _, export = split_run
    pairs = tiny_pairset["pairs"]
    old = tmp_path / "old_export"  # what export wrote before it recorded the run's split
    shutil.copytree(export, old)
    record = json.loads((old / "ldlib_export.json").read_text())
    del record["val_fraction"], record["split_seed"]
    (old / "ldlib_export.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"records no training split.*--split all.*--val-fraction and --split-seed"):
        run_evaluation(old, pairs, tmp_path / "ev", "tiny", EvalConfig(sigmas=(0.0,)))
    assert not (tmp_path / "ev").exists()
    capsys.readouterr()
    argv = ["evaluate", str(old), str(pairs), "--preset", "tiny", "--sigmas", "0", "--out", str(tmp_path / "ev")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(old) in err and "--split all" in err
    # Given the split on the command line, the held-out photos are the run's.
    val_ids, held, _ = _held_out(pairs, 0.4, 1)
    assert main(["evaluate", str(old), str(pairs), "--preset", "tiny", "--sigmas", "0", "--val-fraction", "0.4",
                 "--split-seed", "1", "--out", str(tmp_path / "ev")]) == 0
    info = json.loads((tmp_path / "ev" / "eval.json").read_text())["info"]
    assert info["held_out_sources"] == held and info["held_out_pairs"] == len(val_ids)
    # A separate test set needs no split: every pair.
    assert main(["evaluate", str(old), str(pairs), "--preset", "tiny", "--sigmas", "0", "--split", "all",
                 "--out", str(tmp_path / "all")]) == 0
    rows = json.loads((tmp_path / "all" / "eval.json").read_text())["rows"]
    assert {r["n"] for r in rows} == {len(read_manifest(pairs))}


def test_max_pairs_reports_the_pairs_it_scored(split_run, tiny_pairset, tmp_path):
    run, _ = split_run
    pairs = tiny_pairset["pairs"]
    val_ids, held, _ = _held_out(pairs, 0.4, 1)
    first = {r["id"]: r["source"] for r in read_manifest(pairs)}[val_ids[0]]  # the split's first pair
    assert len(held) == 2 and first in held
    doc = run_evaluation(run, pairs, tmp_path / "ev", "tiny", EvalConfig(sigmas=(0.0,), max_pairs=1))
    assert {r["n"] for r in doc["rows"]} == {1}
    info = doc["info"]
    assert info["held_out_pairs"] == 1 and info["held_out_sources"] == [first]
    assert info["split_pairs"] == len(val_ids) and info["split_sources"] == held
    md = (tmp_path / "ev" / "eval.md").read_text()
    (other,) = set(held) - {first}
    assert f"1 pairs from 1 held-out photos: {first};" in md and other not in md
    assert f"the first 1 of the {len(val_ids)} pairs held out" in md


def test_a_pair_set_whose_hq_is_not_2x_its_lq_is_refused(tiny_run, lp, tmp_path, capsys):
    from ldlib.core.samples import sample_photos
    from ldlib.data.datasets import TensorPairs
    from ldlib.data.latents import default_cache_dir, encode_pairs
    from ldlib.data.pairs import PairSpec, build_pairs

    run, codec, data = tiny_run
    pairs = tmp_path / "pairs4"
    build_pairs(sample_photos(), pairs, PairSpec.from_preset("tiny", crops_per_image=1, lq_factor=4), workers=1,
                progress=False)
    encode_pairs(pairs, codec, default_cache_dir(pairs, "tiny"), progress=False, device="cpu")
    spec = json.loads((pairs / "pairset.json").read_text())["spec"]
    hq, lq = spec["hq_size"], spec["hq_size"] // spec["lq_factor"]
    assert spec["lq_factor"] == 4
    expected = (f"{pairs}: HQ {hq}x{hq} is 4x its LQ {lq}x{lq} (pairset.json: lq_factor 4), but a 2x decoder "
                f"outputs {2 * lq}x{2 * lq}: evaluate it on a pair set built with --lq-factor 2")
    with pytest.raises(ValueError) as e:
        run_evaluation(run, pairs, tmp_path / "ev", "tiny", EvalConfig(sigmas=(0.0,), split="all"))
    assert str(e.value) == expected
    capsys.readouterr()
    code = main(["evaluate", str(run), str(pairs), "--preset", "tiny", "--sigmas", "0", "--split", "all", "--out", str(tmp_path / "ev")])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: {expected}"
    # Pairs with no pairset.json (in memory here): the first decode's size is checked against HQ's.
    big = TensorPairs(data.latents, F.interpolate(data.hq, scale_factor=2), data.lq)  # HQ 4x its LQ
    ours, _ = load_run_codec(run)
    msg = r"the dataset: HQ is 64x64 \(4x its LQ\) but its 2x decodes are 32x32.*--lq-factor 2"
    with pytest.raises(ValueError, match=msg):
        evaluate_decoders(codec, {"ours": ours}, big, EvalConfig(sigmas=(0.0,)), lpips=lp, progress=False)


# --- issue 28, item 5: evaluate's numbers checked when parsed, before any model loads ------------------------------


@pytest.mark.parametrize("flag,value", [("--batch", "-1"), ("--batch", "0"), ("--max-pairs", "-1"), ("--max-pairs", "0"),
                                        ("--sigmas", "inf"), ("--sigmas", "nan"), ("--sigmas", "-1"),
                                        ("--sigmas", "1e30"), ("--sigmas", "0,1.5"), ("--split-seed", "-1"),
                                        ("--val-fraction", "nan"), ("--val-fraction", "1")])
def test_evaluate_refuses_bad_numbers_naming_the_flag_before_loading(flag, value, tmp_path, monkeypatch, capsys):
    import ldlib.apps.evaluate
    import ldlib.apps.upscale

    def loads(*a, **k):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(ldlib.apps.evaluate, "run_evaluation", loads)
    monkeypatch.setattr(ldlib.apps.upscale, "describe_model", loads)
    try:
        code = main(["evaluate", str(tmp_path / "run"), str(tmp_path / "pairs"), "--preset", "tiny", flag, value])
    except SystemExit as e:  # argparse's own refusal (a type error): usage, then one error line
        code = e.code
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if "error:" in x]
    assert code == 2 and len(errors) == 1 and flag in errors[0], err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_eval_config_refuses_what_the_command_line_would():
    for bad in (dict(batch=0), dict(max_pairs=-1), dict(sigmas=(float("inf"),)), dict(sigmas=(-0.1,)), dict(sigmas=())):
        with pytest.raises(ValueError, match="EvalConfig"):
            EvalConfig(**bad)
