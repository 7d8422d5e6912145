"""VAE codecs: one object per VAE that owns encode -> normalised latents and decode <- normalised latents.

Families:
- ``wan``: diffusers ``AutoencoderKLWan`` (an image is one frame; normalisation from ``latents_mean/std``);
- ``kl``: diffusers ``AutoencoderKL`` (``scaling_factor`` / ``shift_factor``);
- ``tae``: TAESD-format ``nn.Sequential`` encoder/decoder pairs (including the FLUX.2 ``taef2`` variant);
- ``qwenimage``: diffusers ``AutoencoderKLQwenImage`` (the Wan 2.1 architecture; Wan's normalisation and image mode);
- ``flux2``: diffusers ``AutoencoderKLFlux2`` (latents normalised by its BatchNorm statistics, as FLUX.2 pipelines do).

Images are N x 3 x H x W in [-1, 1]; latents are N x C x H/8 x W/8 in the normalised space the diffusion model
sees. A codec whose decoder's last conv has 12 output channels is a 2x decoder: its output goes through
``pixel_shuffle(2)`` (the published "Wan2.1 VAE upscale 2x" format).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.files import atomic_write_bytes, atomic_write_file
from . import wan_image
from .single_file import config_dict, is_single_file, load_single_file_vae, published_config


FAMILIES = ("wan", "kl", "tae", "qwenimage", "flux2")


def widen_conv_out(conv: nn.Module, factor: int = 2) -> nn.Module:
    """Copy of a conv whose output channels are repeated factor**2 times in pixel-shuffle order.

    pixel_shuffle(r) maps channel ``c * r*r + k`` to colour ``c`` at sub-pixel ``k``; repeating each output
    channel's kernel r*r times therefore makes ``pixel_shuffle(conv'(x)) == nearest_upsample(conv(x))``.
    """
    if not isinstance(conv, (nn.Conv2d, nn.Conv3d)):
        raise TypeError(f"widen_conv_out: expected a Conv2d/Conv3d, got {type(conv).__name__}")
    r2 = factor * factor
    new = copy.deepcopy(conv)
    new.weight = nn.Parameter(conv.weight.detach().repeat_interleave(r2, dim=0).clone())
    if conv.bias is not None:
        new.bias = nn.Parameter(conv.bias.detach().repeat_interleave(r2, dim=0).clone())
    new.out_channels = conv.out_channels * r2
    return new


HEAD_INITS = ("nearest", "least-squares")


def _pass_through_conv(conv: nn.Module) -> nn.Module:
    """A copy of conv that outputs its input unchanged (an identity centre tap), then a channel of 1 and one of 0.

    Run inside the decoder in place of ``conv``, it yields the features the real conv sees whatever the family's
    forward (Wan's image mode calls ``F.conv2d`` on the weights, which a forward hook would miss); the two constant
    channels expose the affine map the codec applies after the conv (TAE: ``x * 2 - 1``), so the fit needs no
    per-family knowledge.
    """
    kh, kw = conv.kernel_size[-2:]
    # Wan's causal convs pad by hand (_padding = w, w, h, h, t, 0); the others through nn.Conv's own padding.
    pad = (conv._padding[2], conv._padding[0]) if hasattr(conv, "_padding") else tuple(conv.padding[-2:])
    plain = all(s == 1 for s in conv.stride) and all(d == 1 for d in conv.dilation) and conv.groups == 1
    if not plain or conv.padding_mode != "zeros" or pad != (kh // 2, kw // 2):
        raise ValueError(f"least-squares head: conv_out must be a stride-1 conv with 'same' zero padding, got {conv}")
    c = conv.in_channels
    new = copy.deepcopy(conv)
    weight = torch.zeros((c + 2,) + tuple(conv.weight.shape[1:]), dtype=conv.weight.dtype, device=conv.weight.device)
    # Wan's causal Conv3d sees one frame (T=1) through its last temporal tap only.
    kernel = weight[:c, :, -1] if weight.dim() == 5 else weight[:c]
    kernel[:, :, kh // 2, kw // 2] = torch.eye(c, dtype=weight.dtype)
    bias = torch.zeros(c + 2, dtype=conv.weight.dtype, device=conv.weight.device)
    bias[c] = 1.0
    new.weight, new.bias = nn.Parameter(weight), nn.Parameter(bias)
    new.out_channels = c + 2
    return new


@torch.no_grad()
def fit_head_2x(codec: "Codec", batches: Iterable[tuple[torch.Tensor, torch.Tensor]], ridge: float = 1e-4
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the 2x conv_out that best maps the 1x decoder's last features to HQ (ridge least squares).

    ``batches`` yields (normalised latents, HQ images in [-1, 1] at 2x the decode's size). The target of the 12
    output channels is ``pixel_unshuffle(HQ, 2)`` mapped back through the codec's output affine; each output pixel
    sees its conv's k x k neighbourhood of C features plus a constant. The normal equations are accumulated in
    float64; ``ridge`` is relative to the mean of their diagonal. The returned weight has the 2x conv's
    shape (for a Wan Conv3d the fit fills the last temporal tap, the only one an image reaches; the others keep the
    nearest copy of the original head).
    """
    conv = codec.conv_out
    if codec.upscale != 1:
        raise ValueError(f"fit_head_2x needs the 1x codec, got one that decodes at {codec.upscale}x")
    if not ridge >= 0 or not math.isfinite(ridge):
        raise ValueError(f"fit_head_2x: ridge must be a finite number >= 0, got {ridge}")
    colours = conv.out_channels
    kh, kw = conv.kernel_size[-2:]
    taps = conv.in_channels * kh * kw
    probe = copy.deepcopy(codec).eval()
    probe._set_conv_out(_pass_through_conv(conv))
    gram = torch.zeros(taps + 1, taps + 1, dtype=torch.float64)
    cross = torch.zeros(taps + 1, 4 * colours, dtype=torch.float64)
    seen = 0
    like = probe.decoder_parameters()[0]
    for latents, hq in batches:
        out = probe._decode_raw(probe.denormalise(latents.to(like.device, torch.float32)))
        if hq.shape[-2:] != (2 * out.shape[-2], 2 * out.shape[-1]):
            raise ValueError(f"fit_head_2x: HQ is {tuple(hq.shape[-2:])}, the decode {tuple(out.shape[-2:])}: "
                             "HQ must be 2x the decode")
        c = conv.in_channels
        one, zero = out[:, c : c + 1], out[:, c + 1 : c + 2]  # a * 1 + b and a * 0 + b
        scale = one - zero
        if not torch.allclose(scale, scale.flatten()[0].expand_as(scale)) or scale.flatten()[0].abs() < 1e-12:
            raise ValueError("fit_head_2x: the codec's output is not an affine map of conv_out (cannot fit it)")
        a, b = scale.flatten()[0], zero.flatten()[0]
        # Each output pixel's k x k neighbourhood of features, ordered (channel, row, column) as a conv weight is.
        feats = F.unfold((out[:, :c] - b) / a, (kh, kw), padding=(kh // 2, kw // 2))
        feats = feats.view(len(out), taps, *out.shape[-2:])
        target = (F.pixel_unshuffle(hq.to(out), 2) - b) / a
        x = torch.cat([feats, torch.ones_like(feats[:, :1])], 1).permute(0, 2, 3, 1).reshape(-1, taps + 1)
        y = target.permute(0, 2, 3, 1).reshape(-1, 4 * colours)
        # float64 products: float32 ones differ by ~1e-7 with the thread count (another summation order), and the
        # solve amplifies that by the system's condition (up to 1 / ridge): two DDP processes fitted heads 1e-3 apart.
        x, y = x.double(), y.double()
        gram += (x.T @ x).cpu()
        cross += (x.T @ y).cpu()
        seen += len(latents)
    if seen == 0:
        raise ValueError("fit_head_2x: no training latents to fit on")
    gram += torch.eye(taps + 1, dtype=torch.float64) * (ridge * gram.diagonal().mean())
    solution = torch.linalg.solve(gram, cross)  # (taps + 1) x 12
    weight2d = solution[:taps].T.reshape(4 * colours, conv.in_channels, kh, kw)
    weight = widen_conv_out(conv, 2).weight.detach().clone()
    if weight.dim() == 5:
        weight[:, :, -1] = weight2d.to(weight)
    else:
        weight = weight2d.to(weight)
    return weight, solution[taps].to(weight)


def upscale_of(channels: int, colours: int = 3) -> int:
    """Upscale factor of a decoder head with this many output channels (the published convention)."""
    factor = round(math.sqrt(channels / colours))
    if factor < 1 or factor * factor * colours != channels:
        raise ValueError(f"a decoder head with {channels} output channels is not {colours} x r^2")
    return factor


class Codec(nn.Module):
    """Base class: encode images to normalised latents and decode them back (at ``upscale`` x resolution)."""

    family: str = ""
    spatial_factor: int = 8

    def __init__(self, source: str = "") -> None:
        super().__init__()
        self.source = str(source)

    # --- what each family provides -------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        raise NotImplementedError

    @property
    def conv_out(self) -> nn.Module:
        """The decoder's last conv (the layer the 2x head widens and the adaptive GAN weight looks at)."""
        raise NotImplementedError

    def _set_conv_out(self, conv: nn.Module) -> None:
        raise NotImplementedError

    def encoder_modules(self) -> list[nn.Module]:
        """Modules on the encoder side (frozen in this project)."""
        raise NotImplementedError

    def decoder_modules(self) -> list[nn.Module]:
        """Modules on the decoder side (what decoder training updates)."""
        raise NotImplementedError

    def _encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the diffusion model's normalised space."""
        raise NotImplementedError

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> raw VAE latents."""
        raise NotImplementedError

    # --- shared behaviour -------------------------------------------------------------------------------------
    @property
    def upscale(self) -> int:
        """Output resolution / input-image resolution of decode (1, or 2 for a 2x decoder)."""
        return upscale_of(self.conv_out.out_channels)

    def decoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the decoder side, in a stable order."""
        return [p for m in self.decoder_modules() for p in m.parameters()]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """N x 3 x H x W images in [-1, 1] -> N x C x H/8 x W/8 normalised latents (float32 encoder)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"encode expects N x 3 x H x W images, got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.spatial_factor or w % self.spatial_factor:
            raise ValueError(f"encode: image size {h}x{w} must be a multiple of {self.spatial_factor}")
        # The encoder stays in float32: bf16 encoding visibly loses quality (bf16 decoding is practically lossless).
        with torch.autocast(device_type=images.device.type, enabled=False):
            dtype = next(self.encoder_modules()[0].parameters()).dtype
            z = self._encode_raw(images.to(dtype))
            return self.normalise(z.float())

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Normalised latents -> images in [-1, 1] at ``upscale`` x the encoder's resolution.

        ``clamp=False`` returns the raw output, for training: a clamp has zero gradient on saturated pixels.
        """
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"decode expects N x {self.latent_channels} x h x w latents, got shape {tuple(latents.shape)}"
            )
        out = self._decode_raw(self.denormalise(latents))
        r = upscale_of(out.shape[1])
        if r > 1:
            out = F.pixel_shuffle(out, r)
        return out.clamp(-1.0, 1.0) if clamp else out

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the decoder's activations in backward instead of storing them (less memory, more compute)."""
        raise ValueError(f"gradient checkpointing is not available for {self.family!r} codecs")

    def to_2x(self, init: str = "nearest", fit_data: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
              ridge: float = 1e-4) -> "Codec":
        """A copy whose decoder outputs 2x resolution; its 12-channel head starts as ``init`` (``HEAD_INITS``).

        ``nearest``: each output channel's kernel repeated 4 times, so the copy decodes to the nearest-neighbour 2x of
        this decoder's output. ``least-squares``: the head fitted on ``fit_data`` (``fit_head_2x``): (latents, HQ).
        """
        if self.upscale != 1:
            raise ValueError(f"this codec already decodes at {self.upscale}x")
        if init not in HEAD_INITS:
            raise ValueError(f"head init must be one of {', '.join(HEAD_INITS)}, got {init!r}")
        if (fit_data is None) != (init == "nearest"):
            raise ValueError(f"head init {init!r}: fit_data is needed for least-squares and only for it")
        head = widen_conv_out(self.conv_out, 2)
        if init == "least-squares":
            weight, bias = fit_head_2x(self, fit_data, ridge)
            head.weight = nn.Parameter(weight)
            head.bias = nn.Parameter(bias)
        new = copy.deepcopy(self)
        new._set_conv_out(head)
        return new

    def identity(self) -> dict:
        """What makes latents from this codec comparable: family, channels, and a hash of the encoder side."""
        h = hashlib.sha256()
        for m in self.encoder_modules():
            for name, t in sorted(m.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        h.update(json.dumps(self._normalisation_config(), sort_keys=True).encode())
        return {
            "family": self.family,
            "source": self.source,
            "latent_channels": self.latent_channels,
            "spatial_factor": self.spatial_factor,
            "encoder_sha256": h.hexdigest(),
        }

    def _normalisation_config(self) -> dict:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------------------
# diffusers VAEs: what the families below share
# ------------------------------------------------------------------------------------------------------------


class DiffusersCodec(Codec):
    """A codec around a diffusers VAE (``self.vae``): its decoder's ``conv_out`` is the head, its folder the export."""

    def __init__(self, vae, source: str = "") -> None:
        super().__init__(source)
        self.vae = vae

    @property
    def conv_out(self) -> nn.Module:
        return self.vae.decoder.conv_out

    def _set_conv_out(self, conv: nn.Module) -> None:
        self.vae.decoder.conv_out = conv
        self.vae.register_to_config(out_channels=conv.out_channels)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write a diffusers folder that the VAE's class loads with ``from_pretrained`` (out_channels in config)."""
        self.vae.register_to_config(out_channels=self.conv_out.out_channels)
        self.vae.save_pretrained(folder, safe_serialization=True)


# ------------------------------------------------------------------------------------------------------------
# wan: diffusers AutoencoderKLWan
# ------------------------------------------------------------------------------------------------------------


class WanCodec(DiffusersCodec):
    """AutoencoderKLWan as an image codec (one frame); latents ``(z - latents_mean) / latents_std``.

    ``image_mode=True`` (default) runs encoder and decoder with the 2-D image-mode forward of ``ldlib.models.wan_image``
    (the same function for T=1, 2-3x less work, gradients to the same parameters); ``False`` calls diffusers'
    own 3-D modules with their feature cache.
    """

    family = "wan"

    def __init__(self, vae, source: str = "", image_mode: bool = True) -> None:
        super().__init__(vae, source)
        self.image_mode = bool(image_mode)
        cfg = vae.config
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("latents_std", torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1))
        # AutoencoderKLQwenImage's config has no scale_factor_spatial; both architectures downsample 8x.
        self.spatial_factor = int(getattr(cfg, "scale_factor_spatial", None) or 8)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.vae.encoder, self.vae.quant_conv]

    def decoder_modules(self) -> list[nn.Module]:
        return [self.vae.post_quant_conv, self.vae.decoder]

    def _normalisation_config(self) -> dict:
        return {"latents_mean": list(self.vae.config.latents_mean), "latents_std": list(self.vae.config.latents_std)}

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latents_mean.to(z)) / self.latents_std.to(z)

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.latents_std.to(latents) + self.latents_mean.to(latents)

    def _encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        # Pipelines encode with the posterior mode (deterministic), as we do.
        if self.image_mode:
            return wan_image.encode_mode(self.vae, images)
        posterior = self.vae.encode(images.unsqueeze(2)).latent_dist
        return posterior.mode().squeeze(2)

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        if self.image_mode:
            return wan_image.decode(self.vae, z)  # unclamped, like the path below
        # diffusers' _decode for T=1 without its final clamp (see Codec.decode).
        vae = self.vae
        vae.clear_cache()
        x = vae.post_quant_conv(z.unsqueeze(2).to(vae.post_quant_conv.weight.dtype))
        out = vae.decoder(x, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=True)
        vae.clear_cache()
        return out.squeeze(2)

    def enable_gradient_checkpointing(self) -> None:
        """Per decoder block; diffusers refuses it for AutoencoderKLWan, ldlib's image-mode decoder reads the flag."""
        if not self.image_mode:
            raise ValueError("gradient checkpointing of a Wan decoder needs WanCodec(image_mode=True)")
        self.vae.decoder.gradient_checkpointing = True


