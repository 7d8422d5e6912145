"""Latent degraders: what a diffusion model does to latents, applied in the normalised latent space.

One interface for all: ``degrader.degrade(latents, sigma, generator) -> latents`` with sigma a float or a
per-sample tensor of shape (N,). Flow matching noises as ``x_s = (1 - s) * x0 + s * eps``.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn as nn

# Wan's generic negative prompt (Wan-Video/Wan2.1, wan/configs/shared_config.py, sample_neg_prompt), verbatim.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
PROMPTS = {"empty": "", "negative": WAN_NEGATIVE_PROMPT}


class Degrader(Protocol):
    """Anything that degrades normalised latents to a strength sigma."""

    def degrade(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor: ...


def sigma_tensor(sigma: float | torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """sigma as an (N, 1, 1, 1) tensor on latents' device and dtype (a float applies to every sample)."""
    s = torch.as_tensor(sigma, dtype=latents.dtype, device=latents.device)
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


class NoiseDegrader:
    """The noising alone (no denoising): a baseline, and the offline stand-in when no teacher exists."""

    def degrade(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Return ``(1 - s) * x0 + s * eps``."""
        return add_noise(latents, sigma, generator)


# ------------------------------------------------------------------------------------------------------------
# prompt embeddings: computed once with the pipeline's text encoder, cached to safetensors
# ------------------------------------------------------------------------------------------------------------


def resolve_prompt(prompt: str) -> str:
    """"empty" and "negative" name the two degrader prompts; any other string is used as the prompt itself."""
    return PROMPTS.get(prompt, prompt)


def encode_prompt(prompt: str, tokenizer, text_encoder: nn.Module, max_sequence_length: int = 512) -> torch.Tensor:
    """1 x L x D prompt embedding exactly as diffusers' Wan pipelines compute it (padding positions zeroed)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    inputs = tokenizer(
        [prompt_clean(prompt)],
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    device = next(text_encoder.parameters()).device
    with torch.no_grad():
        hidden = text_encoder(ids.to(device), mask.to(device)).last_hidden_state
    # The pipeline keeps the real tokens and zeroes the rest (the encoder's outputs at padding are not used).
    keep = mask.to(device).gt(0).unsqueeze(-1)
    return torch.where(keep, hidden, torch.zeros_like(hidden)).float().cpu()


class PromptCache:
    """Prompt embeddings keyed by (text encoder id, prompt, length), one safetensors file each in a folder.

    ``get`` calls ``encode(prompt)`` only when no file exists, so a multi-GB text encoder loaded lazily inside
    ``encode`` is loaded once per prompt and machine, never again.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def path(self, model_id: str, prompt: str, max_sequence_length: int = 512) -> Path:
        """The cache file of one (model id, prompt, length)."""
        key = hashlib.sha256(f"{model_id}\0{prompt}\0{max_sequence_length}".encode()).hexdigest()[:20]
        return self.folder / f"prompt_{key}.safetensors"

    def get(
        self,
        model_id: str,
        prompt: str,
        encode: Callable[[str], torch.Tensor],
        max_sequence_length: int = 512,
    ) -> torch.Tensor:
        """The cached 1 x L x D embedding, computing it with encode(prompt) and writing the file on a miss."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open, save

        from .images import atomic_write_bytes

        path = self.path(model_id, prompt, max_sequence_length)
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                emb = load_file(str(path))["prompt_embeds"]
            except (SafetensorError, KeyError, OSError) as e:
                raise ValueError(f"{path}: unreadable prompt-embedding cache file ({e}); delete it to recompute") from e
            if meta.get("model_id") != model_id or meta.get("prompt") != prompt:
                raise ValueError(f"{path}: cache key collision (file holds {meta.get('model_id')!r}); delete it")
            return emb
        emb = encode(prompt).detach().float().cpu().contiguous()
        if emb.dim() != 3 or emb.shape[0] != 1:
            raise ValueError(f"encode({prompt!r}) must return a 1 x L x D embedding, got {tuple(emb.shape)}")
        meta = {"model_id": model_id, "prompt": prompt, "max_sequence_length": str(max_sequence_length)}
        atomic_write_bytes(path, save({"prompt_embeds": emb}, metadata=meta))
        return emb


def default_cache_dir() -> Path:
    """Where prompt embeddings are cached: $LDLIB_CACHE, else ~/.cache/ldlib."""
    return Path(os.environ.get("LDLIB_CACHE") or Path.home() / ".cache" / "ldlib") / "prompt_embeds"


def prompt_embedding(
    preset,
    prompt: str = "negative",
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    max_sequence_length: int = 512,
) -> torch.Tensor:
    """The preset's 1 x L x D embedding of a prompt ("empty", "negative" or text), from the cache when present."""
    text = resolve_prompt(prompt)

    def encode(p: str) -> torch.Tensor:
        # Loaded here, on a cache miss only: UMT5-XXL is ~11 GB in bf16.
        dtype = torch.bfloat16 if str(device or "cpu").startswith("cuda") else torch.float32
        tokenizer, text_encoder = preset.load_text_encoder(device=device, dtype=dtype)
        try:
            return encode_prompt(p, tokenizer, text_encoder, max_sequence_length)
        finally:
            del text_encoder

    cache = PromptCache(cache_dir if cache_dir is not None else default_cache_dir())
    return cache.get(preset.text_encoder_id, text, encode, max_sequence_length)


# ------------------------------------------------------------------------------------------------------------
# the diffusion teacher
# ------------------------------------------------------------------------------------------------------------


def sigma_grid(sigma: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-sample Euler grids, N x (steps + 1): row i is ``s_i * (1 - k / steps)``, k = 0..steps (ends at 0)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    k = torch.arange(steps + 1, dtype=sigma.dtype, device=sigma.device)
    return sigma.reshape(-1, 1) * (1 - k / steps)


class DiffusionDegrader:
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

    def degrade(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Noise to sigma (``add_noise``), then denoise back to 0; sigma 0 returns the input unchanged."""
        return self.denoise(add_noise(latents, sigma, generator), sigma)


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
    dtype = torch.bfloat16 if str(device or "cpu").startswith("cuda") else torch.float32
    transformer = preset.load_transformer(device=device, dtype=dtype)
    emb = prompt_embedding(preset, prompt, cache_dir=cache_dir, device=device)
    neg = prompt_embedding(preset, "empty", cache_dir=cache_dir, device=device) if guidance_scale else None
    return DiffusionDegrader(transformer, emb, steps=steps, guidance_scale=guidance_scale, negative_embeds=neg,
                             batch_size=batch_size)


# ------------------------------------------------------------------------------------------------------------
# the proxy
# ------------------------------------------------------------------------------------------------------------


class ProxyDegrader:
    """A trained proxy ``net(x_sigma, sigma) -> latents`` standing in for the teacher (trained by the proxy issue).

    Noises with ``add_noise`` exactly like the teacher, then calls the net with sigma as an (N,) tensor; samples
    at sigma 0 come back unchanged. Runs without grad: its output is a training input, not something to train.
    """

    def __init__(self, net: nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.net = net

    @torch.no_grad()
    def degrade(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Noise to sigma, then map back with the proxy net."""
        s = sigma_tensor(sigma, latents)
        x_sigma = add_noise(latents, sigma, generator)
        out = self.net(x_sigma, s.flatten())
        if out.shape != latents.shape:
            raise ValueError(f"proxy net returned shape {tuple(out.shape)}, expected {tuple(latents.shape)}")
        return torch.where(s == 0, latents, out.to(latents.dtype))


DEGRADERS = ("noise", "diffusion", "proxy")


def make_degrader(kind: str, preset=None, steps: int = 1, prompt: str = "negative", device=None,
                  cache_dir: str | os.PathLike | None = None, proxy_net: nn.Module | None = None) -> Degrader:
    """A degrader by name: "noise", "diffusion" (the preset's teacher) or "proxy" (wrapping proxy_net)."""
    if kind == "noise":
        return NoiseDegrader()
    if kind == "diffusion":
        if preset is None:
            raise ValueError("the diffusion degrader needs a preset (its transformer and text encoder)")
        return diffusion_degrader(preset, steps=steps, prompt=prompt, device=device, cache_dir=cache_dir)
    if kind == "proxy":
        if proxy_net is None:
            raise ValueError("the proxy degrader needs a trained proxy net (see the proxy notebook, 03)")
        return ProxyDegrader(proxy_net)
    raise ValueError(f"unknown degrader {kind!r}; choose one of {', '.join(DEGRADERS)}")


class ProxyNet(nn.Module):
    """A small fully-convolutional stand-in for the teacher, conditioned on sigma.

    Parameterised like the teacher's one Euler step: ``out = x_sigma - sigma * v_hat(x_sigma, sigma)``, so it is
    the identity at sigma 0 by construction and starts (zero-initialised output conv) as "return x_sigma". The
    body is diffusers' ResnetBlock2D with scale/shift (FiLM) conditioning on a sinusoidal embedding of
    ``sigma * 1000`` (the teacher's timestep).
    """

    def __init__(self, channels: int = 16, width: int = 64, blocks: int = 4, emb_dim: int = 128, groups: int = 8) -> None:
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding
        from diffusers.models.resnet import ResnetBlock2D

        self.config = {"channels": channels, "width": width, "blocks": blocks, "emb_dim": emb_dim, "groups": groups}
        self.emb_dim = emb_dim
        self.time_embedding = TimestepEmbedding(emb_dim, emb_dim)
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            ResnetBlock2D(in_channels=width, temb_channels=emb_dim, groups=groups, time_embedding_norm="scale_shift")
            for _ in range(blocks)
        )
        self.norm_out = nn.GroupNorm(groups, width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Predict the teacher's output for x_sigma at per-sample sigma (N,)."""
        from diffusers.models.embeddings import get_timestep_embedding

        s = sigma.to(device=x_sigma.device, dtype=torch.float32).reshape(-1)
        temb = get_timestep_embedding(s * 1000, self.emb_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        temb = self.time_embedding(temb.to(x_sigma.dtype))
        h = self.conv_in(x_sigma)
        for block in self.blocks:
            h = block(h, temb)
        v = self.conv_out(torch.nn.functional.silu(self.norm_out(h)))
        return x_sigma - s.view(-1, 1, 1, 1).to(x_sigma.dtype) * v


PROXY_WEIGHTS = "proxy.safetensors"
PROXY_CONFIG = "proxy.json"


def save_proxy(net: ProxyNet, folder: str | os.PathLike, extra: dict | None = None) -> None:
    """Write ``proxy.safetensors`` + ``proxy.json`` (architecture config and anything in extra) atomically."""
    import json

    from safetensors.torch import save

    from .images import atomic_write_bytes

    folder = Path(folder)
    sd = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(folder / PROXY_WEIGHTS, save(sd))
    atomic_write_bytes(folder / PROXY_CONFIG, json.dumps({**(extra or {}), "config": net.config}, indent=2).encode())


def load_proxy(folder: str | os.PathLike, device: str | torch.device | None = None) -> ProxyNet:
    """A trained ProxyNet from a folder written by save_proxy (eval mode)."""
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / PROXY_CONFIG).is_file() or not (folder / PROXY_WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder}: no trained proxy ({PROXY_WEIGHTS} + {PROXY_CONFIG}); train one with train-proxy")
    cfg = json.loads((folder / PROXY_CONFIG).read_text())["config"]
    net = ProxyNet(**cfg)
    net.load_state_dict(load_file(str(folder / PROXY_WEIGHTS)))
    return net.eval().to(device or "cpu")
