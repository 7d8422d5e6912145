"""Degraders: the noise formula, the diffusion teacher's Euler loop against a closed form, the prompt cache."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ldlib.build import parse_degrader, prompt_embedding, text_encoder_of, transformer_of
from ldlib.degrade import DiffusionDegrader, NoiseDegrader, ProxyDegrader, add_noise, sigma_grid
from ldlib.models.prompts import WAN_NEGATIVE_PROMPT, PromptCache, encode_prompt
from ldlib.models.tiny import ByteTokenizer, tiny_umt5_encoder, tiny_wan_transformer
from ldlib.presets import get_preset


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def transformer():
    return tiny_wan_transformer(0)


@pytest.fixture(scope="module")
def emb():
    # A seeded random 1 x L x 32 embedding: the Euler-loop tests need only the right shape, not a real prompt.
    return torch.randn(1, 12, 32, generator=gen(7))


@pytest.fixture(scope="module")
def latents():
    return torch.randn(3, 16, 8, 8, generator=gen(1))


def velocity(transformer, x, sigma, emb):
    """The teacher's velocity computed directly with the diffusers model (the independent reference)."""
    with torch.no_grad():
        out = transformer(
            hidden_states=x.unsqueeze(2),
            timestep=sigma * 1000,
            encoder_hidden_states=emb.expand(x.shape[0], -1, -1),
            return_dict=False,
        )[0]
    return out.squeeze(2)


# --- noise ------------------------------------------------------------------------------------------------------


def test_noise_degrader_matches_formula(latents):
    s = torch.tensor([0.0, 0.12, 0.7])
    eps = torch.randn(latents.shape, generator=gen(3))
    expected = (1 - s.view(-1, 1, 1, 1)) * latents + s.view(-1, 1, 1, 1) * eps
    got = NoiseDegrader().degrade(latents, s, gen(3))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # A float sigma applies to every sample.
    torch.testing.assert_close(NoiseDegrader().degrade(latents, 0.3, gen(3)), 0.7 * latents + 0.3 * eps, rtol=0, atol=1e-6)


def test_sigma_zero_is_identity_for_every_degrader(latents, transformer, emb):
    proxy = ProxyDegrader(lambda x, s: x * 0 + 5.0)
    for d in (NoiseDegrader(), DiffusionDegrader(transformer, emb, steps=3), proxy):
        assert torch.equal(d.degrade(latents, 0.0, gen()), latents), type(d).__name__


def test_bad_sigma_shape_is_rejected(latents):
    with pytest.raises(ValueError, match="sigma must be"):
        add_noise(latents, torch.zeros(2), gen())


# --- diffusion teacher ------------------------------------------------------------------------------------------


def test_diffusion_shapes_and_determinism(latents, transformer, emb):
    d = DiffusionDegrader(transformer, emb, steps=2)
    a = d.degrade(latents, 0.3, gen(5))
    b = d.degrade(latents, 0.3, gen(5))
    c = d.degrade(latents, 0.3, gen(6))
    assert a.shape == latents.shape and a.dtype == latents.dtype
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(d.last_grid, torch.tensor([[0.3, 0.15, 0.0]] * 3))