# ------------------------------------------------------------------------------------------------------------
# kl: diffusers AutoencoderKL
# ------------------------------------------------------------------------------------------------------------


class KLCodec(DiffusersCodec):
    """AutoencoderKL; latents ``(z - shift_factor) * scaling_factor`` (SD-style: shift 0)."""

    family = "kl"

    def __init__(self, vae, source: str = "") -> None:
        super().__init__(vae, source)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.spatial_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def encoder_modules(self) -> list[nn.Module]:
        return [m for m in (self.vae.encoder, self.vae.quant_conv) if m is not None]

    def decoder_modules(self) -> list[nn.Module]:
        return [m for m in (self.vae.post_quant_conv, self.vae.decoder) if m is not None]

    def _normalisation_config(self) -> dict:
        return {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift_factor) * self.scaling_factor

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scaling_factor + self.shift_factor

    def _encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mode()

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z.to(self.vae.dtype)).sample  # AutoencoderKL.decode does not clamp

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' own switch for AutoencoderKL."""
        self.vae.enable_gradient_checkpointing()


# ------------------------------------------------------------------------------------------------------------
# tae: TAESD-format tiny autoencoders (https://github.com/madebyollin/taesd, MIT), incl. the FLUX.2 variant
# ------------------------------------------------------------------------------------------------------------


