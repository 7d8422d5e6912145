"""``bench train``: where the time of one step of the real ``train_decoder`` loop goes, per option (compile,
channels_last, bf16, LPIPS net, the GAN, the loop's old defaults)."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import shutil
import statistics
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from ...build import codec_of
from ...core.profiling import StepTimings
from ...core.runs import all_finite, loader_workers, make_accelerator
from ...data.datasets import PairDataset, collate_pairs
from ...data.latents import default_cache_dir, encode_pairs
from ...data.pairs import PairSpec, SkippedInputWarning, build_pairs
from ...degrade import NoiseDegrader
from ...models.losses import DecoderLoss, LossConfig, adaptive_gan_weight, hinge_g_loss
from ...presets import get_preset
from ...train.decoder import TrainConfig, build_models, micro_step, optimizer_step, train_decoder
from .common import default_device, device_sync, generate_photos, round_ratio, shared_photos, timed_interleaved, timeit


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
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _bench_pairset(root: Path, preset, codec, count: int) -> tuple[Path, Path, str]:
    """A pair set of ``count`` pairs at the preset's sizes with its latent cache: (pairs, latents, origin)."""
    photos = root / "photos"
    photos.mkdir(parents=True)
    shared = shared_photos()
    if shared:
        origin = "../shared/data/photos"
        for p in shared[: max(1, count // 2)]:
            (photos / p.name).symlink_to(p.resolve())
    else:
        origin = "generated 2048x2048 JPEGs (../shared/data/photos absent)"
        generate_photos(photos, max(1, count // 2), (2048, 2048))
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
    from torch.profiler import ProfilerActivity, profile, schedule

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
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

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
    n = 2048 if device.type == "cpu" else 8192
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    sync = device_sync(device)
    return 2 * n**3 / timeit(lambda: (a @ b, sync()), repeats=5, warmup=2), n


def _prefetched(cfg, device) -> int:
    """Batches the loop's DataLoader queues ahead (workers x prefetch_factor 2): steps to run before timing, so that a
    timed step waits on data as it would in a long run instead of taking a batch read during the warm-up."""
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
    acc = make_accelerator("no" if device.type == "cpu" else "bf16")
    probe = torch.zeros((), device=device)

    def read() -> bool:
        return all_finite(acc, probe)

    return 1e6 * timeit(read, repeats=200, warmup=5)


def _update_threads_ab(preset_name: str, device, rounds: int) -> dict:
    """The loop's optimiser step alone (clipping, AdamW for decoder and discriminator, EMA, schedules) at
    update_threads=1 vs all threads, interleaved, on seeded stand-in gradients: median seconds and per-round ratio."""
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
                          sync=device_sync(device))
    return {"rows": {k: v["wall_s"] for k, v in t.items()}, "ratio": round_ratio(t, "all threads", "1 thread")}


def _bench_train_config(preset_name: str, vae: str | None, batch: int, **overrides):
    """The TrainConfig every bench train run starts from (LPIPS alex, no warm-up, no validation or checkpoints),
    with a variant's TrainConfig / LossConfig overrides."""
    loss_kw = {k: overrides.pop(k) for k in LOSS_OVERRIDES if k in overrides}
    return TrainConfig(preset=preset_name, vae=vae, batch=batch, warmup_steps=0, val_every=10**9,
                       checkpoint_every=10**9, log_every=10,
                       loss=LossConfig(**{"lpips_net": "alex", "gan_warmup": 0, **loss_kw}), **overrides)


def _two_pass_loss(cfg, lpips=None):
    """A ``DecoderLoss`` whose GAN steps take their gradients the textbook way, as the loop did before (the "before"
    rows): ``autograd.grad`` of each loss at the last layer for the adaptive weight, then the total's backward, so
    the LPIPS and discriminator backwards run twice."""
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
    torch.set_num_threads(threads)
    timings = StepTimings(default_device(), memory=True)
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
    device = default_device()
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
