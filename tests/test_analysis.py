"""Sigma-sweep statistics against direct numpy / closed-form computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldlib.apps.analysis import SweepConfig, pair_batch, reference_at, sigma_sweep
from ldlib.build import codec_of
from ldlib.core.images import area_downsample
from ldlib.core.metrics import high_freq_share, relative_error, white_noise_hf_share
from ldlib.degrade import NoiseDegrader, add_noise


def test_high_freq_share_closed_forms():
    i, j = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    constant = torch.ones(1, 2, 16, 16)
    checker = ((-1.0) ** (i + j)).expand(1, 2, 16, 16)
    low_cos = torch.cos(2 * torch.pi * 2 / 16 * i).float().expand(1, 1, 16, 16)  # 0.125 cycles/px < Nyquist/2
    high_cos = torch.cos(2 * torch.pi * 6 / 16 * j).float().expand(1, 1, 16, 16)  # 0.375 cycles/px > Nyquist/2
    torch.testing.assert_close(high_freq_share(constant), torch.zeros(1))
    torch.testing.assert_close(high_freq_share(checker), torch.ones(1))
    torch.testing.assert_close(high_freq_share(low_cos), torch.zeros(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(high_freq_share(high_cos), torch.ones(1), atol=1e-6, rtol=0)
    assert torch.isnan(high_freq_share(torch.zeros(1, 1, 4, 4))).all()


def test_high_freq_share_matches_numpy_and_white_noise():
    x = torch.randn(3, 4, 12, 20, generator=torch.Generator().manual_seed(0))
    e = (np.abs(np.fft.fft2(x.double().numpy())) ** 2).sum(1)
    fy, fx = np.abs(np.fft.fftfreq(12))[:, None], np.abs(np.fft.fftfreq(20))[None, :]
    mask = np.maximum(fy, fx) > 0.25
    expected = (e * mask).sum((1, 2)) / e.sum((1, 2))
    np.testing.assert_allclose(high_freq_share(x).numpy(), expected, rtol=1e-5)
    # Many white-noise samples average to the exact white-noise share of this grid (0.75 in the limit).
    noise = torch.randn(200, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    assert abs(high_freq_share(noise).mean().item() - white_noise_hf_share(32, 32)) < 0.005
    assert abs(white_noise_hf_share(1024, 1024) - 0.75) < 0.002


def test_relative_error():
    # float64: two float32 norms summed in other orders could differ by more than a fixed 1e-6 on other CPUs.
    a, b = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    expected = [np.linalg.norm((a[k] - b[k]).numpy()) / np.linalg.norm(b[k].numpy()) for k in range(2)]
    np.testing.assert_allclose(relative_error(a, b).numpy(), expected, rtol=1e-12)
    # Half-precision latents (an fp16 export's output) are measured in float32: a 32 x 64 x 64 latent's squared norm
    # is past float16's range.
    h, g = (50 * torch.randn(1, 32, 64, 64)).half(), (50 * torch.randn(1, 32, 64, 64)).half()
    hd, gd = h.double().numpy()[0], g.double().numpy()[0]
    err = relative_error(h, g)
    assert err.dtype == torch.float32
    np.testing.assert_allclose(err.numpy(), [np.linalg.norm(hd - gd) / np.linalg.norm(gd)], rtol=1e-5)


class PoolCodec:
    """A stand-in codec: encode = 2x area downsample, decode = nearest 2x upsample (cheap, exact)."""

    def encode(self, x):
        return area_downsample(x, 2)

    def decode(self, z):
        return F.interpolate(z, scale_factor=2, mode="nearest").clamp(-1, 1)


def test_sigma_sweep_rows_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    hq = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    lq = area_downsample(hq, 2)
    mad = lambda a, b: (a - b).abs().flatten(1).mean(1)  # noqa: E731  (a cheap stand-in for LPIPS)
    cfg = SweepConfig(sigmas=(0.0, 0.1, 0.3), seed=5, batch_size=2)
    res = sigma_sweep(PoolCodec(), NoiseDegrader(), lq, hq, cfg, lpips_fn=mad, progress=False)
    codec = PoolCodec()
    z = codec.encode(lq)
    ref = reference_at(hq, (16, 16))
    assert torch.equal(ref, lq) and "downsampled" in res.hq_reference
    for row, s in zip(res.rows, cfg.sigmas):
        # Batches of 2 draw noise from one generator in sequence: the same stream as one batch of 3.
        zd = add_noise(z, s, torch.Generator().manual_seed(5))
        dec, dec0 = codec.decode(zd), codec.decode(z)
        assert row["sigma"] == s
        assert row["rel_err"] == pytest.approx(relative_error(zd, z).mean().item(), rel=1e-5)
        assert row["lpips_clean"] == pytest.approx(mad(dec, dec0).mean().item(), rel=1e-5, abs=1e-7)
        mse = ((dec - lq) ** 2).flatten(1).mean(1)
        assert row["psnr_hq"] == pytest.approx((10 * torch.log10(4 / mse)).mean().item(), rel=1e-5)
    assert res.rows[0]["rel_err"] == 0 and np.isnan(res.rows[0]["hf_share"])
    assert res.rows[1]["rel_err"] < res.rows[2]["rel_err"]
    assert "| 0.3 |" in res.markdown()


def test_pair_batch_builds_recipe_pairs(tmp_path):
    from ldlib.presets import get_preset

    hq, lq, ids = pair_batch(get_preset("tiny"), n=2, work_dir=tmp_path)
    assert hq.shape == (2, 3, 128, 128) and lq.shape == (2, 3, 64, 64) and len(set(ids)) == 2
    # LQ is the area 0.5x of HQ (up to the 8-bit rounding of the stored PNGs).
    assert (area_downsample(hq, 2) - lq).abs().max() <= 1.01 / 127.5
    hq2, _, ids2 = pair_batch(get_preset("tiny"), n=2, work_dir=tmp_path)  # resumes: the same pairs
    assert ids2 == ids and torch.equal(hq2, hq)
    # Built under a folder named for the photo folder (its name and path hash): another folder of the same name
    # gets a pair set of its own.
    from ldlib.core.samples import sample_photos
    from ldlib.data.pairs import folder_tag

    assert [p.name for p in tmp_path.iterdir()] == [f"pairs_tiny_128_{folder_tag(sample_photos())}"]


def test_sweep_cli_writes_results(tmp_path, capsys):
    import json

    from ldlib.apps.cli import main

    assert main(["sweep", "--preset", "tiny", "--n", "1", "--sigmas", "0,0.1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["sigma"] for r in data["rows"]] == [0.0, 0.1]
    assert data["rows"][0]["psnr_clean"] is None and data["rows"][0]["rel_err"] == 0  # identical: no finite PSNR
    assert data["rows"][1]["rel_err"] > 0 and data["degrader"] == "NoiseDegrader"
    assert (tmp_path / "sweep.png").stat().st_size > 1000 and "| 0.1 |" in capsys.readouterr().out


def test_sweep_seeds_in_one_out_measure_the_same_pairs_with_other_noise(tmp_path, capsys, monkeypatch):
    """--seed is the noise seed only: a second seed in the same --out runs on the same pairs (the pair set is cut
    with --pair-seed), its sigma-0 row is the first's, and each seed's latent error is that of its own noise."""
    import json

    from ldlib.apps.cli import main
    from ldlib.presets import get_preset

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPU noise: a CUDA generator draws other numbers
    rows, notes = {}, {}
    for seed in (0, 1):
        assert main(["sweep", "--preset", "tiny", "--n", "2", "--sigmas", "0,0.1", "--seed", str(seed), "--out", str(tmp_path)]) == 0
        data = json.loads((tmp_path / "sweep.json").read_text())
        rows[seed], notes[seed] = data["rows"], [t for t in data["notes"] if "pairs:" in t]
    capsys.readouterr()
    _, lq, ids = pair_batch(get_preset("tiny"), n=2, work_dir=tmp_path)  # the pair set the sweeps built
    assert notes[0] == notes[1] == [f"preset tiny, 2 pairs: {', '.join(ids)}"]
    assert rows[0][0] == rows[1][0]  # no noise at sigma 0: the same crops give the same numbers
    with torch.no_grad():
        z = codec_of(get_preset("tiny")).encode(lq)
    for seed in (0, 1):
        zd = add_noise(z, 0.1, torch.Generator().manual_seed(seed))
        assert rows[seed][1]["rel_err"] == pytest.approx(relative_error(zd, z).mean().item(), rel=1e-5)
    assert rows[0][1]["rel_err"] != rows[1][1]["rel_err"]


def test_sigma_sweep_moves_the_lpips_it_builds_to_the_images_device(monkeypatch):
    """Without lpips_fn, sigma_sweep builds LPIPS (lpips_model builds on the CPU) and must move it to the decodes'
    device: run_sweep decodes on CUDA when there is one. A stand-in records where it is moved and refuses inputs
    elsewhere; on a CPU-only machine this shows the move, not a CUDA mismatch itself."""
    import ldlib.core.metrics

    class RecordingLPIPS(torch.nn.Module):
        moved_to = None

        def to(self, device, *args, **kwargs):
            self.moved_to = torch.device(device)
            return self

        def forward(self, a, b):
            assert self.moved_to == a.device == b.device, (self.moved_to, a.device, b.device)
            return (a - b).abs().flatten(1).mean(1)

    built = []

    def lpips_model(net="alex", seed=0):
        built.append(RecordingLPIPS())
        return built[-1]

    monkeypatch.setattr(ldlib.core.metrics, "lpips_model", lpips_model)
    hq = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    res = sigma_sweep(PoolCodec(), NoiseDegrader(), area_downsample(hq, 2), hq, SweepConfig(sigmas=(0.0, 0.1)),
                      progress=False)
    assert len(built) == 1 and built[0].moved_to == hq.device and len(res.rows) == 2
    assert res.rows[1]["lpips_clean"] > 0