def _conv3(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class TanhClamp(nn.Module):
    """Soft clamp of the latents at the decoder input: ``tanh(x / 3) * 3``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class TAEBlock(nn.Module):
    """TAESD residual block; ``pooled`` adds the FLUX.2 variant's 1x1 conv / GroupNorm branch in front."""

    def __init__(self, n_in: int, n_out: int, pooled: bool = False) -> None:
        super().__init__()
        if pooled:
            self.pool = nn.Sequential(
                nn.Conv2d(n_in, 4 * n_in, 1, bias=False),
                nn.GroupNorm(4, 4 * n_in),
                nn.ReLU(),
                nn.Conv2d(4 * n_in, n_in, 1, bias=False),
            )
        self.conv = nn.Sequential(_conv3(n_in, n_out), nn.ReLU(), _conv3(n_out, n_out), nn.ReLU(), _conv3(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "pool"):
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def tae_encoder(latent_channels: int, pooled: tuple[int, ...] = (), width: int = 64) -> nn.Sequential:
    """TAESD encoder layout; ``pooled`` lists the Sequential indices of blocks with the FLUX.2 branch."""
    layers: list[nn.Module] = [_conv3(3, width), TAEBlock(width, width, 1 in pooled)]
    for _ in range(3):
        i = len(layers)
        layers.append(_conv3(width, width, stride=2, bias=False))
        layers += [TAEBlock(width, width, i + 1 + k in pooled) for k in range(3)]
    layers.append(_conv3(width, latent_channels))
    return nn.Sequential(*layers)


def tae_decoder(latent_channels: int, pooled: tuple[int, ...] = (), width: int = 64) -> nn.Sequential:
    """TAESD decoder layout (tanh clamp, 3 nearest-2x stages); ``pooled`` as in ``tae_encoder``."""
    layers: list[nn.Module] = [TanhClamp(), _conv3(latent_channels, width), nn.ReLU()]
    for stage in range(3):
        i = len(layers)
        layers += [TAEBlock(width, width, i + k in pooled) for k in range(3)]
        layers += [nn.Upsample(scale_factor=2), _conv3(width, width, bias=False)]
    layers += [TAEBlock(width, width, len(layers) in pooled), _conv3(width, 3)]
    return nn.Sequential(*layers)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _pooled_indices(sd: dict[str, torch.Tensor]) -> tuple[int, ...]:
    return tuple(sorted({int(k.split(".")[0]) for k in sd if ".pool." in k}))


class TAECodec(Codec):
    """TAESD-format encoder/decoder pair; images in [0, 1] internally, latents ``(z - shift) * scale``."""

    family = "tae"

    def __init__(
        self,
        encoder: nn.Sequential,
        decoder: nn.Sequential,
        source: str = "",
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ) -> None:
        super().__init__(source)
        self.encoder = encoder
        self.decoder = decoder
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        self._checkpointing = False

    @classmethod
    def from_files(
        cls, encoder_path: str | os.PathLike, decoder_path: str | os.PathLike, **kwargs
    ) -> "TAECodec":
        """Load a TAESD-format pair (``.pth`` or ``.safetensors``); the layout is read off the state dicts."""
        enc_sd = _load_state_dict(Path(encoder_path))
        dec_sd = _load_state_dict(Path(decoder_path))
        for sd, key, path in ((enc_sd, "0.weight", encoder_path), (dec_sd, "1.weight", decoder_path)):
            if key not in sd:
                raise ValueError(f"{path}: not a TAESD-format state dict (no {key!r})")
        latent_channels, width = dec_sd["1.weight"].shape[1], dec_sd["1.weight"].shape[0]
        last = max(int(k.split(".")[0]) for k in dec_sd)
        encoder = tae_encoder(latent_channels, _pooled_indices(enc_sd), width=enc_sd["0.weight"].shape[0])
        decoder = tae_decoder(latent_channels, _pooled_indices(dec_sd), width=width)
        out_ch = dec_sd[f"{last}.weight"].shape[0]
        if out_ch != 3:  # a 2x (or larger) head written by us
            decoder[last] = _conv3(decoder[last].in_channels, out_ch)
        for name, module, sd, path in (("encoder", encoder, enc_sd, encoder_path), ("decoder", decoder, dec_sd, decoder_path)):
            try:
                module.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise ValueError(f"{path}: not a TAESD-format {name} state dict ({e})") from e
        kwargs.setdefault("source", str(Path(decoder_path).parent))
        return cls(encoder, decoder, **kwargs)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, encoder_folder: str | os.PathLike | None = None,
                    **kwargs) -> "TAECodec":
        """Load ``*encoder.(pth|safetensors)`` and ``*decoder.(pth|safetensors)`` from one folder.

        ``encoder_folder``: where the encoder is when ``folder`` holds a decoder alone (a shipped 2x decoder keeps
        the original encoder once, in its VAE's folder).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: TAESD folder not found")
        cfg_path = folder / "config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            kwargs.setdefault("scaling_factor", cfg.get("scaling_factor", 1.0))
            kwargs.setdefault("shift_factor", cfg.get("shift_factor", 0.0))

        def find(kind: str, where: Path) -> Path | None:
            for suffix in (".safetensors", ".pth"):
                hits = sorted(where.glob(f"*{kind}{suffix}"))
                if hits:
                    return hits[0]
            return None

        encoder = find("encoder", folder) or (find("encoder", Path(encoder_folder)) if encoder_folder else None)
        decoder = find("decoder", folder)
        for kind, path in (("encoder", encoder), ("decoder", decoder)):
            if path is None:
                also = f" (nor in {encoder_folder})" if kind == "encoder" and encoder_folder else ""
                raise FileNotFoundError(f"{folder}: no *{kind}.safetensors or *{kind}.pth file{also}")
        return cls.from_files(encoder, decoder, source=str(folder), **kwargs)

    @property
    def latent_channels(self) -> int:
        return int(self.decoder[1].in_channels)

    @property
    def conv_out(self) -> nn.Module:
        return self.decoder[-1]

    def _set_conv_out(self, conv: nn.Module) -> None:
        self.decoder[-1] = conv

    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoder]

    def decoder_modules(self) -> list[nn.Module]:
        return [self.decoder]

    def _normalisation_config(self) -> dict:
        return {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift_factor) * self.scaling_factor

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scaling_factor + self.shift_factor

    def _encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder((images + 1.0) / 2.0)

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        z = z.to(self.decoder[1].weight.dtype)
        if self._checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint_sequential

            return checkpoint_sequential(self.decoder, 4, z, use_reentrant=False) * 2.0 - 1.0
        return self.decoder(z) * 2.0 - 1.0

    def enable_gradient_checkpointing(self) -> None:
        """TAESD decoders are plain Sequentials: checkpointed in 4 segments while training."""
        self._checkpointing = True

    def save_pretrained(self, folder: str | os.PathLike, decoder_only: bool = False,
                        dtype: torch.dtype = torch.float32) -> None:
        """Write ``encoder.safetensors``, ``decoder.safetensors`` (TAESD key layout) and ``config.json``.

        ``decoder_only``: no encoder file (a 2x decoder shipped beside its VAE, whose encoder it keeps unchanged);
        ``dtype``: of the decoder's tensors (the encoder stays float32: its latents must not move).
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        parts = (("decoder", self.decoder),) if decoder_only else (("encoder", self.encoder), ("decoder", self.decoder))
        for name, module in parts:
            sd = {k: v.detach().cpu().to(dtype if name == "decoder" else v.dtype).contiguous()
                  for k, v in module.state_dict().items()}
            atomic_write_file(folder / f"{name}.safetensors", lambda tmp: save_file(sd, str(tmp)))
        cfg = {
            "family": "tae",
            "latent_channels": self.latent_channels,
            "out_channels": self.conv_out.out_channels,
            "upscale": self.upscale,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
        }
        atomic_write_bytes(folder / "config.json", json.dumps(cfg, indent=2).encode())


# ------------------------------------------------------------------------------------------------------------
# qwenimage: diffusers AutoencoderKLQwenImage (the Wan 2.1 architecture)
# ------------------------------------------------------------------------------------------------------------


class QwenImageCodec(WanCodec):
    """AutoencoderKLQwenImage: the Wan 2.1 VAE architecture with a decoder fine-tuned for images.

    Normalisation as Wan's: Qwen-Image pipelines encode the posterior mode and use ``(z - latents_mean) /
    latents_std`` from the VAE config, decoding ``z * latents_std + latents_mean``. Its modules are diffusers'
    QwenImage* copies of the Wan ones, which ``ldlib.models.wan_image`` runs in image mode too (exactness tested). The
    config has no ``out_channels`` (``input_channels`` sizes both the encoder input and the decoder output), so a
    2x decoder is saved as an ``AutoencoderKLWan`` folder: the same modules and state-dict keys, ``out_channels=12``.
    ``vae`` may be either class (an exported 2x decoder loads as AutoencoderKLWan).
    """

    family = "qwenimage"

    def _set_conv_out(self, conv: nn.Module) -> None:
        self.vae.decoder.conv_out = conv
        if "out_channels" in self.vae.config:  # an AutoencoderKLWan; AutoencoderKLQwenImage has no such key
            self.vae.register_to_config(out_channels=conv.out_channels)

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        from diffusers import AutoencoderKLQwenImage

        if self.image_mode or not isinstance(self.vae, AutoencoderKLQwenImage):
            return super()._decode_raw(z)
        # diffusers' _decode for T=1 without its final clamp (QwenImage's decoder takes no first_chunk flag).
        vae = self.vae
        vae.clear_cache()
        x = vae.post_quant_conv(z.unsqueeze(2).to(vae.post_quant_conv.weight.dtype))
        out = vae.decoder(x, feat_cache=vae._feat_map, feat_idx=vae._conv_idx)
        vae.clear_cache()
        return out.squeeze(2)

    def as_wan_vae(self):
        """This VAE as an ``AutoencoderKLWan`` with the same weights (what ``save_pretrained`` writes)."""
        from accelerate import init_empty_weights
        from diffusers import AutoencoderKLWan

        if isinstance(self.vae, AutoencoderKLWan):
            return self.vae
        cfg = {k: v for k, v in self.vae.config.items() if not k.startswith("_")}
        cfg["in_channels"] = cfg.pop("input_channels", 3)
        cfg["out_channels"] = self.conv_out.out_channels
        with init_empty_weights():
            wan = AutoencoderKLWan(**cfg)
        wan.load_state_dict(self.vae.state_dict(), strict=True, assign=True)
        return wan.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write an ``AutoencoderKLWan`` folder (loads with ``AutoencoderKLWan.from_pretrained``; Qwen's config)."""
        self.as_wan_vae().save_pretrained(folder, safe_serialization=True)


# ------------------------------------------------------------------------------------------------------------
# flux2: diffusers AutoencoderKLFlux2
# ------------------------------------------------------------------------------------------------------------


class Flux2Codec(KLCodec):
    """AutoencoderKLFlux2 (FLUX.2's VAE, 32 latent channels); latents normalised with its BatchNorm statistics.

    Flux2Pipeline encodes the posterior mode, patchifies 2x2 (32 channels -> 128 at 1/16 size) and normalises
    ``(x - bn.running_mean) / sqrt(bn.running_var + batch_norm_eps)``; it decodes through the inverse. ldlib keeps
    latents unpatchified (N x 32 x H/8 x W/8): the same element-wise affine map, each of the 128 statistics applied
    at its (channel, row parity, column parity), so noise and sigma mean what they mean to the FLUX.2 transformer.
    The pattern is anchored at the latent's top-left corner: crops and tiles of latents start at even offsets.
    (preset ``taef2``, FLUX.2's tiny autoencoder, works in the raw latent space instead.)
    """

    family = "flux2"

    def __init__(self, vae, source: str = "") -> None:
        DiffusersCodec.__init__(self, vae, source)  # not KLCodec's: no scaling or shift factor
        self.spatial_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def _bn_maps(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-element mean and std maps (1 x C x h x w) of the BatchNorm statistics for latents shaped like ``like``."""
        cfg = self.vae.config
        ph, pw = cfg.patch_size
        c, (h, w) = self.latent_channels, like.shape[-2:]
        mean = self.vae.bn.running_mean.float().view(c, ph, pw)
        std = torch.sqrt(self.vae.bn.running_var.float() + cfg.batch_norm_eps).view(c, ph, pw)
        reps = (1, -(-h // ph), -(-w // pw))
        tile = lambda t: t.repeat(*reps)[:, :h, :w].unsqueeze(0).to(like)  # noqa: E731
        return tile(mean), tile(std)

    def _normalisation_config(self) -> dict:
        return {
            "bn_running_mean": self.vae.bn.running_mean.tolist(),
            "bn_running_var": self.vae.bn.running_var.tolist(),
            "batch_norm_eps": float(self.vae.config.batch_norm_eps),
            "patch_size": list(self.vae.config.patch_size),
        }

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._bn_maps(z)
        return (z - mean) / std

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._bn_maps(latents)
        return latents * std + mean


# ------------------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------------------


def _vae_subfolder(source: str, subfolder: str | None) -> str | None:
    """A local pipeline folder keeps its VAE under vae/; a VAE folder has config.json at the top."""
    if subfolder is not None:
        return subfolder
    p = Path(source)
    if p.is_dir() and not (p / "config.json").is_file() and (p / "vae" / "config.json").is_file():
        return "vae"
    return None


def _local_class_name(source: str, subfolder: str | None) -> str | None:
    """``_class_name`` of a local diffusers folder's config.json (None for hub ids and folders without one)."""
    cfg = Path(source) / (subfolder or "") / "config.json"
    return json.loads(cfg.read_text()).get("_class_name") if cfg.is_file() else None


def load_codec(
    family: str,
    source: str | os.PathLike,
    subfolder: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    vae_config: str | os.PathLike | dict | None = None,
    **kwargs,
) -> Codec:
    """Load a codec by family from a hub id, a local folder, or one weights file (wan / qwenimage / kl).

    Folders and hub ids go through the family's diffusers ``from_pretrained`` (TAESD files for tae); a single file
    through ``ldlib.models.single_file`` with ``vae_config`` (a diffusers folder / config.json / dict) as its architecture.
    """
    source = str(source)
    if family != "tae" and is_single_file(source):
        return _load_single_file_codec(family, source, vae_config, torch_dtype)
    if family == "wan":
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(source, subfolder=_vae_subfolder(source, subfolder), torch_dtype=torch_dtype)
        return WanCodec(vae.eval(), source=source)
    if family == "kl":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(source, subfolder=_vae_subfolder(source, subfolder), torch_dtype=torch_dtype)
        return KLCodec(vae.eval(), source=source)
    if family == "qwenimage":
        from diffusers import AutoencoderKLQwenImage, AutoencoderKLWan

        sub = _vae_subfolder(source, subfolder)
        # An exported Qwen-Image 2x decoder is an AutoencoderKLWan folder (see QwenImageCodec).
        cls = AutoencoderKLWan if _local_class_name(source, sub) == "AutoencoderKLWan" else AutoencoderKLQwenImage
        vae = cls.from_pretrained(source, subfolder=sub, torch_dtype=torch_dtype)
        return QwenImageCodec(vae.eval(), source=source)
    if family == "flux2":
        from diffusers import AutoencoderKLFlux2

        vae = AutoencoderKLFlux2.from_pretrained(source, subfolder=_vae_subfolder(source, subfolder), torch_dtype=torch_dtype)
        return Flux2Codec(vae.eval(), source=source)
    if family == "tae":
        return TAECodec.from_folder(source, **kwargs).to(torch_dtype).eval()
    raise ValueError(f"unknown codec family {family!r}; expected one of {FAMILIES}")


def _load_single_file_codec(family: str, path: str, vae_config, torch_dtype: torch.dtype) -> Codec:
    """A codec from one weights file: original-layout Wan / Qwen-Image files, or LDM-layout AutoencoderKL files."""
    from diffusers import AutoencoderKLWan


    if family == "wan":
        vae = load_single_file_vae(AutoencoderKLWan, path, vae_config, published_config(AutoencoderKLWan), torch_dtype)
        return WanCodec(vae, source=path)
    if family == "qwenimage":
        from diffusers import AutoencoderKLQwenImage

        # diffusers reads original-layout files only through AutoencoderKLWan's converter; the architecture is the
        # same, so the file loads into an AutoencoderKLWan with Qwen-Image's config (QwenImageCodec takes either).
        default = published_config(AutoencoderKLQwenImage)
        default["in_channels"] = default.pop("input_channels", 3)
        cfg = vae_config
        if cfg is not None:
            cfg = config_dict(cfg, AutoencoderKLQwenImage)
            if "input_channels" in cfg:
                cfg["in_channels"] = cfg.pop("input_channels")
        vae = load_single_file_vae(AutoencoderKLWan, path, cfg, default, torch_dtype)
        return QwenImageCodec(vae, source=path)
    if family == "kl":
        # SD 1.x, SDXL and FLUX.1 files share one layout but not one architecture / scaling: the config must be given.
        from diffusers import AutoencoderKL

        vae = load_single_file_vae(AutoencoderKL, path, vae_config, None, torch_dtype)
        return KLCodec(vae, source=path)
    raise ValueError(
        f"{path}: single-file loading is supported for the wan, qwenimage and kl families, not {family!r}; "
        "pass a diffusers folder (from_pretrained layout) instead"
    )
