"""export --format diffusers|wan|tae: the original-layout Wan file loads with diffusers' from_single_file and decodes
like our decoder; the formats that apply; refusing to overwrite what is not an ldlib export."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_diff, train_short_run

from ldlib.apps.cli import main
from ldlib.apps.export import export_run
from ldlib.models.tiny import TINY_WAN21_VAE_CONFIG
from ldlib.presets import get_preset


@pytest.fixture(scope="module")
def wan21_run(tmp_path_factory):
    """A run of preset wan2.1-1.3b whose VAE is a tiny Wan-2.1-architecture model given as a local folder."""
    from diffusers import AutoencoderKLWan

    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKLWan(**TINY_WAN21_VAE_CONFIG).save_pretrained(folder)
    return train_short_run(tmp_path_factory.mktemp("run"), "wan2.1-1.3b", str(folder))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_short_run(tmp_path_factory.mktemp("run"))


def test_wan_file_round_trip(wan21_run, tmp_path):
    """export wan -> from_single_file (config = the exported folder) -> decode + pixel_shuffle == our decoder."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from ldlib.build import load_run_codec
    from ldlib.models.single_file import read_state_dict

    run, data = wan21_run
    out = export_run(run, tmp_path / "export")
    info = json.loads((out / "ldlib_export.json").read_text())
    assert info["formats"] == ["diffusers", "wan"] and info["skipped_formats"] == {}
    path = out / "wan2.1-1.3b_vae_upscale2x.safetensors"
    assert str(path.name) in info["files"] and "from_single_file" in (out / "README.md").read_text()
    ours, _ = load_run_codec(run)
    original = read_state_dict(path)
    assert original["decoder.head.2.weight"].shape[0] == 12
    back = convert_wan_vae_to_diffusers(original)
    expected_sd = ours.vae.state_dict()
    assert sorted(back) == sorted(expected_sd)
    assert all(torch.equal(back[k], expected_sd[k]) for k in expected_sd)
    vae = AutoencoderKLWan.from_single_file(str(path), config=str(out), local_files_only=True).eval()
    z = data.latents
    with torch.no_grad():
        expected = ours.decode(z)
        got = F.pixel_shuffle(vae.decode(ours.denormalise(z).unsqueeze(2)).sample.squeeze(2), 2)
    assert got.shape == expected.shape == (2, 3, 32, 32)
    assert rel_diff(got, expected) < 1e-4


def test_wan_format_alone_and_formats_that_do_not_apply(wan21_run, tmp_path):
    run, _ = wan21_run
    out = export_run(run, tmp_path / "only_wan", formats=["wan"])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "ldlib_export.json", "wan2.1-1.3b_vae_upscale2x.safetensors"]
    with pytest.raises(ValueError, match="'tae' does not apply"):
        export_run(run, tmp_path / "tae", formats=["tae"])
    with pytest.raises(ValueError, match="unknown export format"):
        export_run(run, tmp_path / "x", formats=["onnx"])


def test_wan_format_refused_for_another_wan_architecture(tiny_run, tmp_path):
    """The tiny preset's VAE (1 residual block per stage) has no faithful original-layout file."""
    run, _ = tiny_run
    out = export_run(run, tmp_path / "default")  # default: wan skipped, said why
    info = json.loads((out / "ldlib_export.json").read_text())
    assert info["formats"] == ["diffusers"] and "num_res_blocks" in info["skipped_formats"]["wan"]
    with pytest.raises(ValueError, match="cannot export format 'wan'.*num_res_blocks"):
        export_run(run, tmp_path / "asked", formats=["wan"])
    assert not (tmp_path / "asked").exists()  # refused before anything was written


def test_export_refuses_files_and_foreign_folders(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    target = tmp_path / "afile"
    target.write_text("keep me")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me too")
    for out in (target, mine):
        with pytest.raises(ValueError, match=str(out.name)):
            export_run(run, out)
    assert target.read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # The CLI: one line, exit code 2, no traceback.
    assert main(["export", str(run), str(mine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not empty" in err[0]
    # A previous export may be refreshed in place.
    out = export_run(run, tmp_path / "again")
    assert export_run(run, out) == out


def test_cli_export_format_option(wan21_run, tmp_path, capsys):
    run, _ = wan21_run
    assert main(["export", str(run), str(tmp_path / "e"), "--format", "wan,diffusers"]) == 0
    printed = capsys.readouterr().out
    assert "diffusers, wan" in printed and "vae_upscale2x.safetensors" in printed


@pytest.mark.parametrize("fmt", ["diffusers", "wan"])
def test_readme_names_the_weights_exported(tiny_run, wan21_run, fmt, tmp_path):
    # "wan" alone writes its own README head (no diffusers folder): both texts must say which weights they hold.
    run, _ = wan21_run if fmt == "wan" else tiny_run
    for live in (False, True):
        out = tmp_path / f"e{int(live)}"
        assert main(["export", str(run), str(out), "--format", fmt] + (["--live"] if live else [])) == 0
        assert json.loads((out / "ldlib_export.json").read_text())["weights"] == ("live" if live else "ema")
        readme = (out / "README.md").read_text()
        assert ("live weights" in readme) == live and ("EMA" in readme) == (not live)
