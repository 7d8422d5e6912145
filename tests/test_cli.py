"""The command line: help lists commands, codec-check reports PSNR, bad input is one clear line."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

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
    r = subprocess.run([sys.executable, "-m", "ldlib", "codec-check", str(bad), "--preset", "tiny"], capture_output=True, text=True)
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


def test_every_preset_flag_refuses_a_name_outside_the_registry(capsys):
    """Issue 25: --preset flags generated from config dataclasses (TrainConfig, TeacherConfig, ExperimentConfig) take
    their choices from the registry too, so a wrong name is refused by argparse, naming the choices."""
    from ldlib.apps.cli import build_parser
    from ldlib.presets import PRESETS

    commands = build_parser()._subparsers._group_actions[0].choices
    with_preset = [name for name, sub in commands.items()
                   if any("--preset" in a.option_strings for a in sub._actions)]
    assert {"train-decoder", "train-teacher", "experiment"} <= set(with_preset)
    for name in with_preset:
        flag = next(a for a in commands[name]._actions if "--preset" in a.option_strings)
        assert flag.choices is not None and tuple(flag.choices) == PRESETS, name
    for argv in (["train-decoder", "pairs", "run"], ["train-teacher", "pairs", "out"], ["experiment", "out"]):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--preset", "wan2.2"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "argument --preset: invalid choice: 'wan2.2'" in err, err
        assert all(repr(p) in err for p in PRESETS), err  # argparse names every choice
        assert build_parser().parse_args([*argv, "--preset", "tiny"]).preset == "tiny"


def test_config_field_choices_need_a_str_or_int_field():
    import argparse
    from dataclasses import dataclass, field

    from ldlib.core.config import add_config_arguments

    @dataclass
    class Bad:
        sigmas: tuple[float, ...] = field(default=(0.0,), metadata={"choices": ((0.0,),)})

    with pytest.raises(TypeError, match="Bad.sigmas: metadata choices"):
        add_config_arguments(argparse.ArgumentParser(), Bad)


# --- issue 28, item 9: notebook parameters from LDLIB_* variables ---------------------------------------------------


@pytest.mark.parametrize("name,default,text,says", [
    ("SWEEP_SIGMAS", (0.0, 0.02), "a,b", "expected a float"),
    ("SIGMA", 0.08, "nan", "not a finite number"),
    ("SIGMA", 0.08, "inf", "not a finite number"),
    ("SWEEP_SIGMAS", (0.0, 0.02), "0.1,inf", "not a finite number"),
    ("STEPS", 200, "-5", "must be >= 0"),
    ("LR", 1e-4, "-1e-4", "must be >= 0"),
    ("PRESET", "taef2", "", "set but empty"),
    ("PRESET", "taef2", "  ", "set but empty"),
    ("BATCH", 2, "1.5", "expected a int"),
])
def test_notebook_variables_are_checked_naming_the_variable(name, default, text, says, monkeypatch):
    from ldlib.core.config import env

    monkeypatch.setenv(f"LDLIB_{name}", text)
    with pytest.raises(ValueError) as e:
        env(name, default)
    assert str(e.value).startswith(f"$LDLIB_{name}") and says in str(e.value), str(e.value)


def test_notebook_variables_still_convert(monkeypatch):
    from ldlib.core.config import env

    for name, default, text, want in (("SWEEP_SIGMAS", (0.0,), "0,0.05", (0.0, 0.05)), ("STEPS", 200, "12", 12),
                                      ("SIGMA", 0.08, "0.1", 0.1), ("PHOTOS", None, "", None), ("PRESET", "taef2", "tiny", "tiny"),
                                      ("DEGRADERS", ("noise",), "noise,proxy:x", ("noise", "proxy:x"))):
        monkeypatch.setenv(f"LDLIB_{name}", text)
        assert env(name, default) == want


# --- issue 28, item 11: defaults that do not mislead -----------------------------------------------------------------


def test_every_command_defaults_to_the_real_offline_preset():
    from ldlib.apps.cli import build_parser
    from ldlib.core.config import config_from_args
    from ldlib.train.decoder import TrainConfig

    parser = build_parser()
    positional = {"codec-check": ["x.png"], "build-pairs": ["src", "out"], "encode": ["pairs"],
                  "teacher": ["pairs", "out"], "sweep": [], "evaluate": ["model", "pairs"], "bench": [], "demo": []}
    for command, rest in positional.items():
        assert parser.parse_args([command, *rest]).preset == "taef2", command
    args = parser.parse_args(["train-decoder", "pairs", "run"])
    assert config_from_args(TrainConfig, args).preset == "taef2" and TrainConfig().preset == "taef2"


def test_abbreviated_or_old_flags_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["build-pairs", "src", "out", "--crop", "512"])  # the old flag, not --crops-per-image
    assert e.value.code == 2 and "unrecognized arguments: --crop 512" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train-decoder", "pairs", "run", "--ste", "5"])
    assert "unrecognized arguments: --ste" in capsys.readouterr().err


def test_build_pairs_help_says_sizes_come_from_the_preset(capsys):
    with pytest.raises(SystemExit):
        main(["build-pairs", "--help"])
    text = " ".join(capsys.readouterr().out.split()).split("pair spec", 1)[1]  # the options, past the usage
    for flag in ("--hq-size", "--pre-downsample", "--lq-factor"):
        help_of = text.split(flag, 1)[1].split(" --", 1)[0]
        assert "(default: the preset's)" in help_of, (flag, help_of)
    assert "(default: 512)" not in text


def test_installing_prints_no_deprecation_banner(tmp_path):
    """issue 28, item 12: a newcomer's `make` showed setuptools' licence-format banner (project.license as a table)."""
    import shutil
    from pathlib import Path

    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("setuptools < 77 (pip's build isolation fetches a newer one, as pyproject.toml asks)")
    repo = Path(__file__).resolve().parents[1]
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(repo / name, tmp_path / name)
    (tmp_path / "ldlib").mkdir()
    shutil.copy(repo / "ldlib" / "__init__.py", tmp_path / "ldlib" / "__init__.py")
    code = ("import os, warnings; warnings.simplefilter('always'); from setuptools import build_meta; "
            "os.makedirs('meta'); build_meta.prepare_metadata_for_build_wheel('meta')")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Deprecat" not in r.stderr and "deprecated" not in r.stderr, r.stderr
    meta = next((tmp_path / "meta").rglob("PKG-INFO")).read_text()
    assert "License-Expression: MIT" in meta
