"""Latent degraders: what a diffusion model does to latents, applied in the normalised latent space.

Every degrader noises latents to a strength sigma the flow-matching way, ``x_s = (1 - s) * x0 + s * eps``, then
maps them back with its ``denoise`` (nothing for the noise-only baseline; the teacher's own Euler loop; a trained
proxy), or serves cached teacher outputs. The vocabulary, parsed in one place (``parse_degrader``) for the command
line, notebooks, training and evaluation:

    none          no degradation (sigma 0)
    noise         noising alone: the baseline
    diffusion     the preset's diffusion teacher, live (noise, then Euler steps back to sigma 0)
    proxy:DIR     a trained proxy of the teacher (``python -m ldlib train-proxy``)
    teacher:DIR   cached teacher outputs (``python -m ldlib teacher``), picked per pair id

Two ways to call one: ``degrade(latents, sigma, generator)`` draws the noise of the whole batch from one generator
(pictures, sweeps); ``degrade_samples(latents, sigma, generators, ids)`` draws each sample's noise from its own
generator, so a sample's degradation does not depend on the batch or the process it lands in (training under DDP,
resumption, evaluation), while the model still runs once on the whole batch.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

VOCABULARY = "none | noise | diffusion | proxy:DIR | teacher:DIR"


def sigma_tensor(sigma: float | torch.Tensor, latents: torch.Tensor,
                 device: str | torch.device | None = None) -> torch.Tensor:
    """sigma as an (N, 1, 1, 1) tensor of latents' dtype on latents' device or ``device`` (a float: every sample)."""
    s = torch.as_tensor(sigma, dtype=latents.dtype, device=device or latents.device)
    if s.dim() == 0:
        s = s.expand(latents.shape[0])
    if s.shape != (latents.shape[0],):
        raise ValueError(f"sigma must be a float or a ({latents.shape[0]},) tensor, got shape {tuple(s.shape)}")
    return s.view(-1, *([1] * (latents.dim() - 1)))


def add_noise(
    latents: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Flow-matching noising ``(1 - s) * x0 + s * eps`` with eps ~ N(0, 1) drawn from generator."""
    eps = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    s = sigma_tensor(sigma, latents)
    return (1 - s) * latents + s * eps


