"""``bench degrade``: the proxy vs one teacher step (shipped taef2 teacher, Wan 2.1 1.3B size), and training's
batched proxy degradation vs one call per sample."""

from __future__ import annotations

import contextlib

import torch

from ...build import codec_of, parse_degrader
from ...degrade import ProxyDegrader
from ...models.proxy import ProxyNet
from ...models.tiny import TINY_WAN_TRANSFORMER_CONFIG, WAN21_1_3B_TRANSFORMER_CONFIG
from ...presets import get_preset
from .common import default_device, device_sync, round_ratio, timed_interleaved, timeit


def bench_degrade(preset_name: str, quick: bool) -> dict:
    """The proxy vs one teacher step, for the shipped taef2 teacher and at the real Wan 2.1 1.3B size (random weights),
    per latent (batch 1) and per batch of 8 (one call for the batch); and training's batched degradation: the proxy
    once on 8 latents vs 8 calls at batch 1. On CUDA everything runs there under bf16 autocast, as in training."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    device, sync = default_device(), device_sync(default_device())
    cuda = device.type == "cuda"
    rows, ratios = [], {}
    # The shipped taef2 teacher on 32 x 32 x 32 latents (a 256 px LQ), through the degrader the loop uses.
    taef2 = get_preset("taef2")
    teacher_t = parse_degrader("diffusion", taef2, codec_of(taef2), steps=1).to(device)
    proxy_t = ProxyNet(channels=32).eval().to(device)
    # Real Wan size: a 256 px LQ -> 16 x 32 x 32 latent, 512 text tokens of width 4096 (UMT5-XXL).
    cfg, text_len, hw = (TINY_WAN_TRANSFORMER_CONFIG, 16, 8) if quick else (WAN21_1_3B_TRANSFORMER_CONFIG, 512, 32)
    wan = WanTransformer3DModel(**cfg).eval().to(device)
    proxy_w = ProxyNet(channels=cfg["in_channels"]).eval().to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def once(name: str) -> bool:  # the 1.3B step on a CPU: one timed call, no warm-up
        return not cuda and "1.3B" in name

    with autocast:
        batched = _batched_proxy(proxy_t, 32, 32, quick, device=device)
    with torch.inference_mode(), autocast:
        for batch in (1, 8):
            x32 = torch.randn(batch, 32, 32, 32, device=device)
            x16 = torch.randn(batch, cfg["in_channels"], hw, hw, device=device)
            s = torch.full((batch,), 0.1, device=device)
            text = torch.randn(batch, text_len, cfg["text_dim"], device=device)
            calls = {
                "taef2 teacher (shipped), 1 Euler step": lambda: teacher_t.denoise(x32, s),
                "ProxyNet for taef2 (32 channels)": lambda: proxy_t(x32, s),
            }
            if quick or cuda or batch == 1:  # the 1.3B step takes minutes on a CPU at batch 8, and scales linearly
                calls[f"Wan 2.1 {'tiny' if quick else '1.3B'} transformer, 1 step"] = lambda: wan(
                    hidden_states=x16.unsqueeze(2), timestep=s * 1000, encoder_hidden_states=text, return_dict=False)
                calls["ProxyNet for Wan (16 channels)"] = lambda: proxy_w(x16, s)
            t = {k: timeit(lambda fn=fn: (fn(), sync()), repeats=1 if once(k) else 5, warmup=0 if once(k) else 1)
                 for k, fn in calls.items()}
            rows += [{"model": k, "batch": batch, "seconds": v} for k, v in t.items()]
            names = list(t)
            ratios[f"proxy speed-up over the taef2 teacher step, batch {batch}"] = t[names[0]] / t[names[1]]
            if len(names) == 4:
                ratios[f"proxy speed-up over the Wan step, batch {batch}"] = t[names[2]] / t[names[3]]
    params = {"taef2 teacher": sum(p.numel() for p in teacher_t.transformer.parameters()),
              "Wan transformer": sum(p.numel() for p in wan.parameters()),
              "ProxyNet (taef2)": sum(p.numel() for p in proxy_t.parameters())}
    return {
        "title": f"proxy vs one teacher step per latent batch, latents 32x32 px, "
                 f"{'CUDA, bf16 autocast' if cuda else f'{torch.get_num_threads()} threads'}; parameters {params}",
        "rows": rows + batched["rows"],
        "ratios": {**ratios, **batched["ratios"]},
        "notes": batched["notes"],
    }


def _batched_proxy(proxy, channels: int, hw: int, quick: bool, batch: int = 8, device=None) -> dict:
    """Training's degradation (per-sample sigma and noise generators) of ``batch`` latents: one proxy call on the
    batch vs one call per sample, interleaved; rows, ratio and the largest difference between the two."""
    deg = ProxyDegrader(proxy)
    device = device or torch.device("cpu")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, hw, hw, generator=g).to(device)
    sigma = (torch.rand(batch, generator=g) * 0.12).to(device)

    def gens() -> list:
        return [torch.Generator().manual_seed(100 + i) for i in range(batch)]

    def one_call() -> torch.Tensor:
        return deg.degrade_samples(x, sigma, gens())[0]

    def per_sample() -> torch.Tensor:
        gs = gens()
        return torch.cat([deg.degrade_samples(x[i : i + 1], sigma[i : i + 1], gs[i : i + 1])[0] for i in range(batch)])

    diff = (one_call() - per_sample()).abs().max().item() / max(per_sample().abs().max().item(), 1e-30)
    t = timed_interleaved({"one": one_call, "each": per_sample}, repeats=3 if quick else 10, warmup=1,
                          sync=device_sync(device))
    return {
        "rows": [
            {"model": f"ProxyNet, degrade_samples: one call on the {batch}", "batch": batch,
             "seconds": t["one"]["wall_s"]},
            {"model": f"ProxyNet, degrade_samples: {batch} calls at batch 1", "batch": batch,
             "seconds": t["each"]["wall_s"]},
        ],
        "ratios": {f"batched proxy degradation speed-up, batch {batch} vs {batch} x batch 1 (median per round)":
                   round_ratio(t, "each", "one")},
        "notes": [f"batched vs per-sample degradation of the same {batch} latents, same generators: largest "
                  f"difference {diff:.2g} of the largest value (float rounding)"],
    }
