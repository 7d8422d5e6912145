"""The trained teacher (ldlib.train.teacher): degrader == hand-written Euler loop, exact resume, eval recomputed,
save/load round trip, refusal of another latent space, preset integration and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import rel_diff
from safetensors.torch import load_file

from ldlib.build import (check_teacher_codec, codec_of, diffusion_degrader, has_trained_teacher, prompt_embedding,
                         transformer_of)
from ldlib.degrade import DiffusionDegrader, add_noise
from ldlib.models.teacher import load_teacher, read_teacher_info
from ldlib.presets import TAEF2_TEACHER_ENV, get_preset, taef2_teacher_dir
from ldlib.train.teacher import (TeacherConfig, eval_noise, evaluate_teacher, load_split_latents, train_teacher,
                                 training_sample)


def tiny_config(**overrides) -> TeacherConfig:
    """A teacher small enough to train in a second on the tiny preset's 16-channel latents."""
    base = dict(preset="tiny", layers=1, heads=2, head_dim=8, ffn_dim=16, freq_dim=16, text_dim=8, text_tokens=3,
                steps=6, batch=4, crop=4, lr=1e-3, warmup_steps=1, checkpoint_every=3, eval_every=3, eval_quick=2,
                eval_sigmas=(0.05, 0.3, 0.9), eval_draws=1, sample_count=2, sample_steps=3, sample_size=4)
    return TeacherConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def tiny_teacher(tiny_pairset, tmp_path_factory) -> dict:
    """A tiny teacher trained 6 steps on the tiny pair set: its run folder, summary and config."""
    out = tmp_path_factory.mktemp("teacher_run") / "run"
    cfg = tiny_config()
    summary = train_teacher(cfg, tiny_pairset["pairs"], out, codec=tiny_pairset["codec"])
    return {"out": out, "folder": out / "teacher", "summary": summary, "cfg": cfg}


def test_degrader_with_trained_teacher_equals_hand_written_euler_loop(tiny_teacher, tiny_pairset):
    transformer, emb, info = load_teacher(tiny_teacher["folder"])
    z = torch.stack([tiny_pairset["codec"].encode(torch.zeros(1, 3, 64, 64))[0], torch.randn(16, 8, 8)])
    sigma = torch.tensor([0.3, 0.12])
    steps = 3
    got = DiffusionDegrader(transformer, emb, steps=steps).degrade(z, sigma, torch.Generator().manual_seed(4))

    # Our own loop: the flow-matching noising, then Euler on s_i (1 - k / steps), calling the transformer directly.
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(4))
    x = (1 - sigma.view(-1, 1, 1, 1)) * z + sigma.view(-1, 1, 1, 1) * eps
    for k in range(steps):
        s_k, s_next = sigma * (1 - k / steps), sigma * (1 - (k + 1) / steps)
        with torch.no_grad():
            v = transformer(hidden_states=x.unsqueeze(2), timestep=s_k * 1000, encoder_hidden_states=emb.expand(2, -1, -1),
                            return_dict=False)[0].squeeze(2)
        x = x + (s_next - s_k).view(-1, 1, 1, 1) * v
    assert rel_diff(got, x) < 1e-5
    # The trained teacher does something: its output is not the noised input.
    assert rel_diff(got, add_noise(z, sigma, torch.Generator().manual_seed(4))) > 1e-3