def test_diffusion_one_step_is_closed_form(latents, transformer, emb):
    s = 0.4
    x_s = add_noise(latents, s, gen(2))
    v = velocity(transformer, x_s, torch.full((3,), s), emb)
    expected = x_s - s * v  # x0_hat = x_s - s * v
    got = DiffusionDegrader(transformer, emb, steps=1).degrade(latents, s, gen(2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, x_s)  # the transformer did something


def test_diffusion_two_steps_is_euler(latents, transformer, emb):
    s = torch.tensor([0.5, 0.2, 0.1])
    x = add_noise(latents, s, gen(4))
    for k in range(2):
        sk, sn = s * (1 - k / 2), s * (1 - (k + 1) / 2)
        x = x + (sn - sk).view(-1, 1, 1, 1) * velocity(transformer, x, sk, emb)
    got = DiffusionDegrader(transformer, emb, steps=2).degrade(latents, s, gen(4))
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def test_diffusion_per_sample_sigma_equals_running_alone(latents, transformer, emb):
    s = torch.tensor([0.05, 0.0, 0.6])
    d = DiffusionDegrader(transformer, emb, steps=3)
    batched = d.degrade(latents, s, gen(9))
    assert torch.equal(batched[1], latents[1])  # the sigma-0 sample is bit-identical
    # The same noise per sample (drawn for the batch), then each sample denoised on its own.
    x_s = add_noise(latents, s, gen(9))
    for i in range(3):
        alone = d.denoise(x_s[i : i + 1], float(s[i]))
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    # Chunked batches give the same result.
    chunked = DiffusionDegrader(transformer, emb, steps=3, batch_size=2).degrade(latents, s, gen(9))
    torch.testing.assert_close(chunked, batched, rtol=1e-5, atol=1e-5)


def test_sigma_grid_per_sample():
    g = sigma_grid(torch.tensor([0.12, 0.0]), 4)
    torch.testing.assert_close(g, torch.tensor([[0.12, 0.09, 0.06, 0.03, 0.0], [0.0] * 5]))


def test_guidance_combines_velocities(latents, transformer, emb):
    neg = torch.randn(1, 12, 32, generator=gen(8))
    s = 0.3
    x_s = add_noise(latents, s, gen(1))
    sv = torch.full((3,), s)
    vc, vu = velocity(transformer, x_s, sv, emb), velocity(transformer, x_s, sv, neg)
    expected = x_s - s * (vu + 4.0 * (vc - vu))
    got = DiffusionDegrader(transformer, emb, guidance_scale=4.0, negative_embeds=neg).degrade(latents, s, gen(1))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_diffusion_rejects_wrong_embedding_width(transformer):
    with pytest.raises(ValueError, match="text_dim"):
        DiffusionDegrader(transformer, torch.zeros(1, 4, 8))


# --- prompt embedding -------------------------------------------------------------------------------------------


def test_encode_prompt_matches_diffusers_pipeline():
    from diffusers import WanPipeline

    tok, enc = ByteTokenizer(), tiny_umt5_encoder(0)
    ours = encode_prompt(WAN_NEGATIVE_PROMPT, tok, enc, max_sequence_length=600)
    with torch.no_grad():
        ref = WanPipeline._get_t5_prompt_embeds(
            SimpleNamespace(tokenizer=tok, text_encoder=enc), WAN_NEGATIVE_PROMPT,
            max_sequence_length=600, device=torch.device("cpu"), dtype=torch.float32,
        )
    torch.testing.assert_close(ours, ref)
    n_tokens = len(WAN_NEGATIVE_PROMPT.encode()) + 1  # bytes + eos
    assert ours[0, :n_tokens].abs().sum(-1).gt(0).all() and ours[0, n_tokens:].eq(0).all()


def test_prompt_cache_reuses_file(tmp_path):
    calls = []

    def encode(p):
        calls.append(p)
        return torch.full((1, 4, 8), float(len(p)))

    a = PromptCache(tmp_path).get("m", "hello", encode)
    b = PromptCache(tmp_path).get("m", "hello", encode)  # a fresh cache object: only the file is shared
    assert calls == ["hello"] and torch.equal(a, b) and a[0, 0, 0] == 5
    PromptCache(tmp_path).get("other-model", "hello", encode)
    PromptCache(tmp_path).get("m", "", encode)
    assert calls == ["hello", "hello", ""]
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_prompt_embedding_loads_text_encoder_once(tmp_path, monkeypatch):
    import ldlib.build

    preset = get_preset("tiny")
    loads = []

    def counting(p, device=None, dtype=torch.float32):
        loads.append(1)
        return text_encoder_of(p, device, dtype)

    monkeypatch.setattr(ldlib.build, "text_encoder_of", counting)
    e1 = prompt_embedding(preset, "negative", cache_dir=tmp_path, max_sequence_length=512)
    e2 = prompt_embedding(preset, "negative", cache_dir=tmp_path, max_sequence_length=512)
    assert len(loads) == 1 and torch.equal(e1, e2) and e1.shape == (1, 512, 32)
    tok, enc = text_encoder_of(preset)
    torch.testing.assert_close(e1, encode_prompt(WAN_NEGATIVE_PROMPT, tok, enc))


def test_prompt_cache_rejects_corrupt_file(tmp_path):
    cache = PromptCache(tmp_path)
    cache.path("m", "x").parent.mkdir(parents=True, exist_ok=True)
    cache.path("m", "x").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="unreadable"):
        cache.get("m", "x", lambda p: torch.zeros(1, 2, 3))


# --- proxy, factory ---------------------------------------------------------------------------------------------


def test_proxy_degrader_calls_net_on_noised_latents(latents):
    seen = {}

    def net(x, s):
        seen["x"], seen["s"] = x, s
        return x * 2

    s = torch.tensor([0.1, 0.0, 0.2])
    out = ProxyDegrader(net).degrade(latents, s, gen(3))
    x_s = add_noise(latents, s, gen(3))
    # The net sees only the samples with sigma > 0 (sample 1 costs no call and comes back bit-identical).
    torch.testing.assert_close(seen["x"], x_s[[0, 2]])
    torch.testing.assert_close(seen["s"], s[[0, 2]])
    torch.testing.assert_close(out[[0, 2]], 2 * x_s[[0, 2]])
    assert torch.equal(out[1], latents[1])


