"""PCA pictures: the basis comes from clean latents only and is applied unchanged to degraded ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ldlib.core.pca import LatentPCA, load_wan_latents


WAN_LATENTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "wan_latents" / "test_latents_wan.pth"


def correlated_latents(seed: int, n: int = 2, c: int = 6, h: int = 10, w: int = 12) -> torch.Tensor:
    """Latents whose channels are correlated (a random mixing), so the PCA has distinct components."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=g) * torch.linspace(3, 0.2, c)
    z = torch.randn(n, h, w, c, generator=g) @ mix.T + torch.arange(c).float()
    return z.permute(0, 3, 1, 2).contiguous()


def numpy_basis(x: torch.Tensor):
    """Mean and principal axes by numpy SVD of the centred pixel matrix (the independent reference)."""
    rows = x.double().permute(0, 2, 3, 1).reshape(-1, x.shape[1]).numpy()
    mean = rows.mean(0)
    _, _, vt = np.linalg.svd(rows - mean, full_matrices=False)
    return mean, vt, rows


def test_basis_matches_numpy_svd_of_clean():
    clean = correlated_latents(0)
    pca = LatentPCA.fit(clean)
    mean, vt, rows = numpy_basis(clean)
    np.testing.assert_allclose(pca.mean, mean, atol=1e-10)
    for k in range(3):  # axes agree up to sign
        assert abs(abs(np.dot(pca.components[k], vt[k])) - 1) < 1e-8
    # Display range = 1st / 99th percentile of the clean projections.
    proj = (rows - mean) @ pca.components.T
    np.testing.assert_allclose(pca.lo, np.percentile(proj, 1, axis=0))
    np.testing.assert_allclose(pca.hi, np.percentile(proj, 99, axis=0))


def test_degraded_uses_the_clean_basis_and_range():
    clean = correlated_latents(0)
    degraded = clean + 0.8 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    pca = LatentPCA.fit(clean)
    before = (pca.mean.copy(), pca.components.copy(), pca.lo.copy(), pca.hi.copy())
    rgb = pca.rgb(degraded)
    # Projecting degraded latents changes nothing in the fitted state...
    for a, b in zip(before, (pca.mean, pca.components, pca.lo, pca.hi)):
        np.testing.assert_array_equal(a, b)
    # ...and equals the manual projection with the clean mean/basis/range.
    rows = degraded.double().permute(0, 2, 3, 1).reshape(-1, clean.shape[1]).numpy()
    manual = (rows - pca.mean) @ pca.components[:3].T
    manual = np.clip((manual - pca.lo) / (pca.hi - pca.lo), 0, 1).reshape(2, 10, 12, 3)
    np.testing.assert_allclose(rgb, manual, atol=1e-12)
    # A basis fitted on the degraded latents would differ: the clean one is really the one used.
    mean_d, vt_d, _ = numpy_basis(degraded)
    assert not np.allclose(mean_d, pca.mean, atol=1e-3)
    # Differences are measured in the same basis and scale: clean vs itself is mid-grey.
    np.testing.assert_allclose(pca.diff_rgb(clean, clean), 0.5)
    d = pca.diff_rgb(clean, degraded)
    assert d.shape == (2, 10, 12, 3) and d.min() >= 0 and d.max() <= 1 and np.abs(d - 0.5).mean() > 0.01


def test_rgb_range_and_clean_percentiles():
    clean = correlated_latents(2)
    rgb = LatentPCA.fit(clean).rgb(clean)
    assert rgb.shape == (2, 10, 12, 3) and rgb.min() == 0.0 and rgb.max() == 1.0
    # About 1% of clean pixels clip at each end of each component.
    assert 0.005 < (rgb == 0).mean() < 0.03 and 0.005 < (rgb == 1).mean() < 0.03


def test_subsampled_fit_is_seeded():
    clean = correlated_latents(3, n=4, h=20, w=20)
    a = LatentPCA.fit(clean, max_pixels=300, seed=1)
    b = LatentPCA.fit(clean, max_pixels=300, seed=1)
    np.testing.assert_array_equal(a.components, b.components)


def test_channel_mismatch_is_an_error():
    pca = LatentPCA.fit(correlated_latents(0))
    with pytest.raises(ValueError, match="channels"):
        pca.rgb(torch.zeros(1, 4, 3, 3))


@pytest.mark.skipif(not WAN_LATENTS.is_file(), reason="../shared/data/wan_latents absent (real Wan latents)")
def test_real_wan_latents_picture():
    frames = load_wan_latents(WAN_LATENTS)
    assert frames.shape == (16, 16, 40, 64)
    pca = LatentPCA.fit(frames)
    assert pca.explained_variance_ratio.sum() > 0.3
    rgb = pca.rgb(frames[:2])
    assert rgb.shape == (2, 40, 64, 3) and 0.3 < rgb.mean() < 0.7