def test_resumed_training_equals_an_uninterrupted_run(tiny_teacher, tiny_pairset, tmp_path):
    cfg = tiny_teacher["cfg"]
    out = tmp_path / "resumed"
    first = train_teacher(cfg, tiny_pairset["pairs"], out, codec=tiny_pairset["codec"], stop_at=3)
    assert first["steps_done"] == 3 and not (out / "teacher").exists()
    with pytest.raises(ValueError, match="holds a run already"):
        train_teacher(cfg, tiny_pairset["pairs"], out, codec=tiny_pairset["codec"])
    second = train_teacher(cfg, tiny_pairset["pairs"], out, codec=tiny_pairset["codec"], resume=True)
    ref = tiny_teacher["summary"]["history"]
    assert [h["step"] for h in first["history"] + second["history"]] == [h["step"] for h in ref]
    assert [h["loss"] for h in first["history"] + second["history"]] == [h["loss"] for h in ref]
    assert [json.loads(line)["loss"] for line in (out / "history.jsonl").read_text().splitlines()] == [h["loss"] for h in ref]
    for name in ("teacher.safetensors", "ema.safetensors"):
        a = load_file(str(tiny_teacher["out"] / "checkpoints" / "step_000006" / name))
        b = load_file(str(out / "checkpoints" / "step_000006" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = load_file(str(tiny_teacher["folder"] / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(out / "teacher" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # TensorBoard: the quick check at the resume step (3), hidden from the first part by the resumed writer, is
    # logged again, with the uninterrupted run's numbers.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def val_events(run):
        acc = EventAccumulator(str(run / "tb"))
        acc.Reload()
        return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if t.startswith("val/")}

    ref = val_events(tiny_teacher["out"])
    assert ref and all([e[0] for e in v] == [3, 6] for v in ref.values())
    assert val_events(out) == ref


def test_eval_json_equals_an_independent_recomputation(tiny_teacher, tiny_pairset):
    cfg = tiny_teacher["cfg"]
    result = json.loads((tiny_teacher["folder"] / "eval.json").read_text())
    _, val, _, val_sources = load_split_latents(tiny_pairset["pairs"], _cache(tiny_pairset), cfg.val_fraction, cfg.split_seed)
    assert result["held_out_sources"] == val_sources and result["latents"] == len(val) > 0
    transformer, emb, _ = load_teacher(tiny_teacher["folder"])
    for j, row in enumerate(result["rows"]):
        s = row["sigma"]
        num_t = num_x = 0.0
        for i, x0 in enumerate(val):
            eps = eval_noise(cfg.seed, j, i, 0, x0.shape)
            x_s = (1 - s) * x0 + s * eps
            with torch.no_grad():
                v = transformer(hidden_states=x_s[None, :, None], timestep=torch.tensor([s * 1000]),
                                encoder_hidden_states=emb, return_dict=False)[0][0, :, 0]
            x0_hat = x_s.double() - s * v.double()
            num_t += (x0_hat - x0.double()).abs().sum().item()
            num_x += (x_s.double() - x0.double()).abs().sum().item()
        n = val.numel()
        assert row["teacher_l1"] == pytest.approx(num_t / n, rel=1e-5)
        assert row["x_sigma_l1"] == pytest.approx(num_x / n, rel=1e-5)
        assert row["ratio"] == pytest.approx(num_t / num_x, rel=1e-5)
    # The quick in-training check is the same computation on a subset (EMA in memory vs fp16 on disk: close).
    quick = evaluate_teacher(transformer, emb, val[: cfg.eval_quick], [0.05], seed=cfg.seed)
    assert quick["rows"][0]["ratio"] == pytest.approx(tiny_teacher["summary"]["history"][-1]["val_ratio_0.05"], rel=1e-2)


def _cache(tiny_pairset):
    from ldlib.data.latents import LatentCache

    return LatentCache(tiny_pairset["latents"])


def test_load_teacher_round_trip(tiny_teacher, tiny_pairset):
    folder, cfg = tiny_teacher["folder"], tiny_teacher["cfg"]
    transformer, emb, info = load_teacher(folder)
    # Weights: the last checkpoint's EMA rounded to fp16 on disk, loaded back as float32.
    ema = load_file(str(tiny_teacher["out"] / "checkpoints" / "step_000006" / "ema.safetensors"))
    sd = transformer.state_dict()
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert all(torch.equal(sd[k], ema[k].half().float()) for k in ema)
    assert torch.equal(emb, torch.zeros(1, cfg.text_tokens, cfg.text_dim))
    assert info["codec"] == tiny_pairset["codec"].identity() and info["latent_channels"] == 16
    assert TeacherConfig.from_dict(info["config"]) == cfg and info["steps"] == cfg.steps
    assert info["held_out_sources"] == tiny_teacher["summary"]["held_out_sources"]
    assert transformer.config.in_channels == transformer.config.out_channels == 16
    for name in ("eval.png", "samples.png", "prompt_embeds.safetensors", "config.json"):
        assert (folder / name).is_file()
    with pytest.raises(FileNotFoundError, match="train-teacher"):
        load_teacher(folder.parent / "nothing")


def test_teacher_of_another_latent_space_is_refused(tiny_teacher, tiny_pairset):
    folder = tiny_teacher["folder"]
    info = read_teacher_info(folder)
    other = codec_of(get_preset("tiny", seed=1)).identity()  # same architecture, other encoder weights
    with pytest.raises(ValueError) as e:
        check_teacher_codec(info, other, folder)
    msg = str(e.value)
    assert str(folder) in msg and other["encoder_sha256"][:12] in msg and info["codec"]["encoder_sha256"][:12] in msg
    check_teacher_codec(info, tiny_pairset["codec"].identity(), folder)  # its own space is accepted
    # The preset path refuses it too, before any transformer call.
    with pytest.raises(ValueError, match="trained in the latent space"):
        diffusion_degrader(get_preset("tiny", seed=1, transformer=str(folder)))


def test_preset_uses_the_teacher_folder_and_its_fixed_prompt(tiny_teacher, tiny_pairset, tmp_path):
    folder = tiny_teacher["folder"]
    preset = get_preset("tiny", transformer=str(folder))
    assert has_trained_teacher(preset)
    deg = diffusion_degrader(preset, steps=2, prompt="a text that does not apply")
    transformer, emb, _ = load_teacher(folder)
    assert torch.equal(deg.prompt_embeds, emb)
    assert torch.equal(prompt_embedding(preset, "negative", cache_dir=tmp_path), emb)
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = DiffusionDegrader(transformer, emb, steps=2).degrade(z, 0.2, torch.Generator().manual_seed(1))
    assert torch.equal(deg.degrade(z, 0.2, torch.Generator().manual_seed(1)), ref)
    with pytest.raises(ValueError, match="guidance_scale 4.0.*one fixed prompt embedding"):
        diffusion_degrader(preset, guidance_scale=4.0)  # its "unconditional" embedding would be the same one


def test_taef2_teacher_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(TAEF2_TEACHER_ENV, raising=False)
    assert taef2_teacher_dir().parts[-3:] == ("ldlib", "assets", "teacher_taef2")
    monkeypatch.setenv(TAEF2_TEACHER_ENV, str(tmp_path / "env"))
    assert taef2_teacher_dir() == tmp_path / "env"
    assert taef2_teacher_dir(tmp_path / "arg") == tmp_path / "arg"  # an explicit argument wins
    preset = get_preset("taef2", taef2_teacher=tmp_path / "missing")
    assert preset.transformer == str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="missing.*train-teacher"):
        transformer_of(preset)


def test_taef2_preset_refuses_a_teacher_of_another_space(tiny_teacher, taef2_codec):
    preset = get_preset("taef2", taef2_teacher=tiny_teacher["folder"])
    with pytest.raises(ValueError, match=f"{tiny_teacher['folder']}.*trained in the latent space of wan 16ch.*tae 32ch"):
        diffusion_degrader(preset)


def test_cli_train_teacher(tiny_pairset, tmp_path, capsys):
    from ldlib.apps.cli import main

    out = tmp_path / "run"
    args = ["train-teacher", str(tiny_pairset["pairs"]), str(out), "--preset", "tiny", "--steps", "2", "--layers", "1",
            "--heads", "2", "--head-dim", "8", "--ffn-dim", "16", "--crop", "4", "--sample-size", "4", "--eval-draws", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "2/2 steps" in printed and "teacher folder" in printed and "0.05: " in printed
    assert json.loads((out / "teacher" / "teacher.json").read_text())["steps"] == 2
    assert main(args) == 2  # the run exists: one clear line naming the folder
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(out) in err and "holds a run already" in err and "\n" not in err


def test_a_skipped_step_leaves_the_summary_mean_finite_and_valid_json(tiny_pairset, tmp_path, monkeypatch):
    import ldlib.train.teacher

    cfg = tiny_config()
    calls = []

    def nan_at_step_1(latent, cfg, generator):
        x0, eps, sigma = training_sample(latent, cfg, generator)
        calls.append(1)
        return (x0 * float("nan") if cfg.batch < len(calls) <= 2 * cfg.batch else x0), eps, sigma

    monkeypatch.setattr(ldlib.train.teacher, "training_sample", nan_at_step_1)
    summary = train_teacher(cfg, tiny_pairset["pairs"], tmp_path / "run", codec=tiny_pairset["codec"], stop_at=3)
    assert summary["skipped_steps"] == [1] and [h["skipped"] for h in summary["history"]] == [False, True, False]
    written = json.loads((tmp_path / "run" / "summary.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    trained = [h["loss"] for h in summary["history"] if h["step"] != 1]
    assert written["final_loss_mean_last_steps"] == pytest.approx(sum(trained) / 2)


def test_logged_lr_is_the_one_the_step_used(tiny_teacher):
    cfg = tiny_teacher["cfg"]
    assert (cfg.lr_schedule, cfg.warmup_steps, cfg.steps) == ("cosine", 1, 6)
    # diffusers' cosine schedule with 1 warm-up step of 6, in closed form, at the step the optimiser takes.
    expected = [cfg.lr * (0.0 if k < 1 else 0.5 * (1 + math.cos(math.pi * (k - 1) / 5))) for k in range(6)]
    assert [h["lr"] for h in tiny_teacher["summary"]["history"]] == pytest.approx(expected, rel=1e-12)
