"""Benchmarks (`python -m ldlib bench ...`): medians after a warm-up, ratios measured in the same run.

Each bench is a function ``bench_<name>(preset_name, quick) -> dict`` with keys ``title``, ``rows`` (list of
dicts, one per measured variant) and ``ratios`` (name -> float); ``run_benches`` writes them to Markdown + JSON.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

from ..build import codec_of


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time (s) of fn() over repeats, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


BENCHES: dict[str, Callable[[str, bool], dict]] = {}


def _markdown(name: str, result: dict) -> str:
    lines = [f"## {name}: {result.get('title', '')}", ""]
    rows = result.get("rows", [])
    if rows:
        cols = list(rows[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
        lines.append("")
    for k, v in result.get("ratios", {}).items():
        lines.append(f"- **{k}**: {v:.3g}x")
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def run_benches(which: str, out: Path, preset_name: str = "tiny", quick: bool = False,
                train_options: dict | None = None) -> dict:
    """Run one bench or all; write out/<name>.json and out/<name>.md and print the Markdown.

    ``train_options``: keyword arguments of ``bench_train_step`` (batches, rounds, only, vae) for the train bench.
    """
    from ..core.files import atomic_write_bytes

    names = list(BENCHES) if which == "all" else [which]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise ValueError(f"unknown bench {unknown[0]!r}; available: {', '.join(BENCHES) or 'none'} or all")
    results = {}
    for name in names:
        result = BENCHES[name](preset_name, quick, **((train_options or {}) if name == "train" else {}))
        results[name] = result
        md = _markdown(name, result)
        atomic_write_bytes(out / f"{name}.json", json.dumps(result, indent=2).encode())
        atomic_write_bytes(out / f"{name}.md", md.encode())
        print(md)
    return results


def bench_degrade(preset_name: str, quick: bool) -> dict:
    """The proxy vs one teacher step, for the shipped taef2 teacher and at the real Wan 2.1 1.3B size (random weights),
    per latent (batch 1) and per batch of 8 (one call for the batch); and training's batched degradation: the proxy
    once on 8 latents vs 8 calls at batch 1. On CUDA everything runs there under bf16 autocast, as in training."""
    import contextlib

    import torch
    from diffusers import WanTransformer3DModel

    from ..build import parse_degrader
    from ..models.proxy import ProxyNet
    from ..models.tiny import TINY_WAN_TRANSFORMER_CONFIG, WAN21_1_3B_TRANSFORMER_CONFIG
    from ..presets import get_preset

    torch.manual_seed(0)
    device, sync = _device(), _sync(_device())
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
    import torch

    from ..degrade import ProxyDegrader

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
                          sync=_sync(device))
    return {
        "rows": [
            {"model": f"ProxyNet, degrade_samples: one call on the {batch}", "batch": batch,
             "seconds": t["one"]["wall_s"]},
            {"model": f"ProxyNet, degrade_samples: {batch} calls at batch 1", "batch": batch,
             "seconds": t["each"]["wall_s"]},
        ],
        "ratios": {f"batched proxy degradation speed-up, batch {batch} vs {batch} x batch 1 (median per round)":
                   _round_ratio(t, "each", "one")},
        "notes": [f"batched vs per-sample degradation of the same {batch} latents, same generators: largest "
                  f"difference {diff:.2g} of the largest value (float rounding)"],
    }


BENCHES["degrade"] = bench_degrade


def _generate_photos(folder: Path, count: int, size: tuple[int, int] = (3840, 2160)) -> None:
    """Seeded photo-like JPEGs (upsampled noise plus grain) for benches when ../shared/data/photos is absent."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    for i in range(count):
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)  # upsampled noise: photo-like smoothness
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        noisy = np.asarray(img).astype(np.int16) + rng.integers(-8, 9, (h, w, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"gen{i}.jpg", quality=95)


def bench_pairs(preset_name: str, quick: bool) -> dict:
    """Seconds per source image: bare decode vs the whole pair build (recipe spec, K=1 and K=4, one worker).

    Sources: ../shared/data/photos when present, else generated 4k JPEGs. For every image, bare decode, load_rgb8,
    and one-image builds at K=1 and K=4 run back to back (each build pays its own listing, manifest and report,
    so this is an upper bound on a folder build); ratios are per round, median over rounds, wall and CPU time.
    ``preset_name`` does not apply: building is measured at the recipe's sizes (512 px HQ), what real runs use.
    """
    import shutil
    import tempfile
    import warnings

    import numpy as np
    from PIL import Image

    from ..core.images import list_images, load_rgb8
    from ..data.pairs import PairSpec, SkippedInputWarning, build_pairs
    from ..presets import SHARED_DIR

    photos = _shared_photos()
    with tempfile.TemporaryDirectory(prefix="ldlib-bench-pairs-") as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        src.mkdir()
        if photos:
            origin = str(SHARED_DIR / "data" / "photos")
            for p in photos[: 3 if quick else None]:  # links, so a subset can be built without copying the photos
                (src / p.name).symlink_to(p)
        else:
            origin = "generated 3840x2160 JPEGs (../shared/data/photos absent)"
            _generate_photos(src, 2 if quick else 4)
        files = list_images(src)
        n = len(files)
        for p in files:
            p.read_bytes()  # warm the page cache so the first timed pass does not pay the disk
        with warnings.catch_warnings():  # warm-up: imports and first-call costs stay out of the timings
            warnings.simplefilter("ignore", SkippedInputWarning)
            (tmp / "warm").mkdir()
            (tmp / "warm" / files[0].name).symlink_to(files[0].resolve())
            build_pairs(tmp / "warm", tmp / "out-warm", PairSpec(), workers=1, progress=False)
        rounds = 1 if quick else 3
        keys = ("bare", "decode", "k1", "k4")
        # Per round, summed over images: wall and CPU seconds. The four measurements of one image run back to
        # back, so a load spike from the machine's other users hits all four alike.
        wall = {k: [0.0] * rounds for k in keys}
        cpu = {k: [0.0] * rounds for k in keys}

        def bare(p: Path) -> None:
            with Image.open(p) as im:
                im.load()

        singles = []
        for i, p in enumerate(files):  # one folder per image, so each build covers exactly one source
            (tmp / "one" / str(i)).mkdir(parents=True)
            (tmp / "one" / str(i) / p.name).symlink_to(p.resolve())
            singles.append(tmp / "one" / str(i))
        for r in range(rounds):
            for i, p in enumerate(files):
                for key in keys:
                    out = tmp / f"out-{key}-{r}-{i}"
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", SkippedInputWarning)
                        t, c = time.perf_counter(), time.process_time()
                        if key == "bare":
                            bare(p)
                        elif key == "decode":
                            load_rgb8(p)
                        else:
                            k = 1 if key == "k1" else 4
                            report = build_pairs(singles[i], out, PairSpec(crops_per_image=k), workers=1, progress=False)
                        wall[key][r] += time.perf_counter() - t
                        cpu[key][r] += time.process_time() - c
                    if key in ("k1", "k4"):
                        if report["pairs_total"] != k:
                            raise RuntimeError(f"bench pairs: {p.name}: expected {k} pairs, got {report['pairs_total']}")
                        shutil.rmtree(out)
        measured = {k: [v / n for v in wall[k]] for k in keys}

        def ratio(times: dict, a: str, b: str) -> float:
            return statistics.median(x / y for x, y in zip(times[a], times[b]))

        ratios = {
            "build K=1 / decode": ratio(wall, "k1", "decode"),
            "build K=4 / decode": ratio(wall, "k4", "decode"),
            "build K=1 / bare PIL decode": ratio(wall, "k1", "bare"),
            "decode (load_rgb8) / bare PIL decode": ratio(wall, "decode", "bare"),
            "CPU time: build K=1 / decode": ratio(cpu, "k1", "decode"),
            "CPU time: build K=4 / decode": ratio(cpu, "k4", "decode"),
        }
        names = {
            "bare": "bare PIL decode (open + load)",
            "decode": "decode: load_rgb8 (PIL + EXIF + RGB array)",
            "k1": "whole build, K=1, 1 worker",
            "k4": "whole build, K=4, 1 worker",
        }
        rows = [
            {"variant": names[key], "s_per_image": statistics.median(v), "cpu_s_per_image": statistics.median(cpu[key]) / n,
             "images": n, "rounds": rounds}
            for key, v in measured.items()
        ]
    return {
        "title": f"pair building, seconds per source image ({origin}; HQ 512, target: build K=1 <= 1.3x decode)",
        "rows": rows,
        "ratios": ratios,
    }


BENCHES["pairs"] = bench_pairs


# ------------------------------------------------------------------------------------------------------------
# codec / train: Wan VAE image mode (ldlib.models.wan_image) vs diffusers' 3-D forward, full-size config
# ------------------------------------------------------------------------------------------------------------


def timed_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                      sync: Callable[[], None] = lambda: None) -> dict[str, dict]:
    """Median wall and CPU time of each fn, running them in turn every round (a noisy machine hits all alike).

    Returns name -> {"wall_s", "cpu_s", "walls"}; "walls" (per round, in order) lets callers take per-round ratios.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    walls: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t, c = time.perf_counter(), time.process_time()
            fn()
            sync()
            walls[k].append(time.perf_counter() - t)
            cpus[k].append(time.process_time() - c)
    return {k: {"wall_s": statistics.median(walls[k]), "cpu_s": statistics.median(cpus[k]), "walls": walls[k]}
            for k in fns}


def _round_ratio(timings: dict[str, dict], slow: str, fast: str) -> float:
    """Median over rounds of slow/fast wall time (each round ran both back to back)."""
    return statistics.median(a / b for a, b in zip(timings[slow]["walls"], timings[fast]["walls"]))


def _full_wan_vae(seed: int = 0, config: dict | None = None):
    """A seeded random-weight AutoencoderKLWan; the default config is the real Wan 2.1 VAE architecture."""
    import torch
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan(**(config or {})).eval()


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def bench_codec(preset_name: str, quick: bool, vae_config: dict | None = None, size: int | None = None) -> dict:
    """Wan VAE encode (256 px) and decode (16 x 32 x 32): diffusers' 3-D forward vs image mode, full-size config.

    ``preset_name`` does not apply: both paths run the real Wan 2.1 VAE architecture with random weights (speed
    does not depend on the weight values; the real weights need the hub). ``vae_config`` / ``size`` (image px)
    override the config and the size (tests).
    """
    import torch

    from ..models.codecs import WanCodec

    device = _device()
    size = size or (128 if quick else 256)
    vae = _full_wan_vae(0, vae_config).to(device)
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
                                  sync=_sync(device))
            for k in codecs:
                rows.append({"op": op, "variant": k, "wall_s": t[k]["wall_s"], "cpu_s": t[k]["cpu_s"],
                             "max_abs_diff": diff if k == "image mode" else 0.0,
                             "max_rel_diff": diff / max(scale, 1e-30) if k == "image mode" else 0.0})
            name = op.split()[0]
            rounds[op] = {k: t[k]["walls"] for k in codecs}
            ratios[f"{name} speed-up, image mode vs diffusers (wall, median per round)"] = _round_ratio(
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


BENCHES["codec"] = bench_codec


def _train_setup(hq: int, image_mode: bool, device, vae_config: dict | None = None, seed: int = 0):
    """Everything one decoder training step needs: the 2x codec, the L1 + LPIPS loss, a latent and an HQ target."""
    import warnings

    import torch

    from ..models.codecs import WanCodec
    from ..models.losses import DecoderLoss, LossConfig

    codec = WanCodec(_full_wan_vae(seed, vae_config), image_mode=image_mode).to_2x().to(device)
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


def _train_memory_child() -> None:
    """Subprocess entry: peak resident memory (MB) of one CPU training step above the set-up baseline, as JSON."""
    import sys

    import torch

    from ..core.profiling import peak_memory_since, reset_peak_memory

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
    import os
    import subprocess
    import sys

    import torch

    if device.type == "cuda":
        from ..core.profiling import peak_memory_since, reset_peak_memory

        codec, loss, z, target = _train_setup(hq, image_mode, device, vae_config)
        base = reset_peak_memory(device)
        _train_step(codec, loss, z, target)
        return peak_memory_since(device, base)
    spec = {"hq": hq, "image_mode": image_mode, "vae_config": vae_config, "threads": torch.get_num_threads()}
    # A fixed mmap threshold makes glibc return freed large blocks to the OS, so RSS tracks live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run(
        [sys.executable, "-c", "from ldlib.apps.bench import _train_memory_child; _train_memory_child()", json.dumps(spec)],
        capture_output=True, text=True, env=env, cwd=str(Path(__file__).resolve().parents[2]),
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
    import torch

    from ..models.codecs import WanCodec
    from ..presets import get_preset

    device = _device()
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
                          sync=_sync(device))
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
            "step speed-up, image mode vs diffusers (wall, median per round)": _round_ratio(t, "diffusers", "image mode"),
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


BENCHES["train-wan"] = bench_train


# ------------------------------------------------------------------------------------------------------------
# train: where a step of the real train_decoder loop goes, per option (compile, channels_last, bf16, LPIPS net)
# ------------------------------------------------------------------------------------------------------------

# The pieces StepTimings records in train_decoder, grouped as the breakdown table shows them.
STEP_GROUPS = {
    "data": ("data",),
    "degradation": ("degradation",),
    "decoder fwd": ("decoder forward",),
    "decoder bwd": ("decoder backward",),
    "LPIPS fwd": ("lpips forward",),
    # The backward from the loss to the decoder's output (LPIPS) while the GAN is off.
    "loss bwd": ("loss backward",),
    # L1, and once the GAN is on: the discriminator on the prediction, the backward of both terms to the prediction
    # (LPIPS and discriminator) and the adaptive weight (the decoder's last layer differentiated twice; a compiled
    # decoder's whole backward, which is one graph).
    "L1 + GAN term": ("losses",),
    "discriminator": ("discriminator",),
    "optimiser + EMA": ("optimiser + EMA",),
    "logging": ("logging",),
}
NON_MODEL = ("data", "degradation", "optimiser + EMA", "logging")
MODEL_PIECES = {p for group, pieces in STEP_GROUPS.items() if group not in NON_MODEL for p in pieces}
# Variant overrides that go to the LossConfig (the rest are TrainConfig fields).
LOSS_OVERRIDES = ("lpips_net", "gan_start")
# Variant overrides after which a row gets no FLOP rate: another LPIPS or the GAN change the model work (the count is
# the GAN-off default step's), another precision the yardstick (the matmul runs at the loop's default precision).
UNRATED_OVERRIDES = {*LOSS_OVERRIDES, "mixed_precision"}
# A variant's keys that are the bench's own, not settings (see train_step_variants; two_pass_gan: _two_pass_loss).
VARIANT_KEYS = ("vs", "gan_off", "two_pass_gan")


def cpu_bf16_supported() -> bool:
    """Whether this CPU has native bf16 (oneDNN's check: AVX512-BF16 or AMX); without it bf16 is emulated."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _shared_photos() -> list[Path]:
    """The real photos in ../shared/data/photos (its image files, not its SOURCES.md), sorted; [] without it."""
    from ..core.images import IMAGE_SUFFIXES, list_images
    from ..presets import SHARED_DIR

    folder = SHARED_DIR / "data" / "photos"
    return [p for p in list_images(folder) if p.suffix.lower() in IMAGE_SUFFIXES] if folder.is_dir() else []


def _bench_pairset(root: Path, preset, codec, count: int) -> tuple[Path, Path, str]:
    """A pair set of ``count`` pairs at the preset's sizes with its latent cache: (pairs, latents, origin)."""
    import warnings

    from ..data.latents import default_cache_dir, encode_pairs
    from ..data.pairs import PairSpec, SkippedInputWarning, build_pairs

    photos = root / "photos"
    photos.mkdir(parents=True)
    shared = _shared_photos()
    if shared:
        origin = "../shared/data/photos"
        for p in shared[: max(1, count // 2)]:
            (photos / p.name).symlink_to(p.resolve())
    else:
        origin = "generated 2048x2048 JPEGs (../shared/data/photos absent)"
        _generate_photos(photos, max(1, count // 2), (2048, 2048))
    pairs = root / "pairs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedInputWarning)
        build_pairs(photos, pairs, PairSpec.from_preset(preset, crops_per_image=2), workers=1, progress=False)
    latents = default_cache_dir(pairs, preset.name)
    encode_pairs(pairs, codec, latents, progress=False)
    return pairs, latents, origin


# What "before" restores: the loop's defaults before the measurements changed them (TrainConfig.update_threads and
# TrainConfig.reuse_cpu_memory, which act on the CPU only, and TrainConfig.num_workers, which is 0 on CPU either way),
# and its GAN steps' gradients as it took them (two_pass_gan: _two_pass_loss).
BEFORE = {"update_threads": 0, "num_workers": 0, "reuse_cpu_memory": False, "two_pass_gan": True}


def train_step_variants(device, quick: bool) -> tuple[dict[str, dict], list[str]]:
    """The options measured (name -> TrainConfig / LossConfig overrides, "vs": the row its ratio compares with,
    "gan_off": for a GAN-on row, the row of the same loop with the GAN off), and notes on the ones left out."""
    notes = []
    variants: dict[str, dict] = {"before (old defaults)": dict(BEFORE), "after (new defaults)": {}}
    variants["after + channels_last"] = {"channels_last": True}
    if not quick:
        variants["after + torch.compile"] = {"compile": True}
    if device.type == "cuda":
        variants["after in fp32 (no autocast)"] = {"mixed_precision": "no"}
    elif cpu_bf16_supported():
        variants["after + bf16 autocast"] = {"mixed_precision": "bf16"}
    else:
        notes.append("bf16 autocast not measured: this CPU has no native bf16 (no AVX512-BF16 / AMX; oneDNN "
                     "would emulate it)")
    variants["after with LPIPS vgg"] = {"lpips_net": "vgg"}
    variants["after with LPIPS squeeze"] = {"lpips_net": "squeeze"}
    variants["before with GAN on"] = {**BEFORE, "gan_start": 0, "gan_off": "before (old defaults)"}
    variants["after with GAN on"] = {"gan_start": 0, "vs": "before with GAN on", "gan_off": "after (new defaults)"}
    # What the GAN step's one-pass gradients (DecoderLoss.generator) buy on their own; the two-pass row's second
    # LPIPS and discriminator backwards show in its "decoder bwd".
    variants["after with GAN on (two-pass gradients)"] = {
        "gan_start": 0, "two_pass_gan": True, "vs": "after with GAN on", "gan_off": "after (new defaults)"}
    return variants, notes


def _recipe_ratio(runs: dict[str, list[dict]], measured: dict[str, dict], name: str, vs: str, steps: int,
                  gan_start: int) -> float | None:
    """How much faster a run of ``steps`` steps with the GAN on from ``gan_start`` is with ``name``'s loop than with
    ``vs``'s: per round, the GAN-off row's step before gan_start and the GAN-on row's from there; the median over
    rounds. None unless both are GAN-on rows whose GAN-off rows were measured too."""
    offs = measured[name].get("gan_off"), measured[vs].get("gan_off")
    if name == vs or None in offs or not all(o in runs for o in offs):
        return None

    def run_s(on: list[dict], off: list[dict]) -> list[float]:
        return [gan_start * a["step"] + (steps - gan_start) * b["step"] for a, b in zip(off, on)]

    return statistics.median(b / a for a, b in zip(run_s(runs[name], runs[offs[0]]), run_s(runs[vs], runs[offs[1]])))


def _outside_kernels(cfg, out: Path, train_set, codec, device, warmup: int, steps: int) -> dict:
    """Share of a CUDA step's wall time in which no kernel, copy or memset runs, from one run of the loop as it runs
    in production (no synchronising boundaries): wall per step over ``steps`` unprofiled steps after ``warmup``,
    then the device's busy time per step (union of its activity spans in a torch.profiler trace) over ``steps`` more."""
    import dataclasses
    import tempfile
    import warnings

    from torch.profiler import ProfilerActivity, profile, schedule

    from ..core.profiling import StepTimings
    from ..degrade import NoiseDegrader
    from ..train.decoder import train_decoder

    cfg = dataclasses.replace(cfg, steps=warmup + 2 * steps + 1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 schedule=schedule(wait=warmup + steps, warmup=1, active=steps, repeat=1)) as prof:
        timings = StepTimings(device, sync=False, on_step=prof.step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train_decoder(cfg, out, train_set, None, codec=codec, degrader=NoiseDegrader(), timings=timings)
    wall = statistics.median(timings.step_totals()[warmup : warmup + steps])
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        trace = json.loads(Path(f"{tmp}/trace.json").read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    busy = _union_seconds([(e["ts"], e["ts"] + e["dur"]) for e in events
                           if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]) / steps
    return {"step_s (no syncs)": wall, "device busy s": busy, "outside kernels %": 100 * max(0.0, 1 - busy / wall)}


def _model_flops(cfg, codec, batch: dict) -> float:
    """FLOPs of one GAN-off micro-step's model work on a batch (decoder forward and backward, LPIPS forward and its
    backward to the prediction), counted by torch's FlopCounterMode on the loop's own models and step."""
    import warnings

    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    from ..core.runs import make_accelerator
    from ..train.decoder import build_models, micro_step

    acc = make_accelerator(cfg.mixed_precision)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LPIPS' random-backbone notice: reported in the notes
        m = build_models(cfg, codec, acc, None)
    if m.loss_fn.gan_active(0):
        raise ValueError("_model_flops counts the GAN-off step: the config's GAN is on at step 0")
    aten = torch.ops.aten
    # torch counts the CUDA attention kernels but has no formula for the CPU one: the same formulas, for this count.
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *_, **__: sdpa_backward_flop_count(grad, q, k, v),
    }
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        micro_step(m, acc, batch["latent"].to(acc.device), batch["hq"].to(acc.device), 0, None)
    return float(counter.get_total_flops())


def _matmul_flops_per_s(device, dtype) -> tuple[float, int]:
    """(FLOP/s, n) of an n x n matmul on device in dtype (median of 5 after 2 warm-ups): what the hardware gives
    well-shaped work, the yardstick for a model's FLOP rate."""
    import torch

    n = 2048 if device.type == "cpu" else 8192
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    sync = _sync(device)
    return 2 * n**3 / timeit(lambda: (a @ b, sync()), repeats=5, warmup=2), n


def _prefetched(cfg, device) -> int:
    """Batches the loop's DataLoader queues ahead (workers x prefetch_factor 2): steps to run before timing, so that a
    timed step waits on data as it would in a long run instead of taking a batch read during the warm-up."""
    from ..core.runs import loader_workers

    return 2 * loader_workers(cfg.num_workers, device)


def _union_seconds(spans: list[tuple[float, float]]) -> float:
    """Total length in seconds of the union of (start, end) spans given in microseconds (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e6


def _skip_read_us(device) -> float:
    """Microseconds of the loop's one host read per optimiser step: all_finite on a device scalar."""
    import torch

    from ..core.runs import all_finite, make_accelerator

    acc = make_accelerator("no" if device.type == "cpu" else "bf16")
    probe = torch.zeros((), device=device)

    def read() -> bool:
        return all_finite(acc, probe)

    return 1e6 * timeit(read, repeats=200, warmup=5)


def _update_threads_ab(preset_name: str, device, rounds: int) -> dict:
    """The loop's optimiser step alone (clipping, AdamW for decoder and discriminator, EMA, schedules) at
    update_threads=1 vs all threads, interleaved, on seeded stand-in gradients: median seconds and per-round ratio."""
    import dataclasses
    import warnings

    import torch

    from ..core.runs import make_accelerator
    from ..models.losses import LossConfig
    from ..presets import get_preset
    from ..train.decoder import TrainConfig, build_models, optimizer_step

    cfg = TrainConfig(preset=preset_name, loss=LossConfig(lpips_net="alex", lpips_weight=0.0))
    acc = make_accelerator("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = build_models(cfg, codec_of(get_preset(preset_name)), acc, None)
    params = list(m.params) + list(m.disc.parameters())
    g = torch.Generator().manual_seed(0)
    grads = [(torch.randn(p.shape, generator=g) * 1e-3).to(p.device) for p in params]
    configs = {"1 thread": cfg, "all threads": dataclasses.replace(cfg, update_threads=0)}

    def step(c) -> None:
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        optimizer_step(m, acc, c, skip=False, d_active=True)

    t = timed_interleaved({k: (lambda c=c: step(c)) for k, c in configs.items()}, repeats=rounds, warmup=1,
                          sync=_sync(device))
    return {"rows": {k: v["wall_s"] for k, v in t.items()}, "ratio": _round_ratio(t, "all threads", "1 thread")}


def _bench_train_config(preset_name: str, vae: str | None, batch: int, **overrides):
    """The TrainConfig every bench train run starts from (LPIPS alex, no warm-up, no validation or checkpoints),
    with a variant's TrainConfig / LossConfig overrides."""
    from ..models.losses import LossConfig
    from ..train.decoder import TrainConfig

    loss_kw = {k: overrides.pop(k) for k in LOSS_OVERRIDES if k in overrides}
    return TrainConfig(preset=preset_name, vae=vae, batch=batch, warmup_steps=0, val_every=10**9,
                       checkpoint_every=10**9, log_every=10,
                       loss=LossConfig(**{"lpips_net": "alex", "gan_warmup": 0, **loss_kw}), **overrides)


def _two_pass_loss(cfg, lpips=None):
    """A ``DecoderLoss`` whose GAN steps take their gradients the textbook way, as the loop did before (the "before"
    rows): ``autograd.grad`` of each loss at the last layer for the adaptive weight, then the total's backward, so
    the LPIPS and discriminator backwards run twice."""
    import torch

    from ..models.losses import DecoderLoss, adaptive_gan_weight, hinge_g_loss

    class TwoPassLoss(DecoderLoss):
        def generator(self, pred, target, step, discriminator=None, last_layer=None, reduce_grads=None):
            factor = self.gan_factor(step)
            if factor == 0:
                return super().generator(pred, target, step, discriminator, last_layer, reduce_grads)
            rec, terms = self.reconstruction(pred, target)
            discriminator.requires_grad_(False)
            g = hinge_g_loss(discriminator(pred.float()))
            discriminator.requires_grad_(True)
            rec_grad = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
            gan_grad = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
            w = adaptive_gan_weight(rec_grad, gan_grad, self.cfg.adaptive_max, reduce_grads)
            loss = rec + self.cfg.gan_weight * factor * w * g
            terms.update(g_loss=g.detach(), adaptive_weight=w, gan_factor=torch.tensor(factor), total=loss)
            return loss, terms

    return TwoPassLoss(cfg, lpips)


def _timed_train_run(cfg, out: Path, pairs: Path, latents: Path, skip: int, threads: int,
                     two_pass_gan: bool = False) -> dict:
    """One timed ``train_decoder`` run on the noise degrader (in a fresh process: see bench_train_step): the median
    step's pieces and seconds after ``skip`` steps, every step's pieces, and the peak memory. ``two_pass_gan``: the
    loss of ``_two_pass_loss``."""
    import warnings

    import torch

    from ..core.profiling import StepTimings
    from ..data.datasets import PairDataset
    from ..degrade import NoiseDegrader
    from ..train.decoder import train_decoder

    torch.set_num_threads(threads)
    timings = StepTimings(_device(), memory=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LPIPS' random-backbone notice: reported in the notes
        train_decoder(cfg, out, PairDataset(pairs, latents=latents), None, degrader=NoiseDegrader(), timings=timings,
                      loss_fn=_two_pass_loss(cfg.loss) if two_pass_gan else None)
    return {"pieces": timings.median(skip=skip), "peak_mb": timings.peak_memory_mb(),
            "step": statistics.median(timings.step_totals(skip=skip)), "steps": timings.steps,
            "model": statistics.median(sum(v for k, v in piece.items() if k in MODEL_PIECES)
                                       for piece in timings.steps[skip:])}


def bench_train_step(preset_name: str, quick: bool, batches: tuple[int, ...] | None = None,
                     rounds: int | None = None, steps: int | None = None, warmup: int = 1,
                     variants: dict[str, dict] | None = None, only: tuple[str, ...] | None = None,
                     vae: str | None = None) -> dict:
    """Where the time of one step of the real ``train_decoder`` loop goes, per option, at the preset's sizes.

    Every measurement is a real training run (a pair set of real photos with its latent cache, TrainConfig at the
    recipe's defaults with LPIPS alex and the noise degrader; the GAN off, as in the first gan_start steps, unless
    the variant says "GAN on") timed by ``ldlib.core.profiling.StepTimings``. Variants run in turn in every round (a
    noisy machine hits all alike); a row is the median over rounds of each run's median step after ``warmup`` steps,
    and ratios are medians over rounds of per-round ratios to the first variant (or the variant's "vs"). Where two
    GAN-on rows and their GAN-off rows ("gan_off") were measured, a ratio also gives what that makes of a whole run
    at the recipe's step counts (``_recipe_ratio``). ``variants``: name -> TrainConfig / LossConfig overrides
    (default: ``train_step_variants``); ``only``: keep the variants whose names are listed. ``vae``: a local VAE
    replacing the preset's (e.g. a folder of random full-size weights: the step's cost does not depend on the
    values). On CUDA the notes add, per batch, the share of the default step outside CUDA kernels
    (``_outside_kernels``). With DataLoader workers the warm-up also drains the batches they queued ahead
    (``_prefetched``).
    """
    import dataclasses
    import multiprocessing
    import shutil
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from ..data.datasets import PairDataset, collate_pairs
    from ..presets import get_preset
    from ..train.decoder import TrainConfig

    device = _device()
    preset = get_preset(preset_name, **({"vae": vae} if vae else {}))
    batches = batches or ((2,) if quick else (1, 4, 8) if device.type == "cuda" else (2, 4))
    rounds = rounds or (1 if quick else 3)
    steps = steps or (1 if quick else 2)  # timed steps per run, after the warm-up
    measured, notes = (variants, []) if variants is not None else train_step_variants(device, quick)
    if only:
        only = tuple(n.strip() for n in only)
        unknown = sorted(set(only) - set(measured))
        if unknown:
            raise ValueError(f"unknown bench train variant(s) {', '.join(map(repr, unknown))}; measured here: "
                             f"{', '.join(map(repr, measured))}")
        measured = {k: v for k, v in measured.items() if k in only}
        missing = {k: v["vs"] for k, v in measured.items() if v.get("vs", k) not in measured}
        if missing:
            raise ValueError("; ".join(f"variant {k!r} is compared with {v!r}: keep that one too" for k, v in missing.items()))
    first = next(iter(measured))  # ratios compare with it unless a variant names its own "vs"
    recipe = TrainConfig()  # a run at the recipe's step counts
    recipe_note = f"{recipe.steps} steps, the GAN on from step {recipe.loss.gan_start}"
    rated = [k for k, v in measured.items() if not UNRATED_OVERRIDES & set(v)]  # rows that get a FLOP rate
    codec = codec_of(preset)
    rows, ratios, per_round, raw, kernels, flops, rates = [], {}, {}, {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="ldlib-bench-train-") as tmp:
        tmp = Path(tmp)
        pairs, latents, origin = _bench_pairset(tmp / "data", preset, codec, count=max(batches) * 2)
        train_set = PairDataset(pairs, latents=latents)
        for batch in batches:
            runs: dict[str, list[dict]] = {k: [] for k in measured}
            for r in range(rounds):
                for name, overrides in measured.items():
                    cfg = _bench_train_config(preset_name, vae, batch, seed=r, **{
                        k: v for k, v in overrides.items() if k not in VARIANT_KEYS})
                    skip = warmup + _prefetched(cfg, device)
                    cfg = dataclasses.replace(cfg, steps=skip + steps)
                    out = tmp / f"run{sum(map(len, runs.values()))}"
                    # A fresh process per run: none inherits another's allocator state (reuse_cpu_memory), compiled
                    # graphs or caches, as a user's own run does not.
                    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                        runs[name].append(pool.submit(_timed_train_run, cfg, out, pairs, latents, skip,
                                                      torch.get_num_threads(),
                                                      overrides.get("two_pass_gan", False)).result())
                    shutil.rmtree(out, ignore_errors=True)
            if rated:
                # The default step's model work, counted once per batch: the same for every variant that changes
                # only how it runs (memory, threads, layout, compile), not what it computes.
                flops[batch] = _model_flops(_bench_train_config(preset_name, vae, batch), codec,
                                            collate_pairs([train_set[i] for i in range(batch)]))
            per_round[f"batch {batch}"] = {k: [x["step"] for x in v] for k, v in runs.items()}
            raw[f"batch {batch}"] = {k: [x["steps"] for x in v] for k, v in runs.items()}
            for name, results in runs.items():
                row = {"batch": batch, "variant": name}
                step_s = statistics.median(x["step"] for x in results)
                for group, pieces in STEP_GROUPS.items():
                    row[group] = statistics.median(sum(x["pieces"].get(p, 0.0) for p in pieces) for x in results)
                row["step_s"] = step_s
                row["non_model_%"] = 100 * sum(row[g] for g in NON_MODEL) / step_s
                row["samples_per_s"] = batch / step_s
                row["peak_mb"] = statistics.median(x["peak_mb"] for x in results)
                if name in rated:  # over the median of the runs' model time (a step's model pieces, median step)
                    rates.setdefault(batch, {})[name] = flops[batch] / statistics.median(x["model"] for x in results)
                rows.append(row)
                vs = measured[name].get("vs", first)
                if name != vs:
                    ratios[f"batch {batch}: {name} vs {vs}, step speed-up (median per-round ratio)"] = statistics.median(
                        a["step"] / b["step"] for a, b in zip(runs[vs], results))
                whole = _recipe_ratio(runs, measured, name, vs, recipe.steps, recipe.loss.gan_start)
                if whole is not None:
                    ratios[f"batch {batch}: {name} vs {vs}, a recipe run's speed-up ({recipe_note}; median "
                           f"per-round ratio)"] = whole
            if device.type == "cuda":
                cfg = _bench_train_config(preset_name, vae, batch)
                kernels[f"batch {batch}"] = _outside_kernels(cfg, tmp / f"kernels{batch}", train_set, codec, device,
                                                             warmup + _prefetched(cfg, device), steps)
    if device.type == "cpu":
        ab = _update_threads_ab(preset_name, device, rounds=3 if quick else 10)
        ratios["optimiser + EMA step alone (GAN on): update_threads=1 vs all threads (median per-round ratio)"] = ab["ratio"]
        notes.append("optimiser + EMA step alone, interleaved: " + ", ".join(f"{k} {v:.3g} s" for k, v in ab["rows"].items()))
    notes.append(f"the exact NaN skip's one read per optimiser step (runs.all_finite on the summed probe): "
                 f"{_skip_read_us(device):.1f} us per call on {device.type}, median of 200 (on CUDA it also "
                 f"waits for the step's queued work)")
    memory = ("torch.cuda.max_memory_allocated above the loop's start" if device.type == "cuda" else
              "RSS high-water mark above the loop's start (approximate: the allocator keeps some freed memory)")
    notes += [
        f"data: {origin}, {len(train_set)} pairs; each run in a fresh process: {warmup} warm-up step(s) (compilation "
        f"included; plus 2 per DataLoader worker, the batches queued ahead) then "
        f"{steps} timed; {rounds} round(s), variants interleaved",
        f"columns are seconds per optimiser step; non_model_% = data + degradation + optimiser/EMA + logging; "
        f"peak_mb: {memory}",
        "LPIPS backbone: torchvision's weights when cached, else a seeded random one (same cost)",
    ]
    precision = "bfloat16" if device.type == "cuda" else "float32"  # the loop's default autocast on each device
    matmul, n = _matmul_flops_per_s(device, getattr(torch, precision)) if rates else (None, None)
    for batch, by_row in rates.items():
        notes.append(f"batch {batch}, model work of the GAN-off step (decoder forward + backward, LPIPS forward + "
                     f"backward; FlopCounterMode): {flops[batch] / 1e9:.4g} GFLOP, run at " + ", ".join(
                         f"{r / 1e9:.4g} GFLOP/s ({100 * r / matmul:.0f} %) in {name!r}" for name, r in by_row.items())
                     + f"; % of a {n}x{n} {precision} matmul's rate on this device, {matmul / 1e9:.4g} GFLOP/s "
                     f"(the same run)")
    for batch, k in kernels.items():
        notes.append(f"{batch}, new defaults, no synchronising boundaries: {k['step_s (no syncs)']:.4g} s per step, "
                     f"device busy (kernels, copies, memsets; torch.profiler) {k['device busy s']:.4g} s: "
                     f"{k['outside kernels %']:.1f} % of the step outside CUDA kernels")
    if vae:
        notes.append(f"VAE: {vae} in place of the preset's")
    return {
        "title": f"decoder training step, breakdown (real train_decoder loop), preset {preset.name} (HQ "
                 f"{preset.hq_size} px), LPIPS alex unless named, {device.type}, {torch.get_num_threads()} threads",
        "rows": rows,
        "ratios": ratios,
        "notes": notes,
        "rounds_step_s": per_round,
        "steps_s": raw,  # every run's pieces per step, warm-up included
        "outside_kernels": kernels,
        "model_flops": {f"batch {b}": f for b, f in flops.items()},
        "model_flops_per_s": {f"batch {b}": r for b, r in rates.items()},
        "matmul_flops_per_s": matmul,
    }


BENCHES["train"] = bench_train_step
