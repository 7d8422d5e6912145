"""Image mode for diffusers' ``AutoencoderKLWan``: the same function for one frame (T=1), with 2-D ops.

The Wan VAE's causal 3-D convolutions pad time with ``2 * p_t`` zero frames in front and use a kernel of
``2 * p_t + 1`` taps, so for a single frame only the kernel's last temporal slice ever touches data; the other
taps multiply zeros. Here every ``WanCausalConv3d`` runs as ``F.conv2d`` with ``weight[:, :, -1]``. Slicing keeps
the original ``Parameter`` as the leaf, so gradients, checkpoints and export stay in diffusers' format (including
a widened 2x ``conv_out``, see ``codecs.widen_conv_out``).

What diffusers does for the first (only) chunk, reproduced exactly:
- ``downsample3d`` / ``upsample3d`` resamplers skip their ``time_conv`` on the first chunk (the feature cache is
  empty: diffusers stores the frame, or the "Rep" marker, and moves on);
- the residual (Wan 2.2-style) shortcuts ``AvgDown3D`` (zero-pads time in front, then averages) and ``DupUp3D``
  (``first_chunk=True`` keeps the last of the duplicated frames) are pure reshapes, so they run on the frame with a
  unit time axis through diffusers' own modules;
- the feature cache itself is skipped: with one frame it only stores values nobody reads.

So, as in diffusers for one frame, the resamplers' ``time_conv`` parameters get no gradient (DDP needs
``find_unused_parameters=True`` or those parameters frozen).

diffusers' ``AutoencoderKLQwenImage`` (Qwen-Image's VAE) is built from QwenImage* copies of the same modules
(the Wan 2.1 architecture, identical forward for the first chunk); they run here as their Wan counterparts.

Not supported (clear error): ``patch_size`` (Wan 2.2's patchified VAE). Spatial tiling / slicing settings of the
VAE are ignored (image mode always decodes the whole batch in one pass, like ``WanCodec``'s diffusers path).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _wan():
    """diffusers' Wan VAE module (imported lazily: diffusers is slow to import)."""
    from diffusers.models.autoencoders import autoencoder_kl_wan

    return autoencoder_kl_wan


def check_image_mode(vae: nn.Module) -> None:
    """Raise ValueError when this AutoencoderKLWan's config has features image mode does not implement."""
    cfg = vae.config
    if getattr(cfg, "patch_size", None) is not None:
        raise ValueError(
            f"wan image mode: patch_size={cfg.patch_size} (a patchified Wan 2.2-style VAE) is not supported; "
            "use WanCodec(vae, image_mode=False)"
        )


