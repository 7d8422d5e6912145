"""The command line: help lists commands, codec-check reports PSNR, bad input is one clear line."""

from __future__ import annotations

import re
import subprocess
import sys

from ldlib.apps.cli import main
from ldlib.core.samples import sample_paths


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("codec-check", "demo", "bench"):
        assert command in out


def test_codec_check_reports_psnr(tmp_path, capsys):
    out_png = tmp_path / "check.png"
    assert main(["codec-check", str(sample_paths()[0]), "--preset", "tiny", "--size", "64", "--out", str(out_png)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"PSNR -?\d+\.\d+ dB", out)
    assert out_png.is_file()


def test_codec_check_bad_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    r = subprocess.run([sys.executable, "-m", "ldlib", "codec-check", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "broken.png" in r.stderr and "Traceback" not in r.stderr


def test_bench_train_options_are_refused_elsewhere_and_unknown_variants_named(capsys):
    assert main(["bench", "degrade", "--batches", "1,8"]) == 2
    assert "--batches apply to `bench train` only" in capsys.readouterr().err
    assert main(["bench", "train", "--quick", "--variants", "after (new defaults), no such"]) == 2
    err = capsys.readouterr().err
    assert "'no such'" in err and "'after (new defaults)'" in err  # names the unknown one and the choices



def test_registries_drive_every_preset_and_degrader_flag():
    """Every --preset with a fixed set takes the registry's names; every --degrader help is the vocabulary's."""
    from ldlib.apps.cli import build_parser
    from ldlib.build import VOCABULARY, vocabulary
    from ldlib.presets import PRESET_HELP, PRESETS

    commands = build_parser()._subparsers._group_actions[0].choices
    helps = (VOCABULARY, vocabulary(live=True), vocabulary(live=True, degrading=True))
    presets = degraders = 0
    for name, sub in commands.items():
        for action in sub._actions:
            if "--preset" in action.option_strings and action.choices is not None:
                assert tuple(action.choices) == PRESETS, name
                presets += 1
            if "--degrader" in action.option_strings:
                assert any(h in action.help for h in helps), (name, action.help)
                degraders += 1
    assert presets >= 5 and degraders >= 3
    train_help = " ".join(commands["train-decoder"].format_help().split())
    assert PRESET_HELP in train_help  # the TrainConfig flag's help is the registry's list
