"""``bench train-wan``: one decoder training step (2x head, L1 + LPIPS, forward + backward) at the full-size Wan VAE
config, diffusers' 3-D forward vs image mode, with its peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from ...core.profiling import peak_memory_since, reset_peak_memory
from ...models.codecs import WanCodec
from ...models.losses import DecoderLoss, LossConfig
from ...presets import get_preset
from .common import default_device, device_sync, full_wan_vae, round_ratio, timed_interleaved


def _train_setup(hq: int, image_mode: bool, device, vae_config: dict | None = None, seed: int = 0):
    """Everything one decoder training step needs: the 2x codec, the L1 + LPIPS loss, a latent and an HQ target."""
    codec = WanCodec(full_wan_vae(seed, vae_config), image_mode=image_mode).to_2x().to(device)
    for m in codec.encoder_modules():
        m.requires_grad_(False)
    codec.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lpips_model's offline "random backbone" warning: reported in the notes
        loss = DecoderLoss(LossConfig(gan_weight=0.0)).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    hw = hq // codec.upscale // codec.spatial_factor
    z = torch.randn(1, codec.latent_channels, hw, hw, generator=g).to(device)
    target = (torch.rand(1, 3, hq, hq, generator=g) * 2 - 1).to(device)
    return codec, loss, z, target


def _train_step(codec, loss, z, target) -> None:
    """Forward through the 2x head (unclamped), L1 + LPIPS, backward; grads are left on the parameters."""
    out = codec.decode(z, clamp=False)
    rec, _ = loss.reconstruction(out, target)
    rec.backward()


def _zero_grads(codec) -> None:
    for p in codec.parameters():
        p.grad = None


def train_memory_child() -> None:
    """Subprocess entry: peak resident memory (MB) of one CPU training step above the set-up baseline, as JSON."""
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    cpu = torch.device("cpu")
    codec, loss, z, target = _train_setup(spec["hq"], spec["image_mode"], cpu, spec["vae_config"])
    base = reset_peak_memory(cpu)  # set-up transients (model init, to_2x copy) don't count
    _train_step(codec, loss, z, target)
    step = peak_memory_since(cpu, base)
    print(json.dumps({"base_mb": base, "peak_mb": base + step, "step_mb": step}))


def _train_memory(hq: int, image_mode: bool, device, vae_config: dict | None) -> float:
    """Peak memory (MB) one training step adds: CUDA allocator peak, or on CPU the RSS peak in a fresh process."""
    if device.type == "cuda":
        codec, loss, z, target = _train_setup(hq, image_mode, device, vae_config)
        base = reset_peak_memory(device)
        _train_step(codec, loss, z, target)
        return peak_memory_since(device, base)
    spec = {"hq": hq, "image_mode": image_mode, "vae_config": vae_config, "threads": torch.get_num_threads()}
    # A fixed mmap threshold makes glibc return freed large blocks to the OS, so RSS tracks live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run(
        [sys.executable, "-c", "from ldlib.apps.bench.train_wan import train_memory_child; train_memory_child()", json.dumps(spec)],
        capture_output=True, text=True, env=env, cwd=str(Path(__file__).resolve().parents[3]),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench train: memory probe failed:\n{proc.stderr[-2000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["step_mb"])


def bench_train(preset_name: str, quick: bool, vae_config: dict | None = None, hq: int | None = None) -> dict:
    """One decoder training step (2x head, L1 + LPIPS, forward + backward) at the preset's HQ size.

    Wan numbers come from the full-size Wan 2.1 VAE config with random weights, whatever the preset's codec (the
    tiny and taef2 presets contribute their sizes only); diffusers' 3-D forward vs image mode on the same weights.
    ``vae_config`` / ``hq`` override the config and the HQ size (tests).
    """
    device = default_device()
    preset = get_preset(preset_name)
    hq = hq or (min(preset.hq_size, 128) if quick else preset.hq_size)
    # The gradient check below runs one step of each variant first: that is the warm-up.
    repeats = 1 if quick else 3
    codec, loss, z, target = _train_setup(hq, True, device, vae_config)
    variants = {"diffusers": WanCodec(codec.vae, image_mode=False), "image mode": codec}  # the same parameters

    grads = {}
    for k, c in variants.items():
        _train_step(c, loss, z, target)
        grads[k] = [p.grad.clone() if p.grad is not None else None for p in codec.decoder_parameters()]
        _zero_grads(codec)
    grad_diff = max((a - b).abs().max().item() for a, b in zip(grads["diffusers"], grads["image mode"])
                    if a is not None)
    grad_scale = max(a.abs().max().item() for a in grads["diffusers"] if a is not None)
    del grads

    def step(c) -> None:
        _train_step(c, loss, z, target)
        _zero_grads(codec)

    t = timed_interleaved({k: (lambda c=c: step(c)) for k, c in variants.items()}, repeats, warmup=0,
                          sync=device_sync(device))
    del variants, codec, loss
    # --quick skips the memory probes: each is a fresh process that builds the full-size model again.
    mem = {k: None if quick else _train_memory(hq, k == "image mode", device, vae_config)
           for k in ("diffusers", "image mode")}
    rows = [{"variant": k, "wall_s": t[k]["wall_s"], "cpu_s": t[k]["cpu_s"], "peak_step_mb": mem[k]}
            for k in ("diffusers", "image mode")]
    lpips_note = "LPIPS (VGG, ldlib.core.metrics.lpips_model): torchvision backbone weights cannot be downloaded here, " \
                 "so unless they are cached its backbone is random (pnet_rand=True); the cost is the same"
    return {
        "title": f"decoder training step (forward + backward, 2x head, L1 + LPIPS-VGG), HQ {hq} px "
                 f"({preset.name} size), latent {z.shape[1]}x{z.shape[2]}x{z.shape[3]}, batch 1, full-size Wan "
                 f"VAE config, random weights, float32, {device.type}, {torch.get_num_threads()} threads, "
                 f"{repeats} rounds after 1 warm-up",
        "rows": rows,
        "ratios": {
            "step speed-up, image mode vs diffusers (wall, median per round)": round_ratio(t, "diffusers", "image mode"),
            "step speed-up (ratio of median walls)": t["diffusers"]["wall_s"] / t["image mode"]["wall_s"],
            "step speed-up (CPU time)": t["diffusers"]["cpu_s"] / t["image mode"]["cpu_s"],
            **({} if quick else {"peak step memory, diffusers / image mode": mem["diffusers"] / mem["image mode"]}),
        },
        "notes": [
            f"max abs gradient difference image mode vs diffusers: {grad_diff:.3g} (largest gradient {grad_scale:.3g})",
            "peak memory: " + ("skipped (--quick)" if quick else "torch.cuda.max_memory_allocated above the set-up baseline" if device.type == "cuda"
                               else "RSS high-water mark of one step in a fresh process, above its set-up baseline"),
            lpips_note,
        ],
        "rounds_wall_s": {k: t[k]["walls"] for k in ("diffusers", "image mode")},
        "gradient_check": {"max_abs_diff": grad_diff, "largest_gradient": grad_scale},
    }