def sample_noise(latents: torch.Tensor, sigma: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """eps like latents, sample i drawn on the CPU from generators[i] (zeros where sigma is 0, nothing drawn).

    Drawn on the CPU and moved: the same generators give the same noise on every device.
    """
    if len(generators) != latents.shape[0]:
        raise ValueError(f"need one generator per sample: {len(generators)} for {latents.shape[0]} latents")
    eps = [torch.randn(latents.shape[1:], generator=g, dtype=latents.dtype) if float(s) > 0
           else torch.zeros(latents.shape[1:], dtype=latents.dtype) for s, g in zip(sigma.tolist(), generators)]
    return torch.stack(eps).to(latents.device)


class Degrader:
    """Base of the noising degraders: ``denoise(x_sigma, sigma)`` maps noised latents back (identity here).

    Samples at sigma 0 come back unchanged (bit-identical) and cost no model call.
    """

    def denoise(self, x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Map noised latents back towards sigma 0 (per-sample sigma, shape (N,))."""
        return x_sigma

    @torch.no_grad()
    def degrade(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Noise the batch to sigma with one generator, then ``denoise``."""
        s = sigma_tensor(sigma, latents)
        return self._finish(latents, add_noise(latents, sigma, generator), s)

    @torch.no_grad()
    def degrade_samples(
        self, latents: torch.Tensor, sigma: torch.Tensor, generators: Sequence[torch.Generator],
        ids: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(degraded latents, sigma used): sample i noised with generators[i], one ``denoise`` for the batch.

        Which samples to noise is decided on a host copy of sigma: with latents on a GPU nothing is read back.
        """
        s_host = sigma_tensor(sigma, latents, device="cpu")
        s = s_host.to(latents.device)
        x_sigma = (1 - s) * latents + s * sample_noise(latents, s_host.flatten(), generators)
        return self._finish(latents, x_sigma, s, s_host.flatten()), s_host.flatten().float()

    def coverage(self, ids: Sequence[str]) -> float:
        """Share of the given pair ids this degrader can degrade (cached data may cover some only)."""
        return 1.0

    def to(self, device: str | torch.device) -> "Degrader":
        """Move the degrader's model (if any) to device; returns self."""
        return self

    def _finish(self, latents: torch.Tensor, x_sigma: torch.Tensor, s: torch.Tensor,
                s_host: torch.Tensor | None = None) -> torch.Tensor:
        # The active samples from sigma on the host when the caller has it there (no device read).
        active = ((s_host if s_host is not None else s.flatten()) > 0).nonzero().flatten()
        if len(active) == 0:
            return latents.clone()
        out = self.denoise(x_sigma[active], s.flatten()[active])
        if out.shape != x_sigma[active].shape:
            raise ValueError(f"{type(self).__name__} returned shape {tuple(out.shape)}, expected {tuple(x_sigma[active].shape)}")
        result = latents.clone()
        result[active] = out.to(latents.dtype)
        return result


class NoiseDegrader(Degrader):
    """The noising alone (no denoising): a baseline, and the stand-in when no teacher exists."""


class ProxyDegrader(Degrader):
    """A trained proxy ``net(x_sigma, sigma) -> latents`` standing in for the teacher (``ldlib.train.proxy``)."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def to(self, device: str | torch.device) -> "ProxyDegrader":
        """Move the net to device (eval mode); returns self."""
        self.net = self.net.to(device).eval()
        return self

    def denoise(self, x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The proxy net at per-sample sigma, without gradients: its output is a training input."""
        with torch.no_grad():
            return self.net(x_sigma, sigma)


class CachedTeacher:
    """Cached teacher outputs as the degradation (``teacher:DIR``, data from ``python -m ldlib teacher``).

    Per sample, one of its pair's teacher records with sigma_min <= sigma <= sigma_max is drawn with the sample's
    generator; the record's own sigma is the sample's sigma. A pair with no such record (e.g. a held-out photo) is
    used clean (sigma 0); ``coverage`` says how many pairs have one. Needs pair ids.
    """

    def __init__(self, folder: str | os.PathLike, sigma_max: float, codec=None, sigma_min: float = 0.0) -> None:
        from ..data.teacher_data import TeacherSet

        self.teacher = TeacherSet(folder)
        if codec is not None:
            from ..data.latents import same_codec

            if not same_codec(self.teacher.info.get("identity", {}), codec.identity()):
                raise ValueError(f"{folder}: teacher data was made from another codec's latents than this preset's")
        self.by_id: dict[str, list[dict]] = {}
        for r in self.teacher.records:
            if sigma_min <= r["sigma"] <= sigma_max:
                self.by_id.setdefault(r["id"], []).append(r)
        if not self.by_id:
            raise ValueError(f"{folder}: no teacher record has sigma in [{sigma_min}, {sigma_max}]")

    def coverage(self, ids: Sequence[str]) -> float:
        """Share of the given pair ids that have at least one usable teacher record."""
        return sum(i in self.by_id for i in ids) / max(1, len(ids))

    def to(self, device: str | torch.device) -> "CachedTeacher":
        """Nothing to move: targets are read per sample and follow the latents' device; returns self."""
        return self

    def degrade(self, latents: torch.Tensor, sigma, generator=None) -> torch.Tensor:
        """Not available: cached outputs belong to pair ids (use degrade_samples)."""
        raise ValueError("cached teacher data is looked up by pair id: call degrade_samples(..., ids=...)")

    def degrade_samples(
        self, latents: torch.Tensor, sigma: torch.Tensor, generators: Sequence[torch.Generator],
        ids: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher outputs, their sigmas): a random usable record per pair id, or the clean latent and 0."""
        if ids is None:
            raise ValueError("the teacher degrader needs pair ids: train on a pair set (PairDataset)")
        outs, used = [], []
        for z, pair, g in zip(latents, ids, generators):
            recs = self.by_id.get(pair)
            if not recs:
                outs.append(z)
                used.append(0.0)
                continue
            r = recs[int(torch.randint(0, len(recs), (), generator=g))]
            outs.append(self.teacher.target(r["key"]).to(z))
            used.append(float(r["sigma"]))
        return torch.stack(outs), torch.tensor(used)


# ------------------------------------------------------------------------------------------------------------
# the diffusion teacher
# ------------------------------------------------------------------------------------------------------------


def sigma_grid(sigma: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-sample Euler grids, N x (steps + 1): row i is ``s_i * (1 - k / steps)``, k = 0..steps (ends at 0)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    k = torch.arange(steps + 1, dtype=sigma.dtype, device=sigma.device)
    return sigma.reshape(-1, 1) * (1 - k / steps)


class DiffusionDegrader(Degrader):
    """Noise to sigma, then denoise back to 0 with a flow-matching transformer (Wan's WanTransformer3DModel).

    The Euler loop is our own, on explicit raw sigmas (no scheduler shift): with per-sample sigmas every sample
    follows its own grid ``s_i * (1 - k / steps)`` and all take the same step index k together, so one batched
    transformer call per step serves samples at different noise levels. ``last_grid`` (N x (steps + 1), CPU)
    records the sigmas actually used by the latest call. The transformer sees N x C x 1 x H x W (an image is one
    frame), ``timestep = sigma * 1000`` per sample, and predicts the velocity ``v = eps - x0``.
    """

    def __init__(
        self,
        transformer: nn.Module,
        prompt_embeds: torch.Tensor,
        steps: int = 1,
        guidance_scale: float | None = None,
        negative_embeds: torch.Tensor | None = None,
        batch_size: int | None = None,
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if guidance_scale is not None and guidance_scale != 1.0 and negative_embeds is None:
            raise ValueError("classifier-free guidance needs negative_embeds (the unconditional embedding)")
        if prompt_embeds.dim() != 3 or prompt_embeds.shape[0] != 1:
            raise ValueError(f"prompt_embeds must be 1 x L x D, got {tuple(prompt_embeds.shape)}")
        text_dim = getattr(getattr(transformer, "config", None), "text_dim", None)
        if text_dim is not None and prompt_embeds.shape[-1] != text_dim:
            raise ValueError(f"prompt_embeds width {prompt_embeds.shape[-1]} != the transformer's text_dim {text_dim}")
        self.transformer = transformer
        self.prompt_embeds = prompt_embeds
        self.negative_embeds = negative_embeds
        self.steps = int(steps)
        self.guidance_scale = guidance_scale
        self.batch_size = batch_size
        self.last_grid: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> "DiffusionDegrader":
        """Move the transformer to device; returns self."""
        self.transformer = self.transformer.to(device)
        return self

    def with_steps(self, steps: int) -> "DiffusionDegrader":
        """The same teacher (shared transformer and embeddings) with another number of Euler steps."""
        return DiffusionDegrader(self.transformer, self.prompt_embeds, steps, self.guidance_scale,
                                 self.negative_embeds, self.batch_size)

    @property
    def uses_guidance(self) -> bool:
        """Whether classifier-free guidance is on (off by default)."""
        return self.guidance_scale is not None and self.guidance_scale != 1.0

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity (float32, N x C x H x W) at per-sample sigma (N,)."""
        model = self.transformer
        param = next(model.parameters())
        n = x.shape[0]
        hidden = x.unsqueeze(2).to(param.dtype)  # N, C, T=1, H, W
        timestep = (sigma * 1000).to(device=x.device, dtype=torch.float32)
        cond = self.prompt_embeds.to(device=x.device, dtype=param.dtype).expand(n, -1, -1)
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if x.device.type == "cuda" else nullcontext()
        )
        with autocast:
            v = model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=cond, return_dict=False)[0]
            if self.uses_guidance:
                uncond = self.negative_embeds.to(device=x.device, dtype=param.dtype).expand(n, -1, -1)
                v_u = model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=uncond, return_dict=False)[0]
                v = v_u + self.guidance_scale * (v - v_u)
        return v.squeeze(2).float()

    @torch.no_grad()
    def denoise(self, x_sigma: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """Euler-integrate x_sigma from sigma to 0 in ``steps`` steps; samples at sigma 0 come back unchanged."""
        if x_sigma.dim() != 4:
            raise ValueError(f"latents must be N x C x H x W, got shape {tuple(x_sigma.shape)}")
        s = sigma_tensor(sigma, x_sigma.float()).flatten()
        if (s < 0).any() or (s > 1).any():
            raise ValueError(f"sigma must lie in [0, 1], got {s.tolist()}")
        grid = sigma_grid(s, self.steps)
        self.last_grid = grid.cpu()
        # Samples at sigma 0 are returned as they are (bit-identical) and cost no transformer call.
        active = (s > 0).nonzero().flatten()
        out = x_sigma.clone()
        if len(active) == 0:
            return out
        x0, grid_a = x_sigma[active].float(), grid[active]
        bs = self.batch_size or len(active)
        outs = []
        for i in range(0, len(active), bs):
            x, g = x0[i : i + bs], grid_a[i : i + bs]
            for k in range(self.steps):
                v = self.velocity(x, g[:, k])
                x = x + (g[:, k + 1] - g[:, k]).view(-1, 1, 1, 1) * v
            outs.append(x)
        out[active] = torch.cat(outs).to(x_sigma.dtype)
        return out


def diffusion_degrader(
    preset,
    steps: int = 1,
    prompt: str = "negative",
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    guidance_scale: float | None = None,
    batch_size: int | None = None,
) -> DiffusionDegrader:
    """A preset's teacher: its transformer (bf16 on CUDA) and the cached embedding of prompt ("negative"/"empty")."""
    from ..models.prompts import prompt_embedding

    dtype = torch.bfloat16 if str(device or "cpu").startswith("cuda") else torch.float32
    if getattr(preset, "trained_teacher", False):  # refuse a teacher of another latent space than the preset's codec
        from ..train.teacher import check_teacher_codec, read_teacher_info

        if guidance_scale not in (None, 1.0):  # one fixed embedding: the "unconditional" one would be the same
            raise ValueError(f"guidance_scale {guidance_scale}: the {preset.name} teacher was trained on one fixed "
                             "prompt embedding, so classifier-free guidance has nothing to contrast; leave it unset")

        check_teacher_codec(read_teacher_info(preset.transformer), preset.load_codec().identity(), preset.transformer)
    transformer = preset.load_transformer(device=device, dtype=dtype)
    emb = prompt_embedding(preset, prompt, cache_dir=cache_dir, device=device)
    neg = prompt_embedding(preset, "empty", cache_dir=cache_dir, device=device) if guidance_scale else None
    return DiffusionDegrader(transformer, emb, steps=steps, guidance_scale=guidance_scale, negative_embeds=neg,
                             batch_size=batch_size)


# ------------------------------------------------------------------------------------------------------------
# the vocabulary
# ------------------------------------------------------------------------------------------------------------


def parse_degrader(spec: str | None, preset=None, codec=None, sigma_max: float = 0.12, steps: int = 1,
                   prompt: str = "negative", device: str | torch.device | None = None, sigma_min: float = 0.0):
    """A degrader from its name (see the module docstring); None for ``none``.

    ``preset``: needed by ``diffusion`` (its teacher); ``codec``: checks that cached teacher data matches its
    latents; ``sigma_min`` / ``sigma_max``: the range of cached-teacher sigmas used; ``steps`` / ``prompt``: the
    live teacher's.
    """
    spec = (spec or "none").strip()
    kind, _, arg = spec.partition(":")
    if kind == "none" and not arg:
        return None
    if kind == "noise" and not arg:
        return NoiseDegrader()
    if kind == "diffusion" and not arg:
        if preset is None:
            raise ValueError("the diffusion degrader needs a preset (its teacher)")
        return diffusion_degrader(preset, steps=steps, prompt=prompt, device=device)
    if kind in ("proxy", "teacher"):
        if not arg:
            raise ValueError(f"degrader {kind!r} needs its folder: {kind}:DIR")
        folder = Path(arg)
        if not folder.is_dir():
            made_by = "train-proxy (notebook 03)" if kind == "proxy" else "`python -m ldlib teacher`"
            raise FileNotFoundError(f"{folder}: {kind} folder not found (made by {made_by})")
        if kind == "proxy":
            from ..train.proxy import load_proxy

            return ProxyDegrader(load_proxy(folder, device))
        return CachedTeacher(folder, sigma_max, codec, sigma_min=sigma_min)
    raise ValueError(f"unknown degrader {spec!r}; choose {VOCABULARY}")