def test_degrade_samples_equals_each_sample_alone(latents):
    # One generator per sample: sample i's result does not depend on the batch it is in.
    class Double(NoiseDegrader):
        def denoise(self, x, s):
            return 2 * x - s.view(-1, 1, 1, 1)

    s = torch.tensor([0.1, 0.0, 0.2])
    batched, used = Double().degrade_samples(latents, s, [gen(10 + i) for i in range(3)])
    assert torch.equal(used, s)
    for i in range(3):
        alone = Double().degrade(latents[i : i + 1], s[i : i + 1], gen(10 + i))
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=0)
    assert torch.equal(batched[1], latents[1])
    with pytest.raises(ValueError, match="one generator per sample"):
        Double().degrade_samples(latents, s, [gen(0)])


def _random_proxy():
    from ldlib.models.proxy import ProxyNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        net = ProxyNet(channels=16, width=16, blocks=2).eval()
        torch.nn.init.normal_(net.conv_out.weight, std=0.05)  # not the zero-initialised "return x_sigma"
    return net


@pytest.mark.parametrize("kind", ["proxy", "diffusion"])
def test_batched_degradation_equals_per_sample_calls(latents, transformer, emb, kind):
    # Training's path: per-sample sigma and noise generators, ONE model call on the batch. The reference: each
    # sample alone (batch 1) with its own generator, computed from the model directly.
    from conftest import rel_diff

    s = torch.tensor([0.11, 0.0, 0.04])
    if kind == "proxy":
        net = _random_proxy()
        deg = ProxyDegrader(net)

        def alone(x, sig):
            with torch.no_grad():
                return net(x, sig)
    else:
        deg = DiffusionDegrader(transformer, emb, steps=2)

        def alone(x, sig):
            for k in range(2):
                sk, sn = sig * (1 - k / 2), sig * (1 - (k + 1) / 2)
                x = x + (sn - sk).view(-1, 1, 1, 1) * velocity(transformer, x, sk, emb)
            return x

    calls = []
    model = deg.net if kind == "proxy" else deg.transformer
    hook = model.register_forward_hook(lambda mod, args, kw_out=None: calls.append(1))
    try:
        batched, used = deg.degrade_samples(latents, s, [gen(20 + i) for i in range(3)])
    finally:
        hook.remove()
    assert len(calls) == (1 if kind == "proxy" else 2), "one model call per (Euler) step for the whole batch"
    assert torch.equal(used, s) and torch.equal(batched[1], latents[1])
    for i in (0, 2):
        x_s = (1 - s[i]) * latents[i : i + 1] + s[i] * torch.randn(latents[i : i + 1].shape, generator=gen(20 + i))
        ref = alone(x_s, s[i : i + 1])
        assert not torch.allclose(ref, x_s, atol=1e-3)  # the model changed the noised latent
        assert rel_diff(batched[i : i + 1], ref) <= 1e-5, i


def test_degrader_vocabulary_errors(tmp_path):
    assert parse_degrader("none") is None and parse_degrader(None) is None
    assert type(parse_degrader("noise")).__name__ == "NoiseDegrader"
    for bad in ("blur", "noise:3", "proxy"):
        with pytest.raises(ValueError, match="unknown degrader|needs its folder"):
            parse_degrader(bad)
    with pytest.raises(ValueError, match="needs a preset"):
        parse_degrader("diffusion")
    with pytest.raises(FileNotFoundError, match="teacher folder not found"):
        parse_degrader(f"teacher:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="no diffusion transformer"):
        transformer_of(get_preset("tiny", transformer=None))


def test_prompt_embedding_from_a_pipeline_folder(tmp_path):
    """The real loading path (AutoTokenizer + UMT5EncoderModel.from_pretrained from <repo>/tokenizer and
    <repo>/text_encoder), exercised on a local folder holding a tiny encoder and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])  # T5 appends eos
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        tmp_path / "repo" / "tokenizer"
    )
    tiny_umt5_encoder(0).save_pretrained(tmp_path / "repo" / "text_encoder")
    preset = get_preset("tiny", transformer=str(tmp_path / "repo"))
    assert preset.text_encoder_id == str(tmp_path / "repo")
    emb = prompt_embedding(preset, "hello world", cache_dir=tmp_path / "cache", max_sequence_length=16)
    ids = torch.tensor([[3, 4, 1] + [0] * 13])
    with torch.no_grad():
        ref = tiny_umt5_encoder(0)(ids, (torch.arange(16) < 3).long()[None]).last_hidden_state
    assert emb.shape == (1, 16, 32)
    torch.testing.assert_close(emb[0, :3], ref[0, :3])
    assert emb[0, 3:].eq(0).all()
