"""``bench codec``: Wan VAE encode and decode, diffusers' 3-D forward vs image mode (``ldlib.models.wan_image``), at
the full-size config."""

from __future__ import annotations

import torch

from ...models.codecs import WanCodec
from .common import default_device, device_sync, full_wan_vae, round_ratio, timed_interleaved


def bench_codec(preset_name: str, quick: bool, vae_config: dict | None = None, size: int | None = None) -> dict:
    """Wan VAE encode (256 px) and decode (16 x 32 x 32): diffusers' 3-D forward vs image mode, full-size config.

    ``preset_name`` does not apply: both paths run the real Wan 2.1 VAE architecture with random weights (speed
    does not depend on the weight values; the real weights need the hub). ``vae_config`` / ``size`` (image px)
    override the config and the size (tests).
    """
    device = default_device()
    size = size or (128 if quick else 256)
    vae = full_wan_vae(0, vae_config).to(device)
    codecs = {"diffusers": WanCodec(vae, image_mode=False).to(device), "image mode": WanCodec(vae).to(device)}
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device)
    latents = torch.randn(1, vae.config.z_dim, size // 8, size // 8, generator=g).to(device)
    repeats, warmup = (2, 1) if quick else (5, 1)
    rows, ratios, rounds = [], {}, {}
    with torch.no_grad():
        for op, arg, call in (
            (f"encode {size} px", images, lambda c, a: c.encode(a)),
            (f"decode {vae.config.z_dim}x{size // 8}x{size // 8}", latents, lambda c, a: c.decode(a, clamp=False)),
        ):
            outs = {k: call(c, arg) for k, c in codecs.items()}
            diff = (outs["diffusers"] - outs["image mode"]).abs().max().item()
            scale = outs["diffusers"].abs().max().item()
            t = timed_interleaved({k: (lambda c=c: call(c, arg)) for k, c in codecs.items()}, repeats, warmup,
                                  sync=device_sync(device))
            for k in codecs:
                rows.append({"op": op, "variant": k, "wall_s": t[k]["wall_s"], "cpu_s": t[k]["cpu_s"],
                             "max_abs_diff": diff if k == "image mode" else 0.0,
                             "max_rel_diff": diff / max(scale, 1e-30) if k == "image mode" else 0.0})
            name = op.split()[0]
            rounds[op] = {k: t[k]["walls"] for k in codecs}
            ratios[f"{name} speed-up, image mode vs diffusers (wall, median per round)"] = round_ratio(
                t, "diffusers", "image mode")
            ratios[f"{name} speed-up (ratio of median walls)"] = t["diffusers"]["wall_s"] / t["image mode"]["wall_s"]
            ratios[f"{name} speed-up (CPU time)"] = t["diffusers"]["cpu_s"] / t["image mode"]["cpu_s"]
    cfg = "custom config" if vae_config else "full-size default AutoencoderKLWan config (= Wan 2.1 VAE)"
    return {
        "title": f"Wan VAE, {cfg}, random weights, batch 1, float32, {device.type}, "
                 f"{torch.get_num_threads()} threads, {repeats} rounds after {warmup} warm-up",
        "rows": rows,
        "ratios": ratios,
        "rounds_wall_s": rounds,
    }
