"""`make demo`: the whole pipeline as far as it exists, at demo size on the embedded sample photos (CPU, minutes)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .images import area_downsample, load_image, save_image
from .metrics import psnr
from .presets import get_preset
from .samples import sample_paths


def _centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    top, left = (x.shape[-2] - size) // 4 * 2, (x.shape[-1] - size) // 4 * 2  # even offsets keep 2x2 blocks aligned
    return x[..., top : top + size, left : left + size]


def run_demo(out: Path, preset_name: str = "tiny") -> dict:
    """Run every stage that exists on the sample photos; write pictures and a summary under out."""
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    preset = get_preset(preset_name)
    codec = preset.load_codec()
    # Codec round trip and the untrained 2x head on sample LQ crops (recipe: area 0.5x, crop, area 0.5x).
    # A centre crop of 2*hq source pixels, area 4x = area 0.5x (HQ) then 0.5x again (LQ).
    lq = torch.cat([area_downsample(_centre_crop(load_image(p), 2 * preset.hq_size), 4) for p in sample_paths()[:4]])
    with torch.no_grad():
        z = codec.encode(lq)
        rec = codec.decode(z)
        up = codec.to_2x().decode(z)
    row = torch.cat([torch.nn.functional.interpolate(lq, scale_factor=2), torch.nn.functional.interpolate(rec, scale_factor=2), up], dim=-1)
    grid = torch.cat(list(row), dim=-2).unsqueeze(0)
    save_image(grid, out / "codec_roundtrip.png")
    print(f"[demo] {preset.name}: {len(lq)} sample LQ crops {tuple(lq.shape[-2:])} -> latents {tuple(z.shape[1:])}; "
          f"round-trip PSNR {psnr(rec, lq).mean():.2f} dB (random tiny VAE: low is expected) -> {out / 'codec_roundtrip.png'}")
    # Pair set from the samples (the recipe at the preset's sizes) and its latent cache; both resume on a rerun.
    from .latents import default_cache_dir, encode_pairs
    from .pairs import PairSpec, build_pairs
    from .samples import sample_folder

    pairs_dir = out / "pairs"
    report = build_pairs(sample_folder(out / "samples"), pairs_dir, PairSpec.from_preset(preset), workers=1, progress=False)
    encoded = encode_pairs(pairs_dir, codec, default_cache_dir(pairs_dir, preset.name), progress=False)
    print(f"[demo] pairs: {report['pairs_total']} (HQ {preset.hq_size} / LQ {preset.lq_size}) in {pairs_dir}, "
          f"{len(report['skipped'])} skipped; latents: {encoded['cached_total']} cached in {encoded['out']}")
    print(f"[demo] done in {time.time() - t0:.1f} s")
    return {"psnr": psnr(rec, lq).mean().item(), "pairs": report["pairs_total"], "latents": encoded["cached_total"]}
