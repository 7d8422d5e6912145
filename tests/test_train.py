"""Decoder training loop: resume == uninterrupted, NaN steps skipped with weights untouched, checkpoints, summary."""

from __future__ import annotations

import json
import math
import os
import threading

import pytest
import torch
from conftest import rel_diff
from safetensors.torch import load_file

import ldlib
from ldlib.build import codec_of, load_run_codec, parse_degrader
from ldlib.core.metrics import lpips_model
from ldlib.core.profiling import rss_mb
from ldlib.core.runs import GlobalBatchSampler, _glibc, config_changes, reused_cpu_memory, sample_generator
from ldlib.data.datasets import sample_tensor_pairs
from ldlib.degrade import CachedTeacher
from ldlib.models.decoder import TwoXDecoder
from ldlib.models.losses import DecoderLoss, LossConfig
from ldlib.presets import get_preset
from ldlib.train.decoder import TrainConfig, degrade_batch, train_decoder


@pytest.fixture(scope="module")
def setup():
    codec = codec_of(get_preset("tiny"))
    data = sample_tensor_pairs(codec, count=4, hq_size=32, seed=0)
    with pytest.warns(UserWarning, match="LPIPS") if True else None:
        lp = lpips_model("alex")
    return codec, data, lp


def _cfg(**kw) -> TrainConfig:
    # float32 on any device ("auto" is bf16 autocast on CUDA): these tests compare numerical paths.
    base = dict(
        preset="tiny", mixed_precision="no", steps=4, batch=2, warmup_steps=2, checkpoint_every=2, val_every=100, log_every=1,
        val_count=2,
        loss=LossConfig(lpips_net="alex", gan_start=1, gan_warmup=2, disc_channels=8, disc_layers=2),
    )
    base.update(kw)
    return TrainConfig(**base)


def _run(setup, out, cfg, **kw):
    codec, data, lp = setup
    return train_decoder(cfg, out, data, data, codec=codec, loss_fn=DecoderLoss(cfg.loss, lpips=lp), **kw)


def _losses(history):
    return [(h["step"], h["total"], h.get("d_loss")) for h in history]


