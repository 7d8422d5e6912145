"""Files ldlib writes atomically get the mode a plain open() gives under the umask (shared pair sets, exports)."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from ldlib.build import codec_of
from ldlib.core.files import atomic_write_bytes
from ldlib.core.images import save_image


@contextmanager
def umask(mask: int):
    """Run the block under a process umask, then restore the previous one."""
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _plain_open_mode(folder: Path, mask: int) -> int:
    """The mode open(..., 'wb') gives a new file under mask: the reference every writer must match."""
    ref = folder / "plain.ref"
    with umask(mask):
        with open(ref, "wb") as f:
            f.write(b"x")
    mode = _mode(ref)
    ref.unlink()
    return mode


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_write_and_images_follow_the_umask(tmp_path, mask):
    want = _plain_open_mode(tmp_path, mask)
    assert want == 0o666 & ~mask
    with umask(mask):
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        save_image(np.zeros((4, 4, 3), np.uint8), tmp_path / "sub" / "b.png")
    assert _mode(tmp_path / "a.json") == want
    assert _mode(tmp_path / "sub" / "b.png") == want
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "b.png", "sub"]  # no temporaries left


def test_pairs_latents_checkpoints_and_exports_follow_the_umask(tmp_path):
    """Every file of a pair set, a latent cache, a run's checkpoints and a TAE export: readable by the group."""
    from PIL import Image

    from ldlib.core.runs import CheckpointManager
    from ldlib.data.latents import encode_pairs
    from ldlib.data.pairs import PairSpec, build_pairs
    from ldlib.models.codecs import TAECodec, tae_decoder, tae_encoder
    from ldlib.presets import get_preset

    mask = 0o027
    want = _plain_open_mode(tmp_path, mask)
    src = tmp_path / "src"
    with umask(mask):
        src.mkdir()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(src / "a.png")
        build_pairs(src, tmp_path / "pairs", PairSpec(hq_size=32), workers=1, progress=False)
        encode_pairs(tmp_path / "pairs", codec_of(get_preset("tiny")), tmp_path / "pairs" / "lat", progress=False,
                     device="cpu")
        ckpt = CheckpointManager(tmp_path / "run" / "checkpoints").save(
            1, {"decoder": {"w": torch.ones(2)}}, {"opt": {"state": {}}}, {"note": "x"})
        TAECodec(tae_encoder(4, width=8), tae_decoder(4, width=8)).save_pretrained(tmp_path / "tae")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.parent.name for p in files} >= {"pairs", "hq", "lq", "lat", ckpt.name, "checkpoints", "tae"}
    wrong = {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in files if _mode(p) != want}
    assert not wrong, f"not {oct(want)} under umask {oct(mask)}: {wrong}"
    folders = [p for p in tmp_path.rglob("*") if p.is_dir()]
    assert all(_mode(p) == 0o777 & ~mask for p in folders), {str(p): oct(_mode(p)) for p in folders}
