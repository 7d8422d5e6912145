"""Export and evaluate on the folders a user points them at: refuse with one line, write nothing, never mix files."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import read_only_folder, rel_diff

from ldlib.apps.cli import main
from ldlib.apps.export import export_run
from ldlib.build import codec_of, load_run_codec
from ldlib.core import files as folders
from ldlib.core.metrics import lpips_model
from ldlib.data.datasets import sample_tensor_pairs
from ldlib.models.losses import DecoderLoss, LossConfig
from ldlib.presets import get_preset
from ldlib.train.decoder import TrainConfig, train_decoder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step tiny-preset run (EMA weights differ from the untrained widening)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lp = lpips_model("alex")
    codec = codec_of(get_preset("tiny"))
    data = sample_tensor_pairs(codec, count=2, hq_size=32, seed=1)
    cfg = TrainConfig(preset="tiny", steps=2, batch=2, warmup_steps=1, lr=1e-3, ema_decay=0.5, val_every=100, val_count=1,
                      loss=LossConfig(lpips_net="alex", gan_start=100))
    out = tmp_path_factory.mktemp("run") / "run"
    train_decoder(cfg, out, data, None, codec=codec, loss_fn=DecoderLoss(cfg.loss, lpips=lp))
    return out, data


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under folder with its bytes (hidden ones included: temporaries must not be left either)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def _one_error_line(err: str, *needles: str) -> None:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _decodes_like_the_run(out: Path, run: Path, data) -> None:
    """diffusers alone loads the export and decodes what the run's EMA decoder decodes."""
    from diffusers import AutoencoderKLWan

    ours, _ = load_run_codec(run)
    vae = AutoencoderKLWan.from_pretrained(out).eval()
    z = data.latents
    with torch.no_grad():
        raw = vae.decode((z * ours.latents_std + ours.latents_mean).unsqueeze(2)).sample.squeeze(2)
        got = torch.nn.functional.pixel_shuffle(raw, 2).clamp(-1, 1)
        want = ours.decode(z)
    # The same weights through the same ops; a relative bound covers another kernel order (see rel_diff).
    assert rel_diff(got, want) <= 1e-5


# --- export ---------------------------------------------------------------------------------------------------


