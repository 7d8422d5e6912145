"""Resuming a run without losing or misreporting anything: settings, damaged checkpoints, logs, EMA settings."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ldlib.apps.cli import main
from ldlib.build import codec_of, load_run_codec
from ldlib.core.metrics import lpips_model
from ldlib.core.runs import read_history
from ldlib.data.datasets import sample_tensor_pairs
from ldlib.models.losses import DecoderLoss, LossConfig
from ldlib.presets import get_preset
from ldlib.train.decoder import TrainConfig, train_decoder


@pytest.fixture(scope="module")
def setup():
    codec = codec_of(get_preset("tiny"))
    data = sample_tensor_pairs(codec, count=4, hq_size=32, seed=0)
    with pytest.warns(UserWarning, match="LPIPS"):
        lp = lpips_model("alex")
    return codec, data, lp


def _cfg(**kw) -> TrainConfig:
    base = dict(preset="tiny", steps=6, batch=2, warmup_steps=2, checkpoint_every=2, keep_checkpoints=3, val_every=100, log_every=1,
                val_count=2, loss=LossConfig(lpips_net="alex", gan_start=1, gan_warmup=2, disc_channels=8, disc_layers=2))
    base.update(kw)
    return TrainConfig(**base)


def _run(setup, out, cfg, **kw):
    codec, data, lp = setup
    return train_decoder(cfg, out, data, data, codec=codec, loss_fn=DecoderLoss(cfg.loss, lpips=lp), **kw)


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """An uninterrupted 6-step run, and the same run stopped at step 4 (checkpoints at 2 and 4)."""
    root = tmp_path_factory.mktemp("resume")
    full = _run(setup, root / "full", _cfg())
    _run(setup, root / "cut", _cfg(), stop_at=4)
    return root, full


def _weights(run, step):
    return {name: load_file(str(run / "checkpoints" / f"step_{step:06d}" / f"{name}.safetensors"))
            for name in ("decoder", "ema", "discriminator")}


# --- item 4: a damaged latest checkpoint falls back to the previous intact one ------------------------------------


@pytest.mark.parametrize("damaged", ["decoder.safetensors", "ema.safetensors", "discriminator.safetensors",
                                     "optim.pt", "state.json", "rng_0.pt"])
def test_truncated_latest_checkpoint_falls_back_and_continues_exactly(setup, runs, tmp_path, damaged, capsys):
    root, full = runs
    run = tmp_path / "run"
    shutil.copytree(root / "cut", run)
    path = run / "checkpoints" / "step_000004" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a truncated file, as a full disk leaves it

    res = _run(setup, run, _cfg(), resume=True)
    said = capsys.readouterr().out
    assert damaged in said and "step_000002" in said  # one line naming the file, then the fallback
    assert (run / "checkpoints" / "unreadable_step_000004").is_dir()  # kept aside, never pruned over an intact one
    assert res.step == 6
    # From step 2, bit-exactly the uninterrupted run: every later loss and the final weights.
    assert [(h["step"], h["total"]) for h in res.history] == [(h["step"], h["total"]) for h in full.history[2:]]
    for name, sd in _weights(run, 6).items():
        ref = _weights(root / "full", 6)[name]
        assert all(torch.equal(sd[k], ref[k]) for k in ref), name
    # The log holds each step once: 0-1 from the first part, 2-5 from the resumed one.
    assert [h["step"] for h in read_history(run)] == list(range(6))


def test_no_intact_checkpoint_is_one_clear_error(setup, runs, tmp_path):
    root, _ = runs
    run = tmp_path / "run"
    shutil.copytree(root / "cut", run)
    # An empty file, and bytes that are no checkpoint at all (torch.load raises UnpicklingError there).
    for step, junk in ((2, b"not a checkpoint"), (4, b"")):
        (run / "checkpoints" / f"step_{step:06d}" / "optim.pt").write_bytes(junk)
    with pytest.raises(ValueError, match="no checkpoint reads back whole.*optim.pt"):
        _run(setup, run, _cfg(), resume=True)


def test_export_and_evaluate_load_the_previous_checkpoint_when_the_latest_is_damaged(runs, tmp_path):
    root, _ = runs
    run = tmp_path / "run"
    shutil.copytree(root / "cut", run)
    (run / "checkpoints" / "step_000004" / "ema.safetensors").write_bytes(b"\x00" * 10)
    codec, _ = load_run_codec(run)
    ema2 = load_file(str(run / "checkpoints" / "step_000002" / "ema.safetensors"))
    own = dict(codec.named_parameters())
    assert all(torch.equal(own[k], v) for k, v in ema2.items())


# --- item 3: config.json is written only once the resume is accepted, and records what the run uses ------------


def test_resume_with_other_settings_is_refused_and_the_run_stays_usable(setup, runs, tmp_path):
    root, _ = runs
    run = tmp_path / "run"
    shutil.copytree(root / "cut", run)
    before = (run / "config.json").read_bytes()
    with pytest.raises(ValueError, match=r"lr: 0\.0001 -> 0\.001"):
        _run(setup, run, _cfg(lr=1e-3), resume=True)
    with pytest.raises(ValueError, match="preset: 'tiny' -> 'taef2'"):
        _run(setup, run, _cfg(preset="taef2"), resume=True)
    assert (run / "config.json").read_bytes() == before
    load_run_codec(run)  # export / evaluate still read the run

    # What may change (how long, how often it is saved or shown) is accepted and recorded.
    res = _run(setup, run, _cfg(steps=6, val_every=50, log_every=3), resume=True)
    assert res.step == 6
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["val_every"] == 50 and recorded["log_every"] == 3


def test_a_refused_setting_writes_nothing(tmp_path, tiny_pairset):
    out = tmp_path / "run"
    for flag, value in (("--lr", "-1"), ("--ema-decay", "-1"), ("--ema-decay", "2"), ("--betas", "0.5,1.5")):
        assert main(["train-decoder", str(tiny_pairset["pairs"]), str(out), "--preset", "tiny", "--steps", "1", flag, value]) == 2
        assert not out.exists()


def test_a_cli_run_with_gan_accumulation_and_a_resume_mid_run_equals_the_uninterrupted_run(tmp_path, tiny_pairset):
    """`python -m ldlib train-decoder` as a user runs it, GAN on from step 2, two micro-steps per step, records read
    every 2 steps, stopped at 3 steps (its last checkpoint there, off the every-2 cadence) and resumed to 5: the
    same history.jsonl, line for line, and the same exported weights, bit for bit, as one uninterrupted run."""
    pairs = str(tiny_pairset["pairs"])
    common = ["--preset", "tiny", "--batch", "2", "--grad-accum", "2", "--gan-start", "2", "--gan-warmup", "2",
              "--lpips-net", "alex", "--disc-channels", "8", "--disc-layers", "2", "--warmup-steps", "2",
              "--checkpoint-every", "2", "--log-every", "2", "--val-every", "2", "--val-count", "2", "--seed", "3",
              "--mixed-precision", "no", "--head-fit-pairs", "4"]
    with warnings.catch_warnings():  # LPIPS' backbone: random offline (seeded: the same in every run)
        warnings.filterwarnings("ignore", message="LPIPS", category=UserWarning)
        assert main(["train-decoder", pairs, str(tmp_path / "full"), *common, "--steps", "5"]) == 0
        assert main(["train-decoder", pairs, str(tmp_path / "cut"), *common, "--steps", "3"]) == 0
        assert main(["train-decoder", pairs, str(tmp_path / "cut"), *common, "--steps", "5", "--resume"]) == 0
    lines = {run: (tmp_path / run / "history.jsonl").read_text().splitlines() for run in ("full", "cut")}
    assert [json.loads(line)["step"] for line in lines["full"]] == list(range(5))
    assert "g_loss" not in lines["full"][1] and "g_loss" in lines["full"][2]  # the GAN on from step 2
    assert lines["cut"] == lines["full"]
    exported = {}
    for run in ("full", "cut"):
        assert main(["export", str(tmp_path / run), str(tmp_path / f"{run}-export"), "--format", "diffusers"]) == 0
        exported[run] = load_file(str(tmp_path / f"{run}-export" / "diffusion_pytorch_model.safetensors"))
    assert exported["full"].keys() == exported["cut"].keys()
    assert all(torch.equal(exported["full"][k], exported["cut"][k]) for k in exported["full"])
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("full", "cut")]
    assert summaries[0]["validation"] == summaries[1]["validation"]


# --- item 8: EMA decay --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [-1.0, 1.0, 2.0])
def test_ema_decay_outside_0_1_is_refused(decay):
    with pytest.raises(ValueError, match="ema_decay"):
        _cfg(ema_decay=decay)


# --- item 7: logs never mix two attempts ----------------------------------------------------------------------------


def test_history_and_tensorboard_keep_each_step_once(setup, runs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, full = runs
    run = tmp_path / "run"
    shutil.copytree(root / "cut", run)
    # The first part logged steps 0-3; pretend it was killed at step 5 after its checkpoint at 4 ...
    _run(setup, run, _cfg(), resume=True, stop_at=5)
    assert [h["step"] for h in read_history(run)] == list(range(5))
    # ... before its next checkpoint (stop_at saved one at 5; a kill would not have): resumed from step 4, the log
    # holds steps 4 and 5 once each.
    shutil.rmtree(run / "checkpoints" / "step_000005")
    _run(setup, run, _cfg(), resume=True)
    assert [h["step"] for h in read_history(run)] == list(range(6))
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/total")]
    assert steps == list(range(6))


def test_a_resumed_run_logs_the_validation_at_its_resume_step_again(setup, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Resumed at step 2, a multiple of val_every: the interrupted part's validation there is hidden by the resumed
    # writer (purge_step), so the resumed run logs it again, with the numbers the uninterrupted run logged.
    cfg = _cfg(steps=4, val_every=2, checkpoint_every=2)
    _run(setup, tmp_path / "full", cfg)
    _run(setup, tmp_path / "cut", cfg, stop_at=2)
    _run(setup, tmp_path / "cut", cfg, resume=True)

    def events(run):
        acc = EventAccumulator(str(run / "tb"))
        acc.Reload()
        tag = next(t for t in acc.Tags()["images"] if t.startswith("val/"))
        return ({k: [(e.step, e.value) for e in acc.Scalars(f"val/{k}")] for k in ("psnr_ours", "psnr_bicubic")},
                [e.step for e in acc.Images(tag)])

    full, cut = events(tmp_path / "full"), events(tmp_path / "cut")
    assert full[1] == [2, 4] and full == cut
    # Still an exact resume: validating again changed nothing the run computes.
    for name, sd in _weights(tmp_path / "cut", 4).items():
        ref = _weights(tmp_path / "full", 4)[name]
        assert all(torch.equal(sd[k], ref[k]) for k in ref), name


def test_a_run_killed_before_its_first_checkpoint_starts_a_fresh_history(setup, tmp_path):
    run = tmp_path / "run"
    _run(setup, run, _cfg(checkpoint_every=100), stop_at=3)
    # stop_at saves a checkpoint at the stop; a kill does not: remove it to leave what a kill leaves.
    shutil.rmtree(run / "checkpoints")
    assert len(read_history(run)) == 3
    _run(setup, run, _cfg(steps=2, checkpoint_every=100))
    assert [h["step"] for h in read_history(run)] == [0, 1]


def test_init_from_continues_another_runs_checkpoint(setup, runs, tmp_path):
    # A new run started from the uninterrupted run's step-2 checkpoint, same settings: the same steps 2-5, bit for bit.
    root, full = runs
    fork = _run(setup, tmp_path / "fork", _cfg(init_from=str(root / "full" / "checkpoints" / "step_000002")))
    assert fork.step == 6 and [h["step"] for h in fork.history] == [2, 3, 4, 5]
    assert [h["total"] for h in fork.history] == [h["total"] for h in full.history[2:]]
    for name, sd in _weights(tmp_path / "fork", 6).items():
        ref = _weights(root / "full", 6)[name]
        assert all(torch.equal(sd[k], ref[k]) for k in ref), name
    with pytest.raises(FileNotFoundError, match="checkpoint folder"):
        _run(setup, tmp_path / "bad", _cfg(init_from=str(root / "full")))


def test_init_from_trains_with_its_own_optimiser_and_ema_settings(setup, runs, tmp_path, monkeypatch):
    # The checkpoint's optimiser, schedule and EMA states carry the old run's lr, betas, weight decay and EMA decay;
    # the new run must train with the ones its config.json records.
    root, _ = runs
    used = []
    adamw_step = torch.optim.AdamW.step

    def recording_step(self, *a, **kw):
        group = self.param_groups[0]
        used.append((group["lr"], tuple(group["betas"]), group["weight_decay"]))
        return adamw_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    new = dict(lr=1e-3, disc_lr=3e-4, betas=(0.8, 0.95), weight_decay=0.01, ema_decay=0.2)
    cfg = _cfg(lr_schedule="cosine", checkpoint_every=1, keep_checkpoints=5, **new,
               init_from=str(root / "full" / "checkpoints" / "step_000002"))
    fork = _run(setup, tmp_path / "fork", cfg)
    assert [h["step"] for h in fork.history] == [2, 3, 4, 5]

    # diffusers' cosine schedule with 2 warm-up steps of 6, in closed form, at the step the optimiser takes.
    def cosine(base, k):
        return base * 0.5 * (1 + math.cos(math.pi * (k - 2) / (6 - 2)))

    # Each step runs the decoder's AdamW, then the discriminator's (the GAN is on from step 1).
    assert len(used) == 8
    for k, (g, d) in zip(range(2, 6), zip(used[0::2], used[1::2])):
        assert g == (pytest.approx(cosine(1e-3, k), rel=1e-12), (0.8, 0.95), 0.01), k
        assert d == (pytest.approx(cosine(3e-4, k), rel=1e-12), (0.8, 0.95), 0.01), k
    saved = torch.load(tmp_path / "fork" / "checkpoints" / "step_000006" / "optim.pt", weights_only=True)
    assert [g["initial_lr"] for g in saved["opt_g"]["param_groups"]] == [1e-3]
    assert [g["initial_lr"] for g in saved["opt_d"]["param_groups"]] == [3e-4]
    state = json.loads((tmp_path / "fork" / "checkpoints" / "step_000006" / "state.json").read_text())
    assert state["ema"]["decay"] == 0.2
    # The EMA used decay 0.2 (diffusers' warm-up value (1 + k) / (10 + k) is above it from step 2 on, and was what
    # the old 0.999 gave): ema_6 = 0.2 ema_5 + 0.8 live_6, to float32 rounding. A decay off by 0.05 or more would
    # be off by 5 % of |ema_5 - live_6|.
    before, after = _weights(tmp_path / "fork", 5), _weights(tmp_path / "fork", 6)
    spreads = []
    for name, ema in after["ema"].items():
        live, prev = after["decoder"][name].double(), before["ema"][name].double()
        spread = (prev - live).abs().max().item()
        rounding = 4 * torch.finfo(torch.float32).eps * ema.abs().max().item()
        assert (ema.double() - (0.2 * prev + 0.8 * live)).abs().max().item() <= 0.01 * spread + rounding, name
        spreads.append(spread / max(rounding, 1e-30))
    assert max(spreads) > 1e3, "the EMA and the live weights differ enough to tell the decays apart"


def test_plot_history_draws_each_logged_key_and_says_when_a_panel_has_none(tmp_path):
    import warnings

    from ldlib.core.runs import plot_history

    run = tmp_path / "run"
    run.mkdir()
    (run / "history.jsonl").write_text("".join(json.dumps({"step": s, "l1": 1.0 / s, "lpips": 0.5}) + "\n"
                                               for s in range(1, 6)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns on a legend with nothing to label
        fig = plot_history(run, {"losses": ("l1", "lpips"), "GAN": ("g_loss", "d_loss")})
    losses, gan = fig.axes
    assert [line.get_label() for line in losses.lines] == ["l1", "lpips"]
    assert list(losses.lines[0].get_ydata()) == [1.0 / s for s in range(1, 6)]
    assert not gan.lines and gan.get_legend() is None and gan.texts[0].get_text() == "not logged in this run"
    # smooth=k: the raw values faint, then the trailing mean over k records (numpy's convolution, by hand at the start).
    smoothed = plot_history(run, {"losses": ("l1",)}, smooth=3).axes[0].lines
    raw = np.array([1.0 / s for s in range(1, 6)])
    expected = np.concatenate([[raw[0], raw[:2].mean()], np.convolve(raw, np.ones(3) / 3, mode="valid")])
    assert list(smoothed[0].get_ydata()) == list(raw)
    np.testing.assert_allclose(smoothed[1].get_ydata(), expected, rtol=1e-12)
    assert smoothed[1].get_label() == "l1 (mean of 3)"


def test_optimizer_state_keeps_the_kernel_choice_of_the_device_it_resumes_on():
    # A checkpoint's param_groups carry fused / foreach; resuming on another device must not inherit them (a CPU
    # state in a CUDA run would lose the fused kernel, a CUDA state on CPU would gain it). Same update either way.
    from ldlib.core.runs import load_optimizer_state

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, generator=g)
    grads = [torch.randn(64, generator=g) for _ in range(3)]

    def run(fused: bool, state=None, start=w0, steps=grads):
        p = torch.nn.Parameter(start.clone())
        opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.5, 0.9), fused=fused or None)
        if state is not None:
            load_optimizer_state(opt, state)
        for gr in steps:
            p.grad = gr.clone()
            opt.step()
        return p.detach(), opt

    for saved_fused, resumed_fused in ((False, True), (True, False)):
        w1, opt = run(saved_fused, steps=grads[:2])
        w_resumed, opt2 = run(resumed_fused, opt.state_dict(), start=w1, steps=grads[2:])
        assert bool(opt2.param_groups[0]["fused"]) is resumed_fused
        w_ref, _ = run(saved_fused)
        assert (w_resumed - w_ref).abs().max() <= 8 * torch.finfo(torch.float32).eps * w_ref.abs().max()


def test_ema_update_is_diffusers_ema_in_one_lerp_and_shares_its_checkpoints(monkeypatch):
    # build_ema's step (torch's foreach-lerp EMA update) against the closed form in float64 numpy with diffusers'
    # decay schedule (warm-up, then the cap), against diffusers' own EMAModel.step; its state dict loads into a plain
    # EMAModel and back, and a resumed average steps on as the uninterrupted one.
    import numpy as np
    from conftest import rel_diff
    from diffusers.training_utils import EMAModel

    from ldlib.core.runs import build_ema

    lerps = []
    real_lerp = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a, **k: lerps.append(len(a[0])) or real_lerp(*a, **k))
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((8, 3, 3, 3), (8,), (5, 7))]
    ours, theirs = build_ema(params, 0.5), EMAModel(params, decay=0.5, foreach=True)
    expected = [p.detach().double().numpy().copy() for p in params]

    def move(ps):
        with torch.no_grad():
            for p in ps:
                p.add_(torch.randn(p.shape, generator=g))

    for step in range(1, 13):
        move(params)
        ours.step(params)
        theirs.step(params)
        d = min(0.5, step / (9 + step)) if step > 1 else 0.0  # EMAModel.get_decay: (1 + n) / (10 + n), n = step - 1
        expected = [d * e + (1 - d) * p.detach().double().numpy() for e, p in zip(expected, params)]
        assert ours.optimization_step == step and ours.cur_decay_value == pytest.approx(d, abs=1e-15)
        for mine, other, exp in zip(ours.shadow_params, theirs.shadow_params, expected):
            assert rel_diff(mine, torch.from_numpy(exp)) <= 4 * np.finfo(np.float32).eps
            assert rel_diff(mine, other) <= 4 * np.finfo(np.float32).eps
    assert ours.cur_decay_value == 0.5 and lerps == [3] * 12  # the cap reached; one lerp over all tensors per step
    assert any(not torch.equal(a, p) for a, p in zip(ours.shadow_params, params))
    # Checkpoints: a run saved with either EMA resumes with the other, and steps on as if uninterrupted.
    plain = EMAModel([torch.nn.Parameter(torch.zeros_like(p)) for p in params], decay=0.5, foreach=True)
    plain.load_state_dict(ours.state_dict())
    again = build_ema([torch.nn.Parameter(torch.zeros_like(p)) for p in params], 0.5)
    again.load_state_dict(theirs.state_dict())
    assert plain.optimization_step == again.optimization_step == 12
    assert all(torch.equal(a, b) for a, b in zip(plain.shadow_params, ours.shadow_params))
    assert all(torch.equal(a, b) for a, b in zip(again.shadow_params, theirs.shadow_params))
    move(params)
    again.step(params)
    ours.step(params)
    assert again.optimization_step == 13
    assert all(rel_diff(a, b) <= 4 * np.finfo(np.float32).eps for a, b in zip(again.shadow_params, ours.shadow_params))
    # diffusers' own path, not the lerp: a frozen tensor is copied, not averaged (the trainable one beside it is
    # averaged), and an average kept in another dtype than its weights is promoted, not refused.
    lerps.clear()
    mixed = [torch.nn.Parameter(torch.ones(3), requires_grad=False), torch.nn.Parameter(torch.zeros(2))]
    ema = build_ema(mixed, 0.9)
    with torch.no_grad():
        mixed[0].fill_(5.0)
        mixed[1].fill_(1.0)
    ema.step(mixed)  # decay 0 at step 1: the average is the weights
    with torch.no_grad():
        mixed[1].fill_(2.0)
    ema.step(mixed)  # decay 2/11 at step 2
    assert torch.equal(ema.shadow_params[0], mixed[0].detach())
    assert ema.shadow_params[1].tolist() == pytest.approx([2 / 11 * 1 + 9 / 11 * 2] * 2, rel=1e-6)
    wide = build_ema(params, 0.5)
    wide.to(dtype=torch.float64)
    reference = EMAModel(params, decay=0.5, foreach=True)
    reference.to(dtype=torch.float64)
    wide.step(params)
    reference.step(params)
    assert lerps == [] and all(torch.equal(a, b) for a, b in zip(wide.shadow_params, reference.shadow_params))
