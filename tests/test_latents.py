"""Latent cache: latents equal the codec's own encode, resume, shards, and refusal to mix codecs, or LQ and HQ latents."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ldlib.apps.cli import main
from ldlib.build import codec_of
from ldlib.core.files import shard_files
from ldlib.core.images import load_image
from ldlib.data.datasets import PairDataset
from ldlib.data.latents import LatentCache, default_cache_dir, encode_pairs
from ldlib.data.pairs import PairSpec, build_pairs, read_manifest
from ldlib.presets import get_preset


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A small pair set: 4 sources x 2 crops, HQ 64 -> LQ 32 -> tiny-Wan latents 16 x 4 x 4."""
    root = tmp_path_factory.mktemp("latents")
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (140, 150, 3), dtype=np.uint8)).save(src / f"s{i}.png")
    build_pairs(src, root / "pairs", PairSpec(hq_size=64, crops_per_image=2), workers=1, progress=False)
    return root / "pairs"


@pytest.fixture(scope="module")
def codec():
    return codec_of(get_preset("tiny"))


def test_latents_are_the_codec_encode_keyed_by_id(pairs, codec, tmp_path):
    out = tmp_path / "lat"
    result = encode_pairs(pairs, codec, out, batch_size=3, shard_size=5, progress=False)
    assert result["encoded"] == 8 and result["cached_total"] == 8 and len(result["files_written"]) == 2
    cache = LatentCache(out, expect=codec)
    records = read_manifest(pairs)
    assert cache.ids == {r["id"] for r in records}
    lq = torch.cat([load_image(pairs / r["lq"]) for r in records])
    with torch.no_grad():
        want = codec.encode(lq)
    got = cache.get_many([r["id"] for r in records])
    assert got.shape == (8, 16, 4, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # batching may reorder float sums slightly
    info = json.loads((out / "identity.json").read_text())
    assert info["identity"] == codec.identity() and info["pairset"]["hq_size"] == 64
    # The dataset serves the latent of each pair.
    ds = PairDataset(pairs, latents=out)
    item = ds[3]
    torch.testing.assert_close(item["latent"], want[3], rtol=1e-4, atol=1e-5)
    train, val = ds.split(0.25, seed=0)
    assert "latent" in val[0] and len(val) == 2


def test_encode_resumes_and_shards_do_not_collide(pairs, codec, tmp_path):
    out = tmp_path / "lat"
    first = encode_pairs(pairs, codec, out, shard="0/2", shard_size=2, progress=False)
    second = encode_pairs(pairs, codec, out, shard="1/2", shard_size=2, progress=False)
    assert first["encoded"] + second["encoded"] == 8 and len(LatentCache(out)) == 8
    assert all(("-0-of-2-" in n) for n in first["files_written"]) and all(("-1-of-2-" in n) for n in second["files_written"])
    # A killed run loses at most the file in flight: remove one file, the rerun encodes only its pairs.
    files = shard_files(out)
    lost = LatentCache(out)
    from safetensors import safe_open

    with safe_open(files[0], framework="pt") as f:
        n_lost = len(list(f.keys()))
    files[0].unlink()
    (out / ".latents-all-x.safetensors.123.tmp").write_bytes(b"half a file")  # a temporary left by a kill
    again = encode_pairs(pairs, codec, out, shard_size=100, progress=False)
    assert again["encoded"] == n_lost and again["already_cached"] == 8 - n_lost
    assert encode_pairs(pairs, codec, out, progress=False)["encoded"] == 0
    assert LatentCache(out).ids == lost.ids


def test_another_codec_is_refused(pairs, codec, tmp_path):
    out = tmp_path / "lat"
    encode_pairs(pairs, codec, out, progress=False)
    other = codec_of(get_preset("tiny", seed=1))  # same architecture, other weights
    assert other.identity()["encoder_sha256"] != codec.identity()["encoder_sha256"]
    with pytest.raises(ValueError, match="never mixed"):
        encode_pairs(pairs, other, out, progress=False)
    with pytest.raises(ValueError, match="never mixed"):
        LatentCache(out, expect=other)
    # A shard from another codec dropped into the folder is caught on open.
    foreign = tmp_path / "foreign"
    encode_pairs(pairs, other, foreign, progress=False)
    shard_files(foreign)[0].rename(out / "zz-foreign.safetensors")
    with pytest.raises(ValueError, match="another codec"):
        LatentCache(out)


def test_cli_encode(pairs, tmp_path, capsys):
    out = tmp_path / "cli-lat"
    assert main(["encode", str(pairs), "--preset", "tiny", "--out", str(out), "--batch-size", "4", "--quiet"]) == 0
    assert "8 encoded now on cpu" in capsys.readouterr().out
    assert main(["encode", str(pairs), "--preset", "tiny", "--out", str(out), "--quiet"]) == 0
    assert "0 encoded now" in capsys.readouterr().out and len(LatentCache(out)) == 8
    assert main(["encode", str(tmp_path / "nothing"), "--preset", "tiny", "--quiet"]) == 2


def test_dataset_refuses_latents_of_another_pair_set(pairs, codec, tmp_path):
    out = tmp_path / "lat"
    encode_pairs(pairs, codec, out, progress=False)
    other = tmp_path / "other-pairs"
    build_pairs(pairs.parent / "src", other, PairSpec(hq_size=32, crops_per_image=2), workers=1, progress=False)
    with pytest.raises(ValueError, match="latents of pairs cut with"):
        PairDataset(other, latents=out)
    with pytest.raises(ValueError, match="pairs cut with"):
        encode_pairs(other, codec, out, progress=False)


def test_train_decoder_on_another_vaes_cache_names_its_own_flags(tiny_pairset, tmp_path, capsys):
    """issue 28, item 10: train-decoder has no --out; the error says how to point it at the right cache."""
    code = main(["train-decoder", str(tiny_pairset["pairs"]), str(tmp_path / "run"), "--preset", "taef2",
                 "--latents", str(tiny_pairset["latents"]), "--steps", "1"])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "never mixed" in lines[0], lines
    assert "--out" not in lines[0] and "--latents" in lines[0] and "ldlib encode" in lines[0]


def test_hq_latents_are_the_hq_encode_in_their_own_cache(pairs, codec):
    lq_dir, hq_dir = default_cache_dir(pairs, "tiny"), default_cache_dir(pairs, "tiny", image="hq")
    assert lq_dir == pairs / "latents" / "tiny" and hq_dir == pairs / "latents_hq" / "tiny"
    encode_pairs(pairs, codec, lq_dir, progress=False)
    result = encode_pairs(pairs, codec, hq_dir, batch_size=3, progress=False, image="hq")
    assert result["encoded"] == 8 and result["image"] == "hq"
    records = read_manifest(pairs)
    with torch.no_grad():
        want = codec.encode(torch.cat([load_image(pairs / r["hq"]) for r in records[:2]]))
    cache = LatentCache(hq_dir, expect=codec, image="hq")
    torch.testing.assert_close(cache.get_many([r["id"] for r in records[:2]]), want, rtol=1e-4, atol=1e-5)
    assert json.loads((hq_dir / "identity.json").read_text())["image"] == "hq"
    item = PairDataset(pairs, latents=lq_dir, hq_latents=hq_dir, load_images=False)[1]
    assert item["hq_latent"].shape == (16, 8, 8) and item["latent"].shape == (16, 4, 4)


def test_lq_and_hq_latent_caches_cannot_be_mixed(pairs, codec, tmp_path, capsys):
    lq_dir, hq_dir = tmp_path / "lq", tmp_path / "hq"
    encode_pairs(pairs, codec, lq_dir, progress=False)
    encode_pairs(pairs, codec, hq_dir, progress=False, image="hq")
    # Read as the other image: refused by every reader in one line naming the folder and both images.
    for call in (lambda: LatentCache(hq_dir), lambda: LatentCache(lq_dir, image="hq"),
                 lambda: PairDataset(pairs, latents=hq_dir), lambda: PairDataset(pairs, hq_latents=lq_dir),
                 lambda: PairDataset(pairs, latents=lq_dir, hq_latents=LatentCache(lq_dir))):
        with pytest.raises(ValueError, match="never mixed") as e:
            call()
        assert "LQ images" in str(e.value) and "HQ images" in str(e.value) and "\n" not in str(e.value)
    # Encoding one image into the other's cache is refused before anything is written.
    before = sorted(p.name for p in lq_dir.iterdir())
    for out, image in ((lq_dir, "hq"), (hq_dir, "lq")):
        with pytest.raises(ValueError, match="never mixed"):
            encode_pairs(pairs, codec, out, progress=False, image=image)
    assert sorted(p.name for p in lq_dir.iterdir()) == before
    assert main(["encode", str(pairs), "--preset", "tiny", "--image", "hq", "--out", str(lq_dir), "--quiet"]) == 2
    assert "never mixed" in capsys.readouterr().err
    # A file of HQ latents dropped into an LQ cache (same pair ids, same codec) is refused by its metadata.
    mixed = tmp_path / "mixed"
    shutil.copytree(lq_dir, mixed)
    for shard in shard_files(hq_dir):
        shutil.copy(shard, mixed / shard.name)
    with pytest.raises(ValueError, match="never mixed") as e:
        LatentCache(mixed)
    assert "latents-hq" in str(e.value)