def test_export_refuses_a_folder_holding_other_files(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "config.json").write_text('{"mine": 1}')
    before = _tree(tmp_path)
    code, err = _cli(["export", str(run), str(out)], capsys)
    assert code == 2
    _one_error_line(err, str(out), "ldlib_export.json")
    assert _tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_export_replaces_a_previous_export_whole(tiny_run, tmp_path, monkeypatch, exchange, capsys):
    run, data = tiny_run
    out = tmp_path / "export"
    export_run(run, out)
    first = _tree(out)
    assert {"README.md", "config.json", "diffusion_pytorch_model.safetensors", "ldlib_export.json"} == set(first)
    # Files of the old export that the new one does not write must not survive the replacement.
    (out / "stale.bin").write_bytes(b"old")
    if not exchange:
        monkeypatch.setattr(folders, "_exchange", lambda a, b: False)
    assert main(["export", str(run), str(out), "--live"]) == 0
    second = _tree(out)
    assert set(second) == set(first)
    assert json.loads(second["ldlib_export.json"])["weights"] == "live"
    assert second["diffusion_pytorch_model.safetensors"] != first["diffusion_pytorch_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging or old folder left beside it
    # An empty folder is a fine target too.
    (tmp_path / "empty").mkdir()
    export_run(run, tmp_path / "empty")
    _decodes_like_the_run(tmp_path / "empty", run, data)


def test_export_files_follow_the_umask(tiny_run, tmp_path):
    """diffusers writes its weights through safetensors (0600 temporaries): the export is readable by the group."""
    import os
    import stat

    run, _ = tiny_run
    before = os.umask(0o027)
    try:
        export_run(run, tmp_path / "export")
    finally:
        os.umask(before)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert modes == {"export": 0o750, **{name: 0o640 for name in modes if name != "export"}}, modes


def test_export_into_the_run_or_its_checkpoints_is_refused(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    before = _tree(run)
    for out in (run, run / "checkpoints", run / "checkpoints" / "x", run.parent):
        code, err = _cli(["export", str(run), str(out)], capsys)
        assert code == 2, out
        _one_error_line(err, str(out))
    assert _tree(run) == before
    load_run_codec(run)  # the run is intact: its config.json was not replaced
    # A new folder inside the run (beside its checkpoints) is fine.
    assert main(["export", str(run), str(run / "export")]) == 0
    assert (run / "export" / "ldlib_export.json").is_file()


def test_export_onto_a_file_or_a_read_only_folder_is_one_line(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    target = tmp_path / "file.bin"
    target.write_bytes(b"x")
    code, err = _cli(["export", str(run), str(target)], capsys)
    assert code == 2
    _one_error_line(err, str(target), "not a folder")
    assert target.read_bytes() == b"x"
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only_folder(ro):
        code, err = _cli(["export", str(run), str(ro)], capsys)
        assert code == 2
        _one_error_line(err, str(ro), "not writable")
        code, err = _cli(["export", str(run), str(ro / "inside")], capsys)
        assert code == 2
        _one_error_line(err, str(ro), "not writable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin", "ro"] and not any(ro.iterdir())


def test_export_cli_error_is_not_a_traceback(tiny_run, tmp_path):
    run, _ = tiny_run
    r = subprocess.run([sys.executable, "-m", "ldlib", "export", str(run), str(run)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: ")


def test_failed_export_leaves_the_previous_one(tiny_run, tmp_path, monkeypatch):
    run, _ = tiny_run
    out = tmp_path / "export"
    export_run(run, out)
    before = _tree(out)

    def broken(self, folder):
        (Path(folder) / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(load_run_codec(run)[0]), "save_pretrained", broken)
    with pytest.raises(OSError, match="No space"):
        export_run(run, out)
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# --- evaluate ---------------------------------------------------------------------------------------------------


def test_evaluate_a_run_without_checkpoint_or_an_unrelated_folder_is_one_line(tiny_run, tiny_pairset, tmp_path, capsys):
    run, _ = tiny_run
    pairs = str(tiny_pairset["pairs"])
    early = tmp_path / "early"  # a run killed before its first checkpoint: config.json (+ logs), no checkpoints/
    early.mkdir()
    (early / "config.json").write_text((run / "config.json").read_text())
    (early / "history.jsonl").write_text("")
    code, err = _cli(["evaluate", str(early), pairs, "--preset", "tiny", "--max-pairs", "1"], capsys)
    assert code == 2
    _one_error_line(err, str(early), "no checkpoint")
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "a.txt").write_text("x")
    code, err = _cli(["evaluate", str(unrelated), pairs, "--preset", "tiny", "--max-pairs", "1"], capsys)
    assert code == 2
    _one_error_line(err, str(unrelated), "neither a training run")
    assert sorted(p.name for p in early.iterdir()) == ["config.json", "history.jsonl"]
    assert [p.name for p in unrelated.iterdir()] == ["a.txt"]


def test_evaluate_with_a_preset_of_another_vae_is_one_line_naming_both(tiny_run, tiny_pairset, tmp_path, capsys,
                                                                         taef2_codec):
    run, _ = tiny_run
    code, err = _cli(["evaluate", str(run), str(tiny_pairset["pairs"]), "--preset", "taef2",
                      "--out", str(tmp_path / "eval")], capsys)
    assert code == 2
    _one_error_line(err, str(run), "'tiny'", "'taef2'")
    assert not (tmp_path / "eval").exists()


def test_the_staging_folder_of_a_killed_export_is_removed_by_the_next(tiny_run, tmp_path):
    import os

    run, _ = tiny_run
    out = tmp_path / "export"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    prefix = folders._staging_prefix(out)
    stale = tmp_path / f"{prefix}{dead.pid}-0123abcd"  # what a kill -9 mid-export leaves beside OUT
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    live = tmp_path / f"{prefix}{os.getpid()}-4567abcd"  # an export in progress in a live process: kept
    live.mkdir()
    export_run(run, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", live.name])


def test_export_through_a_symlink_replaces_the_folder_it_points_to(tiny_run, tmp_path):
    run, _ = tiny_run
    real = tmp_path / "real"
    export_run(run, real)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    (real / "stale.bin").write_bytes(b"old")
    export_run(run, tmp_path / "link", ema=False)
    assert (tmp_path / "link").is_symlink() and not (real / "stale.bin").exists()
    assert json.loads((real / "ldlib_export.json").read_text())["weights"] == "live"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_evaluate_split_all_or_held_out_and_the_report_says_which(tiny_run, tiny_pairset, tmp_path, capsys):
    from ldlib.data.datasets import PairDataset

    run, _ = tiny_run
    pairs = tiny_pairset["pairs"]
    whole = PairDataset(pairs, latents=tiny_pairset["latents"])
    held = whole.split(0.1, 0)[1]  # a run trained on in-memory pairs records no split: evaluate's defaults
    assert 0 < len(held) < len(whole)
    for split, expect in (("held-out", held), ("all", whole)):
        out = tmp_path / split
        code, err = _cli(["evaluate", str(run), str(pairs), "--preset", "tiny", "--sigmas", "0", "--split", split, "--out", str(out)], capsys)
        assert code == 0, err
        info = json.loads((out / "eval.json").read_text())["info"]
        assert info["split"] == split and info["held_out_pairs"] == len(expect)
        assert info["held_out_sources"] == expect.sources
        assert {r["n"] for r in json.loads((out / "eval.json").read_text())["rows"]} == {len(expect)}
        md = (out / "eval.md").read_text()
        assert ("all pairs of the pair set" in md) == (split == "all")
        assert f"{len(expect)} pairs from {len(expect.sources)}" in md


_HOLD_RUN = """
import sys
from pathlib import Path
from accelerate import Accelerator
from ldlib.core.runs import open_run
open_run(Path(sys.argv[1]), Accelerator(cpu=True), False, 2, {})  # what every training loop does first
print("holding", flush=True)
sys.stdin.read()  # until the test closes stdin
"""


def test_a_run_folder_has_one_writer_and_the_loser_is_told_who(tiny_pairset, tmp_path, capsys):
    """A second training on a run folder that another process is training in is refused, naming folder and holder;
    the lock goes with the holder (no stale lock)."""
    import os

    from ldlib.core.files import FolderBusyError

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_RUN, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout.readline().strip() == "holding"  # readiness, not a sleep
        cfg = TrainConfig(preset="tiny", steps=1, batch=2, warmup_steps=0, val_every=100, val_count=1,
                          loss=LossConfig(lpips_weight=0, gan_start=100))
        with pytest.raises(FolderBusyError) as e:
            train_decoder(cfg, run, pairs=tiny_pairset["pairs"], latents=tiny_pairset["latents"],
                          codec=tiny_pairset["codec"])
        assert str(run) in str(e.value) and f"pid {holder.pid}" in str(e.value)
        assert not (run / "checkpoints").exists() and not (run / "history.jsonl").exists()  # the loser wrote nothing
        code, err = _cli(["train-decoder", str(tiny_pairset["pairs"]), str(run), "--preset", "tiny", "--steps", "1",
                          "--batch", "2", "--lpips-weight", "0", "--latents", str(tiny_pairset["latents"])], capsys)
        assert code == 2
        _one_error_line(err, str(run), f"pid {holder.pid}")
    finally:
        holder.stdin.close()
        holder.wait(timeout=120)
    # the holder is gone: its lock went with it
    res = train_decoder(cfg, run, pairs=tiny_pairset["pairs"], latents=tiny_pairset["latents"], codec=tiny_pairset["codec"])
    assert res.step == 1 and (run / "checkpoints" / "step_000001").is_dir()
    # and this process let go of it when the run ended: a resume in another process is not refused
    take = "import sys; from pathlib import Path; from ldlib.core.runs import lock_run; lock_run(Path(sys.argv[1])); print('holding')"
    again = subprocess.run([sys.executable, "-c", take, str(run)], input="",
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert again.returncode == 0 and "holding" in again.stdout, again.stderr


# --- issue 28, item 3: disk full -----------------------------------------------------------------------------------


def _disk_full_safetensors(monkeypatch, after: int = 0) -> None:
    """safetensors' save_file fails as it does on a full disk (its own error type wrapping ENOSPC) after `after` files."""
    import safetensors.torch
    from safetensors import SafetensorError

    real, calls = safetensors.torch.save_file, [0]

    def save_file(tensors, filename, metadata=None):
        calls[0] += 1
        if calls[0] > after:
            Path(filename).write_bytes(b"\0" * 64)  # what it managed to write
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def _dev_full(monkeypatch) -> None:
    """Every atomic write of ldlib.core.files writes into /dev/full: the kernel's own ENOSPC on the first write."""
    import os

    def new_temp(path):
        return os.open("/dev/full", os.O_WRONLY), path.parent / f".{path.name}.devfull.tmp"

    monkeypatch.setattr(folders, "_new_temp", new_temp)


def test_a_checkpoint_on_a_full_disk_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    from ldlib.core.files import WriteError

    codec = codec_of(get_preset("tiny"))
    data = sample_tensor_pairs(codec, count=2, hq_size=32, seed=1)
    cfg = TrainConfig(preset="tiny", steps=2, batch=2, warmup_steps=0, checkpoint_every=1, val_every=100, val_count=1,
                      loss=LossConfig(lpips_weight=0, gan_start=100))
    out = tmp_path / "run"
    train_decoder(cfg, out, data, None, codec=codec, stop_at=1)
    before = _tree(out / "checkpoints")
    _disk_full_safetensors(monkeypatch)
    with pytest.raises(WriteError) as e:
        train_decoder(cfg, out, data, None, codec=codec, resume=True)
    msg = str(e.value)
    assert "\n" not in msg and str(out / "checkpoints" / "step_000002") in msg and "No space left on device" in msg
    assert str(out / "checkpoints" / "step_000001") in msg  # what was kept
    assert _tree(out / "checkpoints") == before  # no .tmp_step_* left, the earlier checkpoint untouched


def test_an_export_on_a_full_disk_is_one_line_and_writes_nothing(tiny_run, tmp_path, monkeypatch, capsys):
    run, _ = tiny_run
    _disk_full_safetensors(monkeypatch)
    code, err = _cli(["export", str(run), str(tmp_path / "export")], capsys)
    assert code == 2
    _one_error_line(err, str(tmp_path / "export"), "No space left on device", "nothing was written")
    assert list(tmp_path.iterdir()) == []  # no staging folder left beside it


def test_build_pairs_and_encode_on_a_full_disk_name_the_file(tiny_pairset, tmp_path, monkeypatch, capsys):
    _dev_full(monkeypatch)
    code, err = _cli(["build-pairs", str(tiny_pairset["photos"]), str(tmp_path / "pairs"), "--preset", "tiny",
                      "--workers", "1", "--quiet"], capsys)
    assert code == 2
    _one_error_line(err, str(tmp_path / "pairs"), "No space left on device")
    assert ".png" in err or ".json" in err  # the file, not only the folder
    code, err = _cli(["encode", str(tiny_pairset["pairs"]), "--preset", "tiny", "--out", str(tmp_path / "lat"),
                      "--quiet"], capsys)
    assert code == 2
    _one_error_line(err, str(tmp_path / "lat") + "/", "No space left on device")  # a file in the cache folder