def test_resume_equals_uninterrupted(setup, tmp_path):
    cfg = _cfg()
    full = _run(setup, tmp_path / "full", cfg)
    assert full.step == 4 and full.skipped == []
    assert "g_loss" in full.history[-1], "GAN on from step 1: the discriminator and its optimiser are exercised"

    first = _run(setup, tmp_path / "cut", cfg, stop_at=2)
    assert first.step == 2
    assert json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text())["step"] == 2
    with pytest.raises(ValueError, match="holds a run already"):
        _run(setup, tmp_path / "cut", cfg)
    second = _run(setup, tmp_path / "cut", cfg, resume=True)
    assert second.step == 4
    # Same losses for the resumed steps, bit for bit on CPU, and the same final weights (decoder, EMA, D).
    assert _losses(second.history) == _losses(full.history[2:])
    for name in ("decoder", "ema", "discriminator"):
        a = load_file(str(tmp_path / "full" / "checkpoints" / "step_000004" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "cut" / "checkpoints" / "step_000004" / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["steps_done"] == 4 and summary["finished"] and summary["skipped_steps"] == []
    assert {"psnr_ours", "psnr_bicubic"} <= set(summary["validation"])
    # Old checkpoints pruned to keep_checkpoints, no temporary folders left behind.
    names = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert names == ["latest.json", "step_000002", "step_000004"]
    assert (tmp_path / "cut" / "tb").is_dir() and any((tmp_path / "cut" / "tb").iterdir())

    # The EMA decoder loads back as a 2x codec that differs from the untrained widening.
    codec2x, cfg2 = load_run_codec(tmp_path / "cut")
    assert codec2x.upscale == 2 and TrainConfig.from_dict(cfg2) == cfg
    ema = load_file(str(tmp_path / "cut" / "checkpoints" / "step_000004" / "ema.safetensors"))
    own = dict(codec2x.named_parameters())
    assert all(torch.equal(own[k], v) for k, v in ema.items())


class NaNAt(DecoderLoss):
    """A loss that turns non-finite at chosen steps."""

    def __init__(self, cfg, lpips, bad_steps):
        super().__init__(cfg, lpips=lpips)
        self.bad_steps = set(bad_steps)

    def generator(self, pred, target, step, *a, **kw):
        loss, terms = super().generator(pred, target, step, *a, **kw)
        if step in self.bad_steps:
            loss = loss * float("nan")
        return loss, terms


def test_nan_step_is_skipped_and_weights_untouched(setup, tmp_path):
    codec, data, lp = setup
    cfg = _cfg(steps=3, checkpoint_every=1, keep_checkpoints=5)
    out = tmp_path / "nan"
    train_decoder(cfg, out, data, data, codec=codec, loss_fn=DecoderLoss(cfg.loss, lpips=lp), stop_at=1)
    res = train_decoder(cfg, out, data, data, codec=codec, loss_fn=NaNAt(cfg.loss, lp, {1}), resume=True, stop_at=2)
    assert res.skipped == [1] and res.history[0]["skipped"] is True
    before, after = out / "checkpoints" / "step_000001", out / "checkpoints" / "step_000002"
    for name in ("decoder", "ema", "discriminator"):
        a, b = load_file(str(before / f"{name}.safetensors")), load_file(str(after / f"{name}.safetensors"))
        # Spectral norm's power-iteration vectors (_u, _v buffers) advance on every forward; weights must not.
        weights = [k for k in a if not k.endswith(("._u", "._v"))]
        assert weights and all(torch.equal(a[k], b[k]) for k in weights), f"{name} changed on a skipped step"
    opt_a = torch.load(before / "optim.pt", weights_only=True)["opt_g"]["state"]
    opt_b = torch.load(after / "optim.pt", weights_only=True)["opt_g"]["state"]
    assert all(torch.equal(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"]) for k in opt_a)
    # Training goes on after the bad step.
    res = train_decoder(cfg, out, data, data, codec=codec, loss_fn=DecoderLoss(cfg.loss, lpips=lp), resume=True)
    assert res.step == 3 and res.skipped == [1] and res.history[-1]["skipped"] is False
    a = load_file(str(after / "decoder.safetensors"))
    b = load_file(str(out / "checkpoints" / "step_000003" / "decoder.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


class NaNPredAt(DecoderLoss):
    """A decoder output that is non-finite at chosen steps (a real overflow: every loss term NaN)."""

    def __init__(self, cfg, lpips, bad_steps):
        super().__init__(cfg, lpips=lpips)
        self.bad_steps = set(bad_steps)

    def generator(self, pred, target, step, *a, **kw):
        return super().generator(pred * float("nan") if step in self.bad_steps else pred, target, step, *a, **kw)


def _strict_json(text: str):
    """json.loads that refuses NaN / Infinity (not JSON: other readers fail on them)."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a JSON file"))


def test_a_skipped_step_leaves_the_summary_means_finite_and_valid_json(setup, tmp_path):
    codec, data, lp = setup
    cfg = _cfg(steps=4)
    res = train_decoder(cfg, tmp_path / "run", data, data, codec=codec, loss_fn=NaNPredAt(cfg.loss, lp, {1}))
    assert res.skipped == [1] and res.history[1]["skipped"] and math.isnan(res.history[1]["total"])
    means = _strict_json((tmp_path / "run" / "summary.json").read_text())["final_losses_mean_last_steps"]
    trained = [h for h in res.history if not h["skipped"]]
    assert len(trained) == 3
    for key in ("total", "l1", "lpips", "rec", "lr", "sigma_mean"):
        assert means[key] == pytest.approx(sum(h[key] for h in trained) / len(trained)), key


def test_logged_lr_is_the_one_the_step_used(setup, tmp_path, monkeypatch, capsys):
    used = []
    adamw_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda self, *a, **kw: used.append(self.param_groups[0]["lr"]) or adamw_step(self, *a, **kw))
    cfg = _cfg(steps=4, warmup_steps=2, lr=1e-4, loss=LossConfig(lpips_net="alex", gan_start=100))
    res = _run(setup, tmp_path / "run", cfg)
    # constant_with_warmup in closed form: lr * min(1, k / warmup) at step k; the decoder's AdamW alone (GAN off).
    expected = [1e-4 * min(1.0, k / 2) for k in range(4)]
    assert used == pytest.approx(expected, rel=1e-12)
    assert [h["lr"] for h in res.history] == pytest.approx(expected, rel=1e-12)
    # gan_start 100 of 4 steps with the GAN weighted: the run says the GAN never turns on.
    assert "the GAN never turns on in this run: gan_start 100 >= steps 4" in capsys.readouterr().out


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_grad_accumulation_matches_bigger_batch(setup, tmp_path, max_grad_norm):
    # batch 2 x accumulation 2 == batch 4 in one micro-step (same global batch, same per-sample noise). Clipped
    # (the gradient norm here is ~1): clipping happens once, after accumulation; unclipped: the gradient's scale.
    loss = LossConfig(lpips_net="alex", gan_start=100)
    cfg_a = _cfg(steps=2, batch=2, grad_accum=2, max_grad_norm=max_grad_norm, loss=loss)
    cfg_b = _cfg(steps=2, batch=4, grad_accum=1, max_grad_norm=max_grad_norm, loss=loss)
    a = _run(setup, tmp_path / "a", cfg_a)
    b = _run(setup, tmp_path / "b", cfg_b)
    for ha, hb in zip(a.history, b.history):
        assert ha["total"] == pytest.approx(hb["total"], rel=1e-4)
    # Compare the gradients, through AdamW's moments (linear and quadratic in them), relative to their largest
    # value: float32 sums in another order differ by rounding only. Not the weights: Adam turns the rounding noise
    # of a gradient that is ~0 into a +-lr step, and it hides a wrong gradient scale (it divides by sqrt(v)).
    # The warm-up's first lr is 0, so both steps' gradients are taken at the initial weights.
    opt_a = torch.load(tmp_path / "a" / "checkpoints" / "step_000002" / "optim.pt", weights_only=True)["opt_g"]["state"]
    opt_b = torch.load(tmp_path / "b" / "checkpoints" / "step_000002" / "optim.pt", weights_only=True)["opt_g"]["state"]
    assert opt_a.keys() == opt_b.keys() and len(opt_a) > 10
    for moment in ("exp_avg", "exp_avg_sq"):
        ma = torch.cat([opt_a[k][moment].flatten() for k in sorted(opt_a)])
        mb = torch.cat([opt_b[k][moment].flatten() for k in sorted(opt_b)])
        assert mb.abs().max() > 0 and rel_diff(ma, mb) <= 1e-4, moment  # 1e-6 seen; a gradient off by 2x gives >= 0.5


@pytest.mark.parametrize("setting", [dict(val_sigma=1.5), dict(val_sigma=-0.1), dict(val_count=0),
                                     dict(max_grad_norm=-1.0)],
                         ids=lambda d: f"{next(iter(d))}={next(iter(d.values()))}")
def test_config_mistakes_are_refused_naming_the_value(setting):
    (name, value), = setting.items()
    with pytest.raises(ValueError, match=rf"TrainConfig\.{name} must .*got {value}"):
        TrainConfig(**setting)


def test_global_batch_sampler_is_split_consistently():
    one = GlobalBatchSampler(n=5, batch=4, world=1, rank=0, seed=3, start=0, stop=4)
    two = [GlobalBatchSampler(n=5, batch=2, world=2, rank=r, seed=3, start=0, stop=4) for r in range(2)]
    merged = [a + b for a, b in zip(*two)]
    assert merged == list(one)
    stream = [i for b in one for i in b]
    assert sorted(stream[:5]) == list(range(5)) and sorted(stream[5:10]) == list(range(5))  # epochs are permutations
    resumed = GlobalBatchSampler(n=5, batch=4, world=1, rank=0, seed=3, start=2, stop=4)
    assert list(resumed) == list(one)[2:]


def test_degrader_parsing(tmp_path):
    assert parse_degrader("none") is None
    assert type(parse_degrader("noise")).__name__ == "NoiseDegrader"
    with pytest.raises(ValueError, match="teacher:DIR"):
        parse_degrader("teacher")
    with pytest.raises(FileNotFoundError, match="proxy folder"):
        parse_degrader(f"proxy:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="unknown degrader"):
        parse_degrader("blur")


def test_gradient_checkpointing_same_gradients(setup, monkeypatch):
    import torch.utils.checkpoint as tuc

    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    codec, data, _ = setup
    z, hq = data.latents[:2], data.hq[:2]
    grads = []
    for ckpt in (False, True):
        model = TwoXDecoder(codec.to_2x())
        if ckpt:
            model.enable_gradient_checkpointing()
            assert model.codec.vae.decoder.gradient_checkpointing
        (model(z) - hq).abs().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.trainable_state().items() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    # The recomputed forward is the same arithmetic: agreement to float rounding of the largest gradient (the
    # gradients are ~1e-3, so an absolute 1e-6 would allow 0.1% errors).
    flat = [torch.cat([g[k].flatten() for k in sorted(g)]) for g in grads]
    assert rel_diff(flat[1], flat[0]) <= 1e-6
    assert len(calls) >= 2, "the checkpointed path was not taken"


def test_bf16_autocast_runs_and_records_precision(setup, tmp_path):
    # The GPU default (bf16 autocast) exercised on CPU: finite losses, GAN and adaptive weight included.
    res = _run(setup, tmp_path / "bf16", _cfg(steps=2, checkpoint_every=2, mixed_precision="bf16"))
    assert res.summary["mixed_precision"] == "bf16" and res.skipped == []
    assert all(torch.isfinite(torch.tensor(h["total"])) for h in res.history) and "adaptive_weight" in res.history[-1]
    # And a later fp32 run in the same process is not refused by accelerate's one-precision-per-process state.
    assert _run(setup, tmp_path / "fp32", _cfg(steps=1, checkpoint_every=1)).summary["mixed_precision"] == "no"


def test_teacher_degrader_uses_cached_targets(setup, tmp_path):
    from ldlib.build import diffusion_degrader
    from ldlib.core.samples import sample_photos
    from ldlib.data.datasets import PairDataset
    from ldlib.data.latents import LatentCache, default_cache_dir, encode_pairs
    from ldlib.data.pairs import PairSpec, build_pairs
    from ldlib.data.teacher_data import TeacherSet, TeacherSpec, describe_teacher, generate_teacher

    codec, _, lp = setup
    preset = get_preset("tiny")
    pairs = tmp_path / "pairs"
    build_pairs(sample_photos(), pairs, PairSpec.from_preset(preset, hq_size=32), workers=1,
                progress=False)
    latents = default_cache_dir(pairs, "tiny")
    encode_pairs(pairs, codec, latents, progress=False)
    deg = diffusion_degrader(preset, steps=1, cache_dir=tmp_path / "prompts")
    generate_teacher(pairs, latents, deg, tmp_path / "teacher", TeacherSpec(sigma_max=0.2, per_latent=2),
                     teacher_info=describe_teacher(deg, "tiny"), progress=False)

    tl = parse_degrader(f"teacher:{tmp_path / 'teacher'}", sigma_max=0.12, codec=codec)
    assert isinstance(tl, CachedTeacher)
    ts = TeacherSet(tmp_path / "teacher")
    ds = PairDataset(pairs, latents=LatentCache(latents))
    items = [ds[i] for i in range(len(ds))]
    z = torch.stack([it["latent"] for it in items])
    ids = [it["id"] for it in items]
    cfg = _cfg()
    zd, sig = degrade_batch(tl, z, list(range(len(ids))), 0, cfg.seed, (cfg.sigma_min, cfg.sigma_max), ids)
    for j, pid in enumerate(ids):
        usable = [r for r in ts.records if r["id"] == pid and r["sigma"] <= 0.12]
        if usable:  # one of its teacher targets, with that record's sigma
            match = [r for r in usable if torch.equal(ts.target(r["key"]), zd[j])]
            assert match and sig[j].item() == pytest.approx(match[0]["sigma"])
        else:  # no record in range: trained clean
            assert torch.equal(zd[j], z[j]) and sig[j].item() == 0.0
    assert 0 < tl.coverage(ids) <= 1

    # sigma_min bounds the records too: only those in [0.05, 0.12], and a pair with none of them trains clean.
    def usable(pid):
        return [r for r in ts.records if r["id"] == pid and 0.05 <= r["sigma"] <= 0.12]

    tl = parse_degrader(f"teacher:{tmp_path / 'teacher'}", sigma_min=0.05, sigma_max=0.12, codec=codec)
    assert tl.coverage(ids) == sum(bool(usable(pid)) for pid in ids) / len(ids)
    assert any(r["sigma"] < 0.05 for r in ts.records), "the teacher data has records below sigma_min"
    for step in range(4):
        zd, sig = degrade_batch(tl, z, list(range(len(ids))), step, cfg.seed, (0.05, 0.12), ids)
        for j, pid in enumerate(ids):
            if usable(pid):
                match = [r for r in usable(pid) if torch.equal(ts.target(r["key"]), zd[j])]
                assert match and sig[j].item() == pytest.approx(match[0]["sigma"])
            else:
                assert torch.equal(zd[j], z[j]) and sig[j].item() == 0.0

    # train_decoder passes the config's range on.
    seen = []
    real = CachedTeacher.degrade_samples

    def recording(self, *a, **kw):
        out = real(self, *a, **kw)
        seen.extend(out[1].tolist())
        return out

    cfg = _cfg(steps=2, degrader=f"teacher:{tmp_path / 'teacher'}", val_fraction=0.34, sigma_min=0.05)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CachedTeacher, "degrade_samples", recording)
        res = train_decoder(cfg, tmp_path / "run", pairs=pairs, codec=codec, loss_fn=DecoderLoss(cfg.loss, lpips=lp))
    assert res.step == 2 and res.summary["degrader"] == cfg.degrader
    assert seen and all(s == 0.0 or 0.05 <= s <= 0.12 for s in seen) and any(s > 0 for s in seen), seen


def test_proxy_degrader_from_folder(setup, tmp_path):
    from conftest import rel_diff

    from ldlib.degrade import ProxyDegrader
    from ldlib.models.proxy import ProxyNet, save_proxy

    codec, data, lp = setup
    torch.manual_seed(0)
    save_proxy(ProxyNet(channels=16, width=8, blocks=1), tmp_path / "proxy")
    deg = parse_degrader(f"proxy:{tmp_path / 'proxy'}")
    assert isinstance(deg, ProxyDegrader)
    cfg = _cfg(steps=1, degrader=f"proxy:{tmp_path / 'proxy'}")
    zd, sig = degrade_batch(deg, data.latents[:2], [0, 1], 3, cfg.seed, (cfg.sigma_min, cfg.sigma_max))
    g = sample_generator(cfg.seed, 3, 1, stream=1)
    s = cfg.sigma_max * torch.rand((), generator=g).item()
    assert sig[1].item() == pytest.approx(s)
    # Sample 1 alone with its own generator: the same noise, the net run at batch 1 instead of 2.
    assert rel_diff(zd[1:2], deg.degrade(data.latents[1:2], s, g)) <= 1e-5
    res = _run(setup, tmp_path / "run", cfg)
    assert res.step == 1 and res.summary["degrader"] == cfg.degrader


def test_gan_steps_train_as_the_textbook_two_pass_steps(setup, tmp_path):
    # The loop with the one-pass GAN gradients (DecoderLoss.generator) against the same loop with the textbook
    # two-pass ones (the bench's baseline): GAN on from step 1, two micro-steps per step, the same run to rounding.
    from ldlib.apps.bench.train import _two_pass_loss

    codec, data, lp = setup
    cfg = _cfg(steps=4, grad_accum=2, checkpoint_every=4)
    one = _run(setup, tmp_path / "one", cfg)
    two = train_decoder(cfg, tmp_path / "two", data, data, codec=codec, loss_fn=_two_pass_loss(cfg.loss, lpips=lp))
    assert [h["step"] for h in one.history] == [h["step"] for h in two.history] and "adaptive_weight" in one.history[-1]
    for a, b in zip(one.history, two.history):
        for k in ("total", "rec", "g_loss", "adaptive_weight", "d_loss"):
            if k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (b["step"], k)
    for name in ("decoder", "ema", "discriminator"):
        a = load_file(str(tmp_path / "one" / "checkpoints" / "step_000004" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "two" / "checkpoints" / "step_000004" / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for k in b:
            assert rel_diff(_without_key_bias(k, a[k]), _without_key_bias(k, b[k])) <= 1e-5, (name, k)


def _without_key_bias(name: str, t: torch.Tensor) -> torch.Tensor:
    """A fused attention qkv bias without its key third; other tensors as they are.

    The key bias has a zero gradient in exact arithmetic (softmax ignores a shift shared by all keys), so the rounding
    noise of two equal computations is all its gradient holds, and Adam turns noise into steps of up to lr: measured,
    the key third of the mid-block's bias differed by 2e-6 while its query and value thirds agreed to 1e-9.
    """
    if name.endswith("to_qkv.bias"):
        q, _, v = t.chunk(3)
        return torch.cat([q, v])
    return t


def test_torch_compile_same_losses(setup, tmp_path):
    # GAN on from step 1: the adaptive weight's double differentiation must work through compiled graphs too.
    cfg = dict(steps=2, checkpoint_every=2, loss=LossConfig(lpips_net="alex", gan_start=1, gan_warmup=0,
                                                              disc_channels=8, disc_layers=2))
    plain = _run(setup, tmp_path / "plain", _cfg(**cfg))
    compiled = _run(setup, tmp_path / "compiled", _cfg(compile=True, **cfg))
    for a, b in zip(plain.history, compiled.history):
        assert b["total"] == pytest.approx(a["total"], rel=1e-4, abs=1e-6)


# --- the hot loop: no host reads per step, batched history, timings ------------------------------------------------


class DeviceReads(torch.overrides.TorchFunctionMode):
    """Records every read back to the host of a tensor that would live on the GPU in a GPU run.

    Such tensors are the batch's and everything computed from it or from a parameter (tracked op by op, and
    through torch.autograd.grad), or created on such a tensor's ``.device``; sigmas and noise drawn on the CPU
    are not. A read is what synchronises a GPU: item(), float(), bool(), tolist(), nonzero(), .cpu(), ... Each is
    recorded with the ldlib functions on the stack.
    """

    READS = {"item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy", "cpu", "nonzero",
             "argwhere", "masked_select", "unique"}

    def __init__(self, seeds):
        super().__init__()
        from torch.utils.weak import WeakIdKeyDictionary

        self.on_device = WeakIdKeyDictionary()
        for t in seeds:
            self.on_device[t] = True
        self.reads = []
        self.devices = []  # the .device objects of device tensors: what is created "on the device" uses one

    def mark(self, out):
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.on_device[t] = True
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = torch.utils._pytree.tree_flatten((args, kwargs))[0]
        device_input = any(isinstance(t, torch.nn.Parameter) or t in self.on_device for t in leaves
                           if isinstance(t, torch.Tensor)) or any(any(t is d for d in self.devices) for t in leaves)
        if getattr(func, "__self__", None) is torch.Tensor.device:  # the .device property
            out = func(*args, **kwargs)
            if device_input:
                self.devices.append(out)
            return out
        name = getattr(func, "__name__", "")
        if device_input and name in self.READS:
            import traceback

            package = os.path.dirname(ldlib.__file__) + os.sep  # not "/ldlib/": a clone may live in a folder of that name
            self.reads.append(tuple(f.name for f in traceback.extract_stack() if f.filename.startswith(package)))
        out = func(*args, **kwargs)
        if name == "to" and out is args[0] and args[0] not in self.on_device:
            return out  # a host tensor moved to the device: on the CPU the same object, on a GPU a copy
        return self.mark(out) if device_input else out


def test_hot_loop_reads_the_device_once_per_optimiser_step(setup, tmp_path, monkeypatch):
    # On a GPU every read of a device tensor is a host sync. The loop may read one flag per optimiser step (the
    # exact NaN skip) and the pending loss terms every log_every steps, nothing else (checkpoints aside).
    codec, data, lp = setup
    mode = DeviceReads([data.latents, data.hq])
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: mode.mark(real_grad(*a, **k)))
    cfg = _cfg(steps=4, grad_accum=2, log_every=4, checkpoint_every=100)  # GAN on from step 1
    with mode:
        res = train_decoder(cfg, tmp_path / "run", data, None, codec=codec, loss_fn=DecoderLoss(cfg.loss, lpips=lp))
    assert res.step == 4 and "adaptive_weight" in res.history[-1] and len(res.history) == 4
    # The head fit reads its sums once per batch before the first step: set-up, like a checkpoint, not the loop.
    in_steps = [r for r in mode.reads if "_save_checkpoint" not in r and "fit_head_2x" not in r]
    assert all(r[-2:] in {("one_step", "all_finite"), ("flush", "read")} for r in in_steps), in_steps
    # 4 optimiser steps (8 micro-steps): 4 skip flags; terms read at step 0 and before the final checkpoint.
    assert sum(r[-1] == "all_finite" for r in in_steps) == 4
    assert sum(r[-1] == "read" for r in in_steps) == 2
    assert len(in_steps) == 6, in_steps


def test_history_read_in_batches_is_the_same(setup, tmp_path):
    # Terms read every step or every 3 steps: the same history.jsonl lines, one per step, and the same result.
    every = _run(setup, tmp_path / "every", _cfg(steps=4, log_every=1))
    batched = _run(setup, tmp_path / "batched", _cfg(steps=4, log_every=3))
    lines = [(tmp_path / name / "history.jsonl").read_text().splitlines() for name in ("every", "batched")]
    assert len(lines[0]) == 4 and lines[0] == lines[1]
    assert every.history == batched.history


class NaNOnce(DecoderLoss):
    """A loss that is non-finite in the first micro-step of one optimiser step only."""

    def __init__(self, cfg, lpips, bad_step):
        super().__init__(cfg, lpips=lpips)
        self.bad_step, self.calls = bad_step, 0

    def generator(self, pred, target, step, *a, **kw):
        loss, terms = super().generator(pred, target, step, *a, **kw)
        if step == self.bad_step:
            self.calls += 1
            if self.calls == 1:
                loss = loss * float("inf")
        return loss, terms


def test_nan_skip_between_reads_with_accumulation(setup, tmp_path):
    # The bad micro-step is not at a read (log_every 4) and shares its window with a good one: still skipped exactly.
    codec, data, lp = setup
    cfg = _cfg(steps=3, grad_accum=2, batch=1, checkpoint_every=1, keep_checkpoints=5, log_every=4)
    out = tmp_path / "nan"
    train_decoder(cfg, out, data, data, codec=codec, loss_fn=DecoderLoss(cfg.loss, lpips=lp), stop_at=1)
    res = train_decoder(cfg, out, data, data, codec=codec, loss_fn=NaNOnce(cfg.loss, lp, 1), resume=True)
    assert res.skipped == [1] and [h["skipped"] for h in res.history] == [True, False]
    before, after = out / "checkpoints" / "step_000001", out / "checkpoints" / "step_000002"
    for name in ("decoder", "ema", "discriminator"):
        a, b = load_file(str(before / f"{name}.safetensors")), load_file(str(after / f"{name}.safetensors"))
        weights = [k for k in a if not k.endswith(("._u", "._v"))]
        assert weights and all(torch.equal(a[k], b[k]) for k in weights), f"{name} changed on a skipped step"
    for opt in ("opt_g", "opt_d"):
        sa = torch.load(before / "optim.pt", weights_only=True)[opt]["state"]
        sb = torch.load(after / "optim.pt", weights_only=True)[opt]["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k][m], sb[k][m]) for k in sa for m in sa[k]), opt
    ema_a = json.loads((before / "state.json").read_text())["ema"]
    ema_b = json.loads((after / "state.json").read_text())["ema"]
    assert ema_a["optimization_step"] == ema_b["optimization_step"]


def test_step_timings_cover_the_step(setup, tmp_path):
    import time

    from ldlib.core.profiling import StepTimings

    codec, data, lp = setup
    cfg = _cfg(steps=3, checkpoint_every=100, log_every=2)  # GAN (and the discriminator) on from step 1
    timings = StepTimings("cpu", memory=True)
    t = time.perf_counter()
    _run(setup, tmp_path / "run", cfg, timings=timings)
    wall = time.perf_counter() - t
    assert len(timings.steps) == 3
    model = {"decoder forward", "losses", "lpips forward", "loss backward", "decoder backward"}
    host = {"data", "degradation", "optimiser + EMA", "logging"}
    assert set(timings.steps[0]) == model | host
    # With the GAN on, the loss side's backward runs inside the generator loss (adaptive weight): in "losses".
    assert set(timings.steps[1]) == set(timings.steps[2]) == model - {"loss backward"} | host | {"discriminator"}
    assert all(v >= 0 for s in timings.steps for v in s.values())
    # The pieces are back to back: the steps and what ran outside them add up to less than the call's wall time.
    assert 0 < sum(timings.step_totals()) + sum(timings.outside.values()) <= wall
    assert set(timings.outside) == {"checkpoint"}
    assert timings.median(skip=1).keys() == set(timings.steps[1])
    assert timings.peak_memory_mb() >= 0


def test_single_threaded_updates_give_the_same_weights(setup, tmp_path, monkeypatch):
    # update_threads=1 (the CPU default) runs AdamW and the EMA on one thread: element-wise, so bit-identical to
    # all threads; the gradient-norm clipping (a reduction) keeps all threads.
    import ldlib.train.decoder

    seen = []
    real_build = ldlib.train.decoder.build_ema

    def spied_ema(params, decay):
        ema = real_build(params, decay)
        real_step = ema.step
        ema.step = lambda p: seen.append(torch.get_num_threads()) or real_step(p)
        return ema

    monkeypatch.setattr(ldlib.train.decoder, "build_ema", spied_ema)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = dict(steps=2, checkpoint_every=2, max_grad_norm=0.01)  # clipping active, GAN on at step 1
        one = _run(setup, tmp_path / "one", _cfg(update_threads=1, **cfg))
        seen_one, seen[:] = list(seen), []
        both = _run(setup, tmp_path / "all", _cfg(update_threads=0, **cfg))
    finally:
        torch.set_num_threads(threads)
    assert seen_one == [1, 1] and seen == [2, 2]
    assert one.history == both.history
    for name in ("decoder", "ema", "discriminator"):
        a = load_file(str(tmp_path / "one" / "checkpoints" / "step_000002" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "all" / "checkpoints" / "step_000002" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_loader_workers_give_the_same_run(setup, tmp_path):
    # Workers only move where a batch is read: same batches in the same order, so the same run, bit for bit on CPU
    # (cuDNN's backward kernels are not deterministic: on CUDA, equal to float rounding).
    from ldlib.core.runs import default_device

    exact = default_device().type == "cpu"
    cfg = dict(steps=2, checkpoint_every=2)
    main = _run(setup, tmp_path / "main", _cfg(num_workers=0, **cfg))
    workers = _run(setup, tmp_path / "workers", _cfg(num_workers=2, **cfg))
    if exact:
        assert main.history == workers.history
    for ha, hb in zip(main.history, workers.history, strict=True):
        assert ha["sigma_mean"] == hb["sigma_mean"] and ha["total"] == pytest.approx(hb["total"], rel=1e-4)
    for name in ("decoder", "ema", "discriminator"):
        a = load_file(str(tmp_path / "main" / "checkpoints" / "step_000002" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "workers" / "checkpoints" / "step_000002" / f"{name}.safetensors"))
        same = all(torch.equal(a[k], b[k]) for k in a) if exact else all(rel_diff(a[k], b[k]) <= 1e-3 for k in a)
        assert same, name


def test_loader_workers_by_device(monkeypatch):
    from ldlib.core.runs import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers(3, torch.device("cuda")) == 3 and loader_workers(0, torch.device("cuda")) == 0
    assert loader_workers(None, torch.device("cpu")) == 0  # the CPU step is model-bound: no workers by default
    assert loader_workers(None, torch.device("cuda")) == 8  # min(8, 16 - 1)
    assert loader_workers(None, torch.device("cuda"), processes=4) == 3  # 16 CPUs / 4 processes - 1
    assert loader_workers(None, torch.device("cuda"), processes=32) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 16 processes on 8 machines: 2 here
    assert loader_workers(None, torch.device("cuda"), processes=16) == 7
    with pytest.raises(ValueError, match="num_workers"):
        TrainConfig(num_workers=-1)


def test_ema_is_the_decayed_average_of_the_live_weights(setup, tmp_path):
    # diffusers' EMA (foreach update) against its closed form: at the 2nd update the decay is min(d, 2/11), and
    # ema_2 = ema_1 - (1 - decay) * (ema_1 - w_2), computed here in float64 numpy from the checkpoints.
    import numpy as np

    _run(setup, tmp_path / "run", _cfg(steps=2, checkpoint_every=1, keep_checkpoints=2, warmup_steps=0))
    ck = tmp_path / "run" / "checkpoints"
    ema1, ema2 = (load_file(str(ck / f"step_00000{i}" / "ema.safetensors")) for i in (1, 2))
    w2 = load_file(str(ck / "step_000002" / "decoder.safetensors"))
    decay = min(0.999, 2 / 11)
    for k in ema2:
        e1, w = ema1[k].double().numpy(), w2[k].double().numpy()
        expected = e1 - (1 - decay) * (e1 - w)
        scale = max(np.abs(expected).max(), 1e-12)
        assert np.abs(ema2[k].double().numpy() - expected).max() <= 4 * np.finfo(np.float32).eps * scale, k
    assert any(not torch.equal(ema1[k], ema2[k]) for k in ema2)


def test_device_busy_time_is_the_union_of_spans():
    # Against a 1-microsecond grid in numpy: overlapping, nested, touching and disjoint spans.
    import numpy as np

    from ldlib.apps.bench.train import _union_seconds

    rng = np.random.default_rng(0)
    starts = rng.integers(0, 900, 40)
    spans = [(int(a), int(a + d)) for a, d in zip(starts, rng.integers(0, 60, 40))] + [(5, 5), (100, 200), (150, 160)]
    grid = np.zeros(1000, bool)
    for a, b in spans:
        grid[a:b] = True
    assert _union_seconds(spans) == pytest.approx(grid.sum() / 1e6, rel=1e-12)
    assert _union_seconds([]) == 0


def test_bench_pair_set_takes_only_the_shared_folders_images(tmp_path, monkeypatch):
    # ../shared/data/photos holds a SOURCES.md beside the photos: the bench's pair set links images only (it once
    # linked SOURCES.md as its one "photo" at batch 1 and failed on an empty pair set).
    from PIL import Image

    import ldlib.presets
    from ldlib.apps.bench.common import shared_photos
    from ldlib.apps.bench.train import _bench_pairset
    from ldlib.core.images import load_rgb8

    photos = tmp_path / "shared" / "data" / "photos"
    photos.mkdir(parents=True)
    (photos / "SOURCES.md").write_text("licences")
    for name in ("b.jpg", "a.png"):
        Image.fromarray(torch.randint(0, 256, (320, 384, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()).save(photos / name)
    monkeypatch.setattr(ldlib.presets, "SHARED_DIR", tmp_path / "shared")
    assert shared_photos() == [photos / "a.png", photos / "b.jpg"]
    preset = get_preset("tiny")
    pairs, latents, origin = _bench_pairset(tmp_path / "bench", preset, codec_of(preset), count=2)
    assert origin == "../shared/data/photos"
    assert sorted(p.name for p in (tmp_path / "bench" / "photos").iterdir()) == ["a.png"]
    manifest = [json.loads(line) for line in (pairs / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 2 and all(load_rgb8(pairs / m["hq"])[0].shape[:2] == (preset.hq_size,) * 2 for m in manifest)
    assert len(ldlib.data.datasets.PairDataset(pairs, latents=latents)) == 2
    monkeypatch.setattr(ldlib.presets, "SHARED_DIR", tmp_path / "nowhere")
    assert shared_photos() == []


def test_train_step_bench_smoke(tmp_path):
    # The bench's plumbing at tiny size: real train_decoder runs, the breakdown adds up to the step.
    from ldlib.apps.bench.train import NON_MODEL, STEP_GROUPS, bench_train_step

    result = bench_train_step("tiny", quick=True, variants={
        "default": {}, "channels_last": {"channels_last": True},
        "default, GAN on": {"gan_start": 0, "gan_off": "default"},
        "two-pass GAN": {"gan_start": 0, "two_pass_gan": True, "vs": "default, GAN on", "gan_off": "channels_last"}})
    rows = result["rows"]
    assert [r["variant"] for r in rows] == ["default", "channels_last", "default, GAN on", "two-pass GAN"]
    for r in rows:
        pieces = sum(r[g] for g in STEP_GROUPS)  # one round, one timed step: the pieces are that step
        assert r["step_s"] > 0 and abs(pieces - r["step_s"]) <= 1e-9 * r["step_s"] + 1e-12
        assert r["non_model_%"] == pytest.approx(100 * sum(r[g] for g in NON_MODEL) / r["step_s"])
        assert r["samples_per_s"] == pytest.approx(r["batch"] / r["step_s"])
    assert rows[0]["discriminator"] == 0 < min(rows[2]["discriminator"], rows[3]["discriminator"])
    threads = "optimiser + EMA step alone (GAN on): update_threads=1 vs all threads (median per-round ratio)"
    two_pass = "batch 2: two-pass GAN vs default, GAN on"
    recipe = f"{two_pass}, a recipe run's speed-up (20000 steps, the GAN on from step 1000; median per-round ratio)"
    assert set(result["ratios"]) == {f"batch 2: {v} vs default, step speed-up (median per-round ratio)"
                                     for v in ("channels_last", "default, GAN on")} | {
        f"{two_pass}, step speed-up (median per-round ratio)", recipe, threads}  # on CPU
    assert result["ratios"][threads] > 0
    # A recipe run: 1000 steps at the GAN-off row's step, then 19 000 at the GAN-on row's (one round).
    step = {r["variant"]: r["step_s"] for r in rows}
    assert result["ratios"][recipe] == pytest.approx(
        (1000 * step["default"] + 19000 * step["default, GAN on"])
        / (1000 * step["channels_last"] + 19000 * step["two-pass GAN"]), rel=1e-9)
    # The FLOP rate: rows doing the default step's model work only, the count over the row's model columns (one
    # round, one timed step: they are that step's).
    flops, rates = result["model_flops"]["batch 2"], result["model_flops_per_s"]["batch 2"]
    assert set(rates) == {"default", "channels_last"} and flops > 0 < result["matmul_flops_per_s"]
    for r in rows[:2]:
        model_s = sum(r[g] for g in ("decoder fwd", "decoder bwd", "LPIPS fwd", "loss bwd", "L1 + GAN term"))
        assert rates[r["variant"]] == pytest.approx(flops / model_s, rel=1e-9)
    assert any(n.startswith(f"batch 2, model work of the GAN-off step") and f"{flops / 1e9:.4g} GFLOP," in n
               for n in result["notes"])


def test_model_flops_are_the_closed_form_of_the_steps_convolutions_and_attention(monkeypatch):
    # The tiny step's model work, in closed form, on the loop's own models:
    # - a convolution's forward is 2 * output elements * (in channels / groups) * kernel size; its backward one such
    #   product for the weight's gradient (if trained) and one for the input's (if needed). Hooks on the 2-D modules
    #   (LPIPS, resamplers, attention projections) and on image mode's causal_conv2d (Wan's 3-D convolutions run as
    #   2-D ones on their last time slice); LPIPS' target side runs forward only;
    # - attention (the Wan mid-block's one call): QK^T and AV, 4 * b * h * Lq * Lk * d forward, and in backward the
    #   scores again plus four products, 10 * b * h * Lq * Lk * d.
    import math

    import torch.nn.functional as F

    from ldlib.apps.bench.train import _bench_train_config, _model_flops
    from ldlib.core.runs import make_accelerator
    from ldlib.models import wan_image
    from ldlib.train.decoder import build_models

    cfg = _bench_train_config("tiny", None, 2)
    codec = codec_of(get_preset("tiny"))
    g = torch.Generator().manual_seed(0)
    batch = {"latent": torch.randn(2, 16, 8, 8, generator=g), "hq": torch.rand(2, 3, 128, 128, generator=g) * 2 - 1}
    counted = _model_flops(cfg, codec, batch)

    acc = make_accelerator(cfg.mixed_precision)
    m = build_models(cfg, codec, acc, None)
    total, seen, attention = 0, {}, []

    def add(conv, x, out, kernel):
        nonlocal total
        forward = 2 * out.numel() * (conv.in_channels // conv.groups) * math.prod(kernel)
        total += forward * (1 + conv.weight.requires_grad + x.requires_grad)
        seen[conv] = seen.get(conv, 0) + 1

    real_causal, real_sdpa = wan_image.causal_conv2d, F.scaled_dot_product_attention

    def causal(conv, x):
        out = real_causal(conv, x)
        add(conv, x, out, conv.kernel_size[1:])
        return out

    def sdpa(q, k, v, *args, **kwargs):
        nonlocal total
        (b, h, lq, d), lk = q.shape, k.shape[-2]
        total += 4 * b * h * lq * lk * d + (10 * b * h * lq * lk * d if q.requires_grad else 0)
        attention.append(q.shape)
        return real_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(wan_image, "causal_conv2d", causal)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    convs = [c for net in (m.model, m.loss_fn) for c in net.modules() if type(c) is torch.nn.Conv2d]
    hooks = [c.register_forward_hook(lambda c, i, o: add(c, i[0], o, c.kernel_size)) for c in convs]
    with acc.autocast():
        pred = m.fwd(batch["latent"].to(acc.device))
    loss, _ = m.loss_fn.generator(pred, batch["hq"].to(acc.device), 0)
    loss.backward()
    for h in hooks:
        h.remove()
    backbone = [c for c in m.loss_fn.modules() if isinstance(c, torch.nn.Conv2d) and c.kernel_size != (1, 1)]
    assert backbone and all(seen[c] == 2 for c in backbone)  # LPIPS' backbone runs on prediction and target
    assert m.model.codec.conv_out in seen and len(attention) == 1  # the widened last layer; the mid-block
    assert counted == total
    assert _model_flops(cfg, codec, {k: v[:1] for k, v in batch.items()}) == counted / 2  # per sample


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.skipif(_glibc() is None, reason="tunes glibc's allocator only (not the one in use, or the user's settings)")
def test_reused_cpu_memory_keeps_freed_blocks_and_returns_them_after():
    # The mechanism, counted by the kernel (page faults, resident memory) instead of timed.
    n = 16 * 2**20  # float32 elements: 64 MB, above glibc's largest mmap threshold (32 MB)
    with reused_cpu_memory():  # a large block from another thread (its own arena) still works with mapping off
        out = []
        t = threading.Thread(target=lambda: out.append(torch.full((3 * n,), 2.0).sum(dtype=torch.float64).item()))
        t.start()
        t.join()
        assert out == [6.0 * n]
    with reused_cpu_memory() as active:
        assert active
        refaults = []
        for k in range(10):  # the first few grow the heap until an aligned 64 MB block fits in what was freed
            before = _minor_faults()
            x = torch.empty(n).fill_(k)  # (no reduction here: the intra-op threads' own arenas would map blocks)
            assert x[0].item() == x[-1].item() == k
            del x  # freed before the next one is asked for
            refaults.append(_minor_faults() - before)
        kept = rss_mb()
    assert sum(refaults[-4:]) < n * 4 // os.sysconf("SC_PAGE_SIZE") // 10, refaults  # freed pages served the next ones
    assert kept - rss_mb() > 32, "on leaving, the kept memory goes back to the system"
    # Afterwards glibc maps a large block again (one bigger than any free space its heap kept), and unmaps it when
    # freed: gone from RSS at once.
    x = torch.empty(8 * n).fill_(1.0)
    held = rss_mb()
    del x
    assert held - rss_mb() > 256
    with reused_cpu_memory(enabled=False) as active:
        assert not active


def test_reused_cpu_memory_is_wired_and_changes_nothing(setup, tmp_path, monkeypatch):
    # The loop enters the block on CPU (the default) and not when switched off, with the same run either way. (The
    # tiny preset's tensors are too small to reach glibc's thresholds: bit-identity at taef2 size is a bench check.)
    import ldlib.train.decoder

    seen = []
    real = ldlib.train.decoder.reused_cpu_memory
    monkeypatch.setattr(ldlib.train.decoder, "reused_cpu_memory", lambda enabled: seen.append(enabled) or real(enabled))
    cfg = dict(steps=2, checkpoint_every=2)
    on = _run(setup, tmp_path / "on", _cfg(**cfg))
    off = _run(setup, tmp_path / "off", _cfg(reuse_cpu_memory=False, **cfg))
    on_cpu = on.summary["device"] == "cpu"
    assert seen == [on_cpu, False]
    assert on.history == off.history or not on_cpu
    for name in ("decoder", "ema", "discriminator"):
        a = load_file(str(tmp_path / "on" / "checkpoints" / "step_000002" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "off" / "checkpoints" / "step_000002" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a) or not on_cpu, name
    # Speed-only settings may change when a run resumes.
    assert config_changes(_cfg(reuse_cpu_memory=False, update_threads=0).to_dict(), _cfg().to_dict()) == []


def test_least_squares_start_is_fitted_once_and_recorded(setup, tmp_path, monkeypatch):
    # A new run starts from the head fitted on its training pairs (the step-0 weights are exactly to_2x's fit on the
    # same batches); config.json records the choice; resuming loads the checkpoint and never refits.
    import ldlib.models.codecs
    from ldlib.train.decoder import head_fit_batches

    codec, data, lp = setup
    cfg = _cfg(steps=2, checkpoint_every=1, head_fit_pairs=3, lr=1e-12, warmup_steps=0, ema_decay=0.0)
    run = tmp_path / "run"
    res = _run(setup, run, cfg, stop_at=1)
    assert json.loads((run / "config.json").read_text())["head_init"] == "least-squares"
    degrader = parse_degrader(cfg.degrader)
    expected = codec.to_2x("least-squares", head_fit_batches(cfg, data, degrader, torch.device("cpu")), cfg.head_ridge)
    # lr 1e-12: one step moves the head by ~1e-12 of its scale, so it still shows the fit (the nearest copy is far).
    head = res.codec2x.conv_out.weight.detach()
    assert rel_diff(head, expected.conv_out.weight) < 1e-6
    assert rel_diff(codec.to_2x().conv_out.weight, expected.conv_out.weight) > 1e-2

    def refit(*a, **k):
        raise AssertionError("resume refitted the head")

    monkeypatch.setattr(ldlib.models.codecs, "fit_head_2x", refit)
    res2 = _run(setup, run, cfg, resume=True)
    assert res2.step == 2


def test_a_run_from_before_the_head_choice_resumes_as_nearest(setup, tmp_path):
    cfg = _cfg(steps=2, checkpoint_every=1, head_init="nearest")
    run = tmp_path / "run"
    _run(setup, run, cfg, stop_at=1)
    old = json.loads((run / "config.json").read_text())
    for key in ("head_init", "head_fit_pairs", "head_fit_degraded", "head_ridge"):
        old.pop(key)
    (run / "config.json").write_text(json.dumps(old))
    res = _run(setup, run, _cfg(steps=2, checkpoint_every=1), resume=True)  # today's default: least-squares
    assert res.step == 2
    assert json.loads((run / "config.json").read_text())["head_init"] == "nearest"


# --- issue 28, item 4: non-finite and absurd values, diverged weights ---------------------------------------------


@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--lr", "nan"), ("--l1-weight", "nan"), ("--l1-weight", "inf"),
                                        ("--lpips-weight", "nan"), ("--max-grad-norm", "nan"),
                                        ("--max-grad-norm", "inf"), ("--sigma-max", "nan")])
def test_non_finite_numbers_are_refused_at_parse_naming_the_flag(flag, value, tmp_path, capsys):
    from ldlib.apps.cli import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train-decoder", str(tmp_path / "pairs"), str(out), "--preset", "tiny", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{flag}: {value!r} is not a finite number" in err, err
    assert not out.exists()


@pytest.mark.parametrize("flag,value", [("--lr", "1e30"), ("--disc-lr", "2"), ("--l1-weight", "0")])
def test_absurd_numbers_are_refused_naming_the_flag(flag, value, tmp_path, capsys):
    from ldlib.apps.cli import main

    out = tmp_path / "run"
    argv = ["train-decoder", str(tmp_path / "pairs"), str(out), "--preset", "tiny", flag, value]
    if flag == "--l1-weight":
        argv += ["--lpips-weight", "0"]  # nothing left that pulls the output towards HQ
    assert main(argv) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}") and "Config" not in lines[0], lines
    assert not out.exists()


def test_non_finite_config_values_are_refused_in_the_dataclass():
    with pytest.raises(ValueError, match=r"TrainConfig\.lr: inf is not a finite number"):
        TrainConfig(lr=float("inf"))
    with pytest.raises(ValueError, match=r"LossConfig\.lpips_weight: nan is not a finite number"):
        LossConfig(lpips_weight=float("nan"))
    with pytest.raises(ValueError, match=r"TrainConfig\.max_grad_norm: inf"):
        TrainConfig(max_grad_norm=float("inf"))


def test_a_run_whose_weights_stop_being_finite_stops_and_never_exports(setup, tmp_path, monkeypatch, capsys):
    """Weights that turn NaN mid-run (a diverging update) stop the run with an error naming it; no checkpoint or
    summary holds them, and export / upscale refuse a checkpoint that does."""
    from safetensors.torch import save_file

    import ldlib.train.decoder as train_mod
    from ldlib.apps.cli import main
    from ldlib.apps.export import export_run

    real_step = train_mod.optimizer_step

    def diverging_step(m, acc, cfg, skip, d_active):  # the update of step 2 overflows one weight
        real_step(m, acc, cfg, skip, d_active)
        if m.sched_g.last_epoch == 3:
            with torch.no_grad():
                m.params[0].fill_(float("inf"))

    monkeypatch.setattr(train_mod, "optimizer_step", diverging_step)
    cfg = _cfg(steps=6, checkpoint_every=2, loss=LossConfig(lpips_net="alex", gan_start=100))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="weights stopped being finite by step [34]") as e:
        _run(setup, out, cfg)
    assert str(out) in str(e.value) and "step_000002" in str(e.value)
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == ["step_000002"] and not (out / "summary.json").exists()  # nothing after the divergence kept
    # a checkpoint that holds non-finite weights (written by an older ldlib) is refused by export and upscale
    ema = out / "checkpoints" / "step_000002" / "ema.safetensors"
    sd = load_file(str(ema))
    first = sorted(sd)[0]
    sd[first] = torch.full_like(sd[first], float("nan"))
    save_file(sd, str(ema))
    with pytest.raises(ValueError, match="not finite"):
        export_run(out, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    from ldlib.core.images import save_image

    save_image(torch.zeros(1, 3, 16, 16), tmp_path / "in.png")
    capsys.readouterr()
    code = main(["upscale", str(tmp_path / "in.png"), "--model", str(out), "--out", str(tmp_path / "up")])
    assert code == 2 and "not finite" in capsys.readouterr().err
    assert not list((tmp_path / "up").glob("*.png")) if (tmp_path / "up").exists() else True