def causal_conv2d(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A WanCausalConv3d applied to one frame (N x C x H x W), via its kernel's last temporal slice."""
    kt = conv.kernel_size[0]
    pad = conv._padding  # (w, w, h, h, t_front, t_back), set by WanCausalConv3d
    # For T=1 the output has one frame only when the front padding is kt - 1 (all causal convs in the Wan VAE
    # except the resamplers' time_conv, which image mode never calls).
    if pad[4] != kt - 1 or pad[5] != 0:
        raise ValueError(f"wan image mode: unsupported causal conv (kernel {conv.kernel_size}, padding {pad})")
    if pad[0] != pad[1] or pad[2] != pad[3]:
        raise ValueError(f"wan image mode: asymmetric spatial padding {pad} is not supported")
    return F.conv2d(x, conv.weight[:, :, -1], conv.bias, stride=conv.stride[1:], padding=(pad[2], pad[0]))


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """WanRMS_norm (channel-first) on N x C x H x W, for both its images=True and images=False shapes."""
    if not norm.channel_first:
        raise ValueError("wan image mode: channel-last WanRMS_norm is not supported")
    gamma = norm.gamma.reshape(-1, 1, 1)
    bias = norm.bias.reshape(-1, 1, 1) if isinstance(norm.bias, torch.Tensor) else norm.bias
    if x.dtype in (torch.float16, torch.bfloat16):
        # diffusers' exact arithmetic for half types: normalise in fp32, cast back, then scale.
        return F.normalize(x.float(), dim=1).to(x.dtype) * norm.scale * gamma + bias
    # float32: the same function as F.normalize(x) * scale * gamma + bias with fewer full-size passes (the norm
    # is memory-bound on CPU): fold the scale into gamma and skip the add of diffusers' default bias 0.0.
    # The channel norm as sqrt(max(sum x^2, eps^2)) == max(||x||, eps) (F.normalize's eps 1e-12): on NCHW this is
    # ~8x faster on CPU than linalg.vector_norm(dim=1), and clamping before the sqrt keeps its gradient finite.
    sumsq = x.square().sum(dim=1, keepdim=True)
    g = gamma * norm.scale
    if torch.is_grad_enabled():
        out = x / sumsq.clamp_min(1e-24).sqrt() * g
    else:
        out = torch.div(x, sumsq.clamp_min_(1e-24).sqrt_()).mul_(g)  # in place: no autograd, fewer fresh buffers
    if isinstance(bias, torch.Tensor) or bias != 0.0:
        out = out + bias
    return out


def _act(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's nonlinearity; in place when autograd is off (x is a fresh temporary there)."""
    if not torch.is_grad_enabled() and isinstance(block.nonlinearity, nn.SiLU):
        return F.silu(x, inplace=True)
    return block.nonlinearity(x)


def _shortcut(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 causal conv shortcut or an Identity."""
    if isinstance(module, nn.Identity):
        return x
    return causal_conv2d(module, x)


def residual_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """WanResidualBlock on one frame."""
    h = _shortcut(block.conv_shortcut, x)
    x = _act(block, rms_norm(block.norm1, x))
    x = causal_conv2d(block.conv1, x)
    x = _act(block, rms_norm(block.norm2, x))
    x = block.dropout(x)
    x = causal_conv2d(block.conv2, x)
    return x.add_(h) if not torch.is_grad_enabled() else x + h


def attention_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """WanAttentionBlock (per-frame single-head self-attention) on one frame."""
    identity = x
    n, c, h, w = x.shape
    x = rms_norm(block.norm, x)
    qkv = block.to_qkv(x).reshape(n, 1, c * 3, h * w).permute(0, 1, 3, 2).contiguous()
    q, k, v = qkv.chunk(3, dim=-1)
    x = F.scaled_dot_product_attention(q, k, v)
    x = x.squeeze(1).permute(0, 2, 1).reshape(n, c, h, w)
    return block.proj(x) + identity


def resample(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """WanResample on the first (only) chunk: the spatial part; time_conv is skipped exactly as diffusers does."""
    if block.mode not in ("none", "upsample2d", "upsample3d", "downsample2d", "downsample3d"):
        raise ValueError(f"wan image mode: unknown resample mode {block.mode!r}")
    return block.resample(x)  # already 2-D in diffusers (frames are folded into the batch there)


def mid_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """WanMidBlock on one frame."""
    x = residual_block(block.resnets[0], x)
    for attn, resnet in zip(block.attentions, block.resnets[1:]):
        if attn is not None:
            x = attention_block(attn, x)
        x = residual_block(resnet, x)
    return x


def _as_frame(module: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Run a reshape-only diffusers module (AvgDown3D / DupUp3D) on x with a unit time axis."""
    return module(x.unsqueeze(2), **kwargs).squeeze(2)


def _kinds() -> dict[str, tuple[type, ...]]:
    """Block classes by role: diffusers' Wan ones and, where this diffusers has them, their Qwen-Image copies."""
    wan = _wan()
    kinds = {"residual": (wan.WanResidualBlock,), "attention": (wan.WanAttentionBlock,),
             "resample": (wan.WanResample,), "up": (wan.WanUpBlock,)}
    try:
        from diffusers.models.autoencoders import autoencoder_kl_qwenimage as qwen
    except ImportError:  # older diffusers: no Qwen-Image VAE
        return kinds
    for role, cls in (("residual", qwen.QwenImageResidualBlock), ("attention", qwen.QwenImageAttentionBlock),
                      ("resample", qwen.QwenImageResample), ("up", qwen.QwenImageUpBlock)):
        kinds[role] += (cls,)
    return kinds


def _layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One entry of an encoder's down_blocks or a decoder's up_blocks."""
    wan, kinds = _wan(), _kinds()
    if isinstance(layer, kinds["residual"]):
        return residual_block(layer, x)
    if isinstance(layer, kinds["attention"]):
        return attention_block(layer, x)
    if isinstance(layer, kinds["resample"]):
        return resample(layer, x)
    if isinstance(layer, wan.WanResidualDownBlock):
        skip = _as_frame(layer.avg_shortcut, x)
        for resnet in layer.resnets:
            x = residual_block(resnet, x)
        if layer.downsampler is not None:
            x = resample(layer.downsampler, x)
        return x + skip
    if isinstance(layer, kinds["up"]):
        for resnet in layer.resnets:
            x = residual_block(resnet, x)
        if layer.upsamplers is not None:
            x = resample(layer.upsamplers[0], x)
        return x
    if isinstance(layer, wan.WanResidualUpBlock):
        x_in = x
        for resnet in layer.resnets:
            x = residual_block(resnet, x)
        if layer.upsampler is not None:
            x = resample(layer.upsampler, x)
        if layer.avg_shortcut is not None:
            x = x + _as_frame(layer.avg_shortcut, x_in, first_chunk=True)
        return x
    raise TypeError(f"wan image mode: no image-mode forward for {type(layer).__name__}")


def encoder_forward(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """WanEncoder3d on N x C x H x W images -> N x 2z x h x w moments (before quant_conv)."""
    x = causal_conv2d(encoder.conv_in, x)
    for layer in encoder.down_blocks:
        x = _layer(layer, x)
    x = mid_block(encoder.mid_block, x)
    x = _act(encoder, rms_norm(encoder.norm_out, x))
    return causal_conv2d(encoder.conv_out, x)


def decoder_forward(decoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """WanDecoder3d on N x z x h x w latents (after post_quant_conv) -> N x out_channels x H x W, unclamped."""
    x = causal_conv2d(decoder.conv_in, x)
    # diffusers' enable_gradient_checkpointing() sets this flag; honour it per block (activations recomputed in backward).
    if getattr(decoder, "gradient_checkpointing", False) and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        x = checkpoint(mid_block, decoder.mid_block, x, use_reentrant=False)
        for up_block in decoder.up_blocks:
            x = checkpoint(_layer, up_block, x, use_reentrant=False)
    else:
        x = mid_block(decoder.mid_block, x)
        for up_block in decoder.up_blocks:
            x = _layer(up_block, x)
    x = _act(decoder, rms_norm(decoder.norm_out, x))
    return causal_conv2d(decoder.conv_out, x)


def encode_moments(vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """AutoencoderKLWan encoder + quant_conv on N x 3 x H x W images -> N x 2z x h x w (mean, logvar)."""
    check_image_mode(vae)
    if images.dim() != 4:
        raise ValueError(f"wan image mode encodes N x C x H x W images, got shape {tuple(images.shape)}")
    return causal_conv2d(vae.quant_conv, encoder_forward(vae.encoder, images))


def encode_mode(vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The posterior mode (mean) of AutoencoderKLWan.encode for N x 3 x H x W images: N x z x h x w raw latents."""
    return encode_moments(vae, images).chunk(2, dim=1)[0]


def decode(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """AutoencoderKLWan decode of N x z x h x w raw latents -> N x out_channels x H x W, without the final clamp."""
    check_image_mode(vae)
    if z.dim() != 4:
        raise ValueError(f"wan image mode decodes N x C x h x w latents, got shape {tuple(z.shape)}")
    x = causal_conv2d(vae.post_quant_conv, z.to(vae.post_quant_conv.weight.dtype))
    return decoder_forward(vae.decoder, x)
