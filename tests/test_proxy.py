"""The proxy degrader: teacher data (regenerable noise, resumable, shardable), ProxyNet, save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ldlib.data.latents import LatentCache
from ldlib.data.teacher_data import TeacherDataset, TeacherSet, TeacherSpec, generate_teacher, record_seed
from ldlib.degrade import DiffusionDegrader, ProxyDegrader
from ldlib.models.proxy import ProxyNet, load_proxy, save_proxy
from ldlib.models.tiny import tiny_wan_transformer
from ldlib.train.proxy import ProxyTrainConfig, evaluate_proxy, proxy_loss, train_proxy


@pytest.fixture(scope="module")
def teacher_degrader() -> DiffusionDegrader:
    emb = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(0))
    return DiffusionDegrader(tiny_wan_transformer(0), emb, steps=2)


def test_proxy_net_is_identity_at_sigma_zero():
    torch.manual_seed(0)
    net = ProxyNet(channels=16, width=16, blocks=2)
    for p in net.parameters():  # make sure identity does not rely on the zero-initialised output conv
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 16, 8, 8)
    sigma = torch.tensor([0.0, 0.1, 0.0])
    out = net(x, sigma)
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert not torch.allclose(out[1], x[1])
    deg = ProxyDegrader(net)
    z = torch.randn(2, 16, 8, 8)
    assert torch.equal(deg.degrade(z, 0.0, torch.Generator().manual_seed(1)), z)


def test_proxy_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    net = ProxyNet(channels=16, width=16, blocks=2)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    save_proxy(net, tmp_path, extra={"note": "test"})
    back = load_proxy(tmp_path)
    x, s = torch.randn(2, 16, 8, 8), torch.tensor([0.05, 0.2])
    with torch.no_grad():
        assert torch.equal(back(x, s), net(x, s))
    assert json.loads((tmp_path / "proxy.json").read_text())["note"] == "test"
    with pytest.raises(FileNotFoundError, match="no trained proxy"):
        load_proxy(tmp_path / "missing")


def test_teacher_targets_match_an_independent_run(tiny_pairset, teacher_degrader, tmp_path):
    spec = TeacherSpec(sigma_max=0.3, per_latent=2, steps=2, seed=7)
    out = tmp_path / "teacher"
    rep = generate_teacher(tiny_pairset["pairs"], tiny_pairset["latents"], teacher_degrader, out, spec,
                           batch_size=5, shard_size=7, progress=False, device="cpu")
    cache = LatentCache(tiny_pairset["latents"])
    assert rep["computed"] == 2 * len(cache) and rep["already_done"] == 0
    ts = TeacherSet(out)
    assert len(ts) == 2 * len(cache)
    sigmas = [r["sigma"] for r in ts.records]
    assert 0 <= min(sigmas) and max(sigmas) <= 0.3 and len(set(sigmas)) == len(sigmas)
    # Recompute one record from scratch: sigma, eps from its seed, then the flow-matching Euler loop by hand.
    r = ts.records[3]
    assert r["seed"] == record_seed(r["id"], r["m"], 7)
    g = torch.Generator().manual_seed(r["seed"])
    sigma = float(torch.rand((), generator=g)) * 0.3
    x0 = cache.get(r["id"]).unsqueeze(0)
    x = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=g)
    for s, s_next in ((sigma, sigma / 2), (sigma / 2, 0.0)):
        x = x + (s_next - s) * teacher_degrader.velocity(x, torch.tensor([s]))
    torch.testing.assert_close(ts.target(r["key"]), x[0], atol=1e-5, rtol=1e-5)
    assert r["sigma"] == pytest.approx(sigma)
    item = TeacherDataset(ts, cache)[3]
    torch.testing.assert_close(item["target"], x[0], atol=1e-5, rtol=1e-5)
    # Resume: nothing left to compute, nothing duplicated.
    again = generate_teacher(tiny_pairset["pairs"], tiny_pairset["latents"], teacher_degrader, out, spec, progress=False, device="cpu")
    assert again["computed"] == 0 and len(TeacherSet(out)) == len(ts)
    # A different spec into the same folder is refused.
    with pytest.raises(ValueError, match="another spec"):
        generate_teacher(tiny_pairset["pairs"], tiny_pairset["latents"], teacher_degrader, out, TeacherSpec(sigma_max=0.2), progress=False)


def test_teacher_shards_split_without_collisions(tiny_pairset, teacher_degrader, tmp_path):
    spec = TeacherSpec(sigma_max=0.2, per_latent=1, steps=2, seed=1)
    out = tmp_path / "t"
    a = generate_teacher(tiny_pairset["pairs"], tiny_pairset["latents"], teacher_degrader, out, spec, shard="0/2", progress=False, device="cpu")
    b = generate_teacher(tiny_pairset["pairs"], tiny_pairset["latents"], teacher_degrader, out, spec, shard="1/2", progress=False, device="cpu")
    ts = TeacherSet(out)
    assert a["computed"] + b["computed"] == len(ts) == len(LatentCache(tiny_pairset["latents"]))
    full = generate_teacher(tiny_pairset["pairs"], tiny_pairset["latents"], teacher_degrader, tmp_path / "full", spec, progress=False, device="cpu")
    ref = TeacherSet(tmp_path / "full")
    assert full["computed"] == len(ts)
    for r in ref.records[:4]:
        torch.testing.assert_close(ts.target(r["key"]), ref.target(r["key"]), atol=1e-5, rtol=1e-5)


# --- training -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_dir(tiny_pairset, teacher_degrader, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher16")
    generate_teacher(tiny_pairset["pairs"], tiny_pairset["latents"], teacher_degrader, out,
                     TeacherSpec(sigma_max=0.3, per_latent=16, steps=1, seed=3), progress=False, device="cpu")
    return out


def _small_cfg(**kw):

    base = dict(steps=120, batch=8, width=32, blocks=2, lr=2e-3, warmup_steps=10, val_fraction=0.34,
                checkpoint_every=1000, log_every=1000)
    base.update(kw)
    return ProxyTrainConfig(**base)


def test_train_proxy_beats_both_baselines_on_held_out_sources(teacher_dir, tmp_path):

    summary = train_proxy(_small_cfg(), teacher_dir, tmp_path / "run")
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    # Held out by source image: no source in both splits.
    ts = TeacherSet(teacher_dir)
    from ldlib.data.pairs import split_by_source

    train_ids, val_ids = split_by_source(ts.records, 0.34, 0)
    src = {r["id"]: r["source"] for r in ts.records}
    assert {src[i] for i in train_ids}.isdisjoint({src[i] for i in val_ids}) and val_ids
    assert summary["val_records"] == len(val_ids)
    # The proxy beats "return x_sigma" and "return x0" in every sigma bin, on data it never saw.
    assert result["bins"]
    for row in result["bins"]:
        assert row["proxy"] < row["x_sigma"] and row["proxy"] < row["x0"], row
    assert result["overall"]["proxy"] < 0.6 * result["overall"]["x_sigma"]
    assert (tmp_path / "run" / "eval.png").is_file()
    # The saved proxy plugs into the degrader interface and reproduces the evaluation's numbers.
    net = load_proxy(tmp_path / "run")
    val = TeacherDataset(ts, ids=sorted(set(val_ids)))

    assert evaluate_proxy(net, val, bins=6)["overall"] == pytest.approx(result["overall"], rel=1e-5)
    item = val[0]
    deg = ProxyDegrader(net)
    g = torch.Generator().manual_seed(0)
    z = item["x0"].unsqueeze(0)
    out = deg.degrade(z, 0.1, g)
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, net(0.9 * z + 0.1 * eps, torch.tensor([0.1])))


def test_train_proxy_resume_continues_the_same_run(teacher_dir, tmp_path):

    full = train_proxy(_small_cfg(steps=12, checkpoint_every=6), teacher_dir, tmp_path / "full")
    part = train_proxy(_small_cfg(steps=12, checkpoint_every=6), teacher_dir, tmp_path / "part", stop_at=6)
    assert part["steps_done"] == 6
    with pytest.raises(ValueError, match="holds a run already"):
        train_proxy(_small_cfg(steps=12, checkpoint_every=6), teacher_dir, tmp_path / "part")
    rest = train_proxy(_small_cfg(steps=12, checkpoint_every=6), teacher_dir, tmp_path / "part", resume=True)
    assert [h["loss"] for h in part["history"] + rest["history"]] == [h["loss"] for h in full["history"]]
    a, b = load_proxy(tmp_path / "full"), load_proxy(tmp_path / "part")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_a_skipped_step_leaves_the_summary_mean_finite_and_valid_json(teacher_dir, tmp_path, monkeypatch):
    import ldlib.train.proxy

    losses = []

    def nan_second_call(*a, **kw):
        losses.append(proxy_loss(*a, **kw))
        return losses[-1] * float("nan") if len(losses) == 2 else losses[-1]

    monkeypatch.setattr(ldlib.train.proxy, "proxy_loss", nan_second_call)
    summary = train_proxy(_small_cfg(steps=4), teacher_dir, tmp_path / "run")
    assert summary["skipped_steps"] == [1]
    assert [h["skipped"] for h in summary["history"]] == [False, True, False, False]
    written = json.loads((tmp_path / "run" / "summary.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    trained = [float(losses[i].detach()) for i in (0, 2, 3)]
    assert written["final_loss_mean_last_steps"] == pytest.approx(sum(trained) / 3)


@pytest.mark.parametrize("setting", [dict(eval_bins=0), dict(sigma_floor=0.0), dict(sigma_floor=-0.01),
                                     dict(val_fraction=1.5), dict(val_fraction=-0.1), dict(max_grad_norm=-1.0),
                                     dict(train_sigma_max=0.0)],
                         ids=lambda d: f"{next(iter(d))}={next(iter(d.values()))}")
def test_config_mistakes_are_refused_naming_the_value(setting):
    (name, value), = setting.items()
    with pytest.raises(ValueError, match=rf"ProxyTrainConfig\.{name} must .*got {value}"):
        ProxyTrainConfig(**setting)


def test_no_sigma_bin_with_data_does_not_beat_the_baselines(teacher_dir):
    # An evaluation without any bin is no evidence that the proxy beats anything (all() of nothing is True).
    net = ProxyNet(channels=16, width=8, blocks=1)
    records = TeacherDataset(TeacherSet(teacher_dir))
    assert evaluate_proxy(net, records, bins=6)["bins"]
    result = evaluate_proxy(net, records, bins=0)
    assert result["bins"] == [] and result["beats_baselines"] is False


def test_logged_lr_is_the_one_the_step_used(teacher_dir, tmp_path):
    summary = train_proxy(_small_cfg(steps=6, warmup_steps=2, lr=2e-3), teacher_dir, tmp_path / "run")
    # diffusers' cosine schedule with warm-up, in closed form, at the step the optimiser takes.
    expected = [2e-3 * (k / 2 if k < 2 else 0.5 * (1 + math.cos(math.pi * (k - 2) / 4))) for k in range(6)]
    assert [h["lr"] for h in summary["history"]] == pytest.approx(expected, rel=1e-12)


def test_resume_with_other_steps_is_refused_where_the_schedule_depends_on_them(teacher_dir, tmp_path):
    # Cosine: the lr at a step depends on the run's length, so a new `steps` would redraw the curve (the lr jumps).
    train_proxy(_small_cfg(steps=4, warmup_steps=0), teacher_dir, tmp_path / "cosine", stop_at=2)
    config = (tmp_path / "cosine" / "config.json").read_bytes()
    with pytest.raises(ValueError, match=r"steps 40 instead of the run's 4 .*'cosine'"):
        train_proxy(_small_cfg(steps=40, warmup_steps=0), teacher_dir, tmp_path / "cosine", resume=True)
    assert (tmp_path / "cosine" / "config.json").read_bytes() == config
    # constant_with_warmup: a longer run continues the same curve.
    cfg = dict(warmup_steps=2, lr_schedule="constant_with_warmup")
    train_proxy(_small_cfg(steps=4, **cfg), teacher_dir, tmp_path / "constant", stop_at=3)
    more = train_proxy(_small_cfg(steps=6, **cfg), teacher_dir, tmp_path / "constant", resume=True)
    assert [h["step"] for h in more["history"]] == [3, 4, 5] and {h["lr"] for h in more["history"]} == {2e-3}


def test_train_sigma_max_trains_on_the_low_sigma_records_and_scores_every_one(teacher_dir, tmp_path):
    from ldlib.train.proxy import split_teacher_data

    summary = train_proxy(_small_cfg(steps=4, train_sigma_max=0.15), teacher_dir, tmp_path / "run")
    train, val = split_teacher_data(TeacherSet(teacher_dir), 0.34, 0)
    assert summary["train_records"] == sum(r["sigma"] <= 0.15 for r in train.records) < len(train)
    assert summary["val_records"] == len(val)  # the held-out score covers the whole sigma range
    assert max(r["sigma_hi"] for r in json.loads((tmp_path / "run" / "eval.json").read_text())["bins"]) > 0.15
    with pytest.raises(ValueError, match="no training record has sigma <= 1e-09"):
        train_proxy(_small_cfg(steps=1, train_sigma_max=1e-9), teacher_dir, tmp_path / "none")
