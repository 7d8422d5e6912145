"""PCA pictures of latents: one basis fitted on CLEAN latents, applied unchanged to degraded ones.

Every latent pixel is a sample (its C channel values are the features). Three components map to R, G, B with a
per-component range taken from the clean projections (percentiles), so a colour means the same thing in the clean
and the degraded picture: degradation shows up as changed colours and speckle, never as a re-fitted palette.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def _pixels(latents: torch.Tensor | np.ndarray) -> np.ndarray:
    """N x C x H x W (or C x H x W) latents -> (N*H*W) x C float64 rows, one per latent pixel."""
    a = latents.detach().float().cpu().numpy() if isinstance(latents, torch.Tensor) else np.asarray(latents, np.float64)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise ValueError(f"latents must be N x C x H x W or C x H x W, got shape {a.shape}")
    return a.transpose(0, 2, 3, 1).reshape(-1, a.shape[1]).astype(np.float64)


@dataclass
class LatentPCA:
    """A PCA basis of latent channel vectors and the display range of each component (from clean latents)."""

    mean: np.ndarray  # (C,)
    components: np.ndarray  # (k, C), rows orthonormal
    explained_variance_ratio: np.ndarray  # (k,)
    lo: np.ndarray  # (k,) display range per component, from the clean projections
    hi: np.ndarray

    @classmethod
    def fit(
        cls,
        clean: torch.Tensor | np.ndarray,
        n_components: int = 3,
        percentiles: tuple[float, float] = (1.0, 99.0),
        max_pixels: int = 200_000,
        seed: int = 0,
    ) -> "LatentPCA":
        """Fit on clean latents' pixels (a seeded subsample past max_pixels); display range = percentiles."""
        from sklearn.decomposition import PCA

        x = _pixels(clean)
        if x.shape[1] < n_components:
            raise ValueError(f"{n_components} components need at least as many channels, latents have {x.shape[1]}")
        fit_rows = x
        if len(x) > max_pixels:
            fit_rows = x[np.random.default_rng(seed).choice(len(x), max_pixels, replace=False)]
        pca = PCA(n_components=n_components, svd_solver="full").fit(fit_rows)
        proj = (x - pca.mean_) @ pca.components_.T
        lo, hi = np.percentile(proj, percentiles, axis=0)
        return cls(pca.mean_, pca.components_, pca.explained_variance_ratio_, lo, np.maximum(hi, lo + 1e-8))

    def project(self, latents: torch.Tensor | np.ndarray) -> np.ndarray:
        """N x k x H x W component scores of latents in this (clean) basis."""
        a = latents.detach().float().cpu().numpy() if isinstance(latents, torch.Tensor) else np.asarray(latents)
        a = a[None] if a.ndim == 3 else a
        if a.shape[1] != self.mean.shape[0]:
            raise ValueError(f"latents have {a.shape[1]} channels, the PCA was fitted on {self.mean.shape[0]}")
        n, _, h, w = a.shape
        proj = (_pixels(a) - self.mean) @ self.components.T
        return proj.reshape(n, h, w, -1).transpose(0, 3, 1, 2)

    def rgb(self, latents: torch.Tensor | np.ndarray) -> np.ndarray:
        """N x H x W x 3 picture in [0, 1]: the first 3 components scaled by the clean range, clipped."""
        p = self.project(latents)[:, :3]
        scaled = (p - self.lo[:3, None, None]) / (self.hi[:3] - self.lo[:3])[:, None, None]
        return np.clip(scaled, 0.0, 1.0).transpose(0, 2, 3, 1)

    def diff_rgb(self, clean: torch.Tensor | np.ndarray, degraded: torch.Tensor | np.ndarray) -> np.ndarray:
        """N x H x W x 3 picture of the component change, mid-grey = none, full colour = a whole clean range."""
        d = self.project(degraded)[:, :3] - self.project(clean)[:, :3]
        scaled = 0.5 + d / (self.hi[:3] - self.lo[:3])[:, None, None]
        return np.clip(scaled, 0.0, 1.0).transpose(0, 2, 3, 1)


def wan_latents_as_images(latents: torch.Tensor) -> torch.Tensor:
    """A Wan pipeline's 1 x T x C x H x W (or T x C x H x W) video latents as T x C x H x W frames (float32)."""
    if latents.dim() == 5:
        if latents.shape[0] != 1:
            raise ValueError(f"expected one video (1 x T x C x H x W), got shape {tuple(latents.shape)}")
        latents = latents[0]
    if latents.dim() != 4:
        raise ValueError(f"expected T x C x H x W video latents, got shape {tuple(latents.shape)}")
    return latents.float()


def load_wan_latents(path) -> torch.Tensor:
    """Frames (T x C x H x W, float32, CPU) of a Wan latent video saved with torch.save (weights_only load)."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such latents file")
    try:
        # The file was saved from a GPU; map to CPU so it loads anywhere.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for foreign/corrupt files
        raise ValueError(f"{path}: not a torch-saved tensor ({type(e).__name__}: {e})") from e
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: expected one tensor, got {type(obj).__name__}")
    return wan_latents_as_images(obj)


def latents_figure(images: list[torch.Tensor], latents: list[torch.Tensor], titles: list[str] | None = None, fig=None):
    """Row 1: images (3 x H x W in [-1, 1]); row 2: their latents (C x h x w) as PCA pictures in one basis."""
    from matplotlib.figure import Figure

    z = torch.stack([torch.as_tensor(t).float() for t in latents])
    pictures = LatentPCA.fit(z).rgb(z)
    fig = fig or Figure(figsize=(2.6 * len(images), 5.4), dpi=100)
    axes = fig.subplots(2, len(images), squeeze=False)
    for j, (img, pic) in enumerate(zip(images, pictures)):
        axes[0, j].imshow(((img.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
        axes[0, j].set_title((titles[j] + "\n" if titles else "") + f"LQ {tuple(img.shape[1:])}", fontsize=8)
        axes[1, j].imshow(pic, interpolation="nearest")
        axes[1, j].set_title(f"latent {tuple(z.shape[1:])}, PCA", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    return fig
