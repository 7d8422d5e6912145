"""The proxy degrader: teacher data (regenerable noise, resumable, shardable), ProxyNet, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from ldlib.degrade import DiffusionDegrader, ProxyDegrader, ProxyNet, load_proxy, save_proxy
from ldlib.latents import LatentCache
from ldlib.presets import tiny_wan_transformer
from ldlib.teacher import TeacherDataset, TeacherSet, TeacherSpec, generate_teacher, record_seed


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
