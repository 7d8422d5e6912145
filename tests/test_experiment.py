"""The experiment command end to end at tiny size: held out by photo, every condition x seed trained, two proxies,
results with error bars over seeds, the paired answers, resumable, and shareable between two processes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ldlib.apps.experiment import (CONDITIONS, NAMES, ExperimentConfig, pooled, run_experiment, run_name,
                                   seed_stats, split_photos)
from ldlib.core.files import FolderBusyError
from ldlib.core.samples import sample_photos, sample_paths


def test_experiment_runs_every_stage_and_resumes(tmp_path):
    names = [p.name for p in sample_paths()]
    held = (names[0][:3], names[1][:3])
    cfg = ExperimentConfig(preset="tiny", photos=str(sample_photos()), held_out=held, hq_size=None,
                           crops_per_image=1, decoder_steps=4, checkpoint_every=2, proxy_steps=4, narrow_steps=6,
                           teacher_draws=2, seeds=(0, 1), eval_sigmas=(0.0, 0.08), noise_sigmas=(0.08,),
                           curve_sigmas=(0.08,))
    out = tmp_path / "exp"
    state = run_experiment(out, cfg)
    # Held out by photo: the test pair set holds exactly the named photos, the training set none of them.
    test_sources = {json.loads(line)["source"] for line in (out / "pairs_test" / "manifest.jsonl").read_text().splitlines()}
    train_sources = {json.loads(line)["source"] for line in (out / "pairs_train" / "manifest.jsonl").read_text().splitlines()}
    assert {s[:3] for s in test_sources} == set(held) and not {s[:3] for s in train_sources} & set(held)
    # Every condition x seed trained with identical settings but for the degrader and the seed.
    configs = {(k, s): json.loads((out / "runs" / run_name(k, s) / "config.json").read_text())
               for k in CONDITIONS for s in cfg.seeds}
    strip = [{k: v for k, v in c.items() if k not in ("degrader", "seed")} for c in configs.values()]
    assert all(s == strip[0] for s in strip)
    assert {c["seed"] for c in configs.values()} == {0, 1}
    assert len({c["degrader"] for c in configs.values()}) == len(CONDITIONS)
    assert strip[0]["head_init"] == "least-squares" and strip[0]["loss"]["lpips_weight"] == 0
    # The narrow proxy trained only on records up to its sigma; both scored on the held-out photos' teacher data.
    narrow = json.loads((out / "proxy_narrow" / "config.json").read_text())
    assert narrow["train_sigma_max"] == cfg.narrow_sigma_max and narrow["steps"] == 6
    assert set(state["proxy_fidelity"]) == {"wide", "narrow"}
    results = json.loads((out / "results.json").read_text())
    methods = {r["method"] for r in results["rows"]["teacher"]}
    assert methods == {"decoder+bicubic", "decoder+lanczos",
                       *(f"{NAMES[k]} seed {s}" for k in CONDITIONS for s in cfg.seeds)}
    # The seed statistics are those of the per-seed rows (an independent numpy computation here).
    rows = state["results"]["teacher"]
    per_seed = [next(r["psnr"] for r in rows if r["method"] == f"{NAMES['teacher']} seed {s}" and r["sigma"] == 0.08)
                for s in cfg.seeds]
    st = results["seed_stats"]["teacher"]["teacher"]["psnr"]["0.08"]
    assert st["mean"] == pytest.approx(np.mean(per_seed)) and st["sd"] == pytest.approx(np.std(per_seed, ddof=1))
    assert st["se"] == pytest.approx(np.std(per_seed, ddof=1) / np.sqrt(2))
    # The answers pool seeds nested in photos: each photo's mean difference is the mean over seeds of its mean.
    a = next(c for c in results["answers"] if c["ours"] == "teacher" and c["vs"] == "noise" and c["metric"] == "psnr")
    assert a["n_seeds"] == 2 and a["n_photos"] == len(held) and a["sigma"] == 0.08
    t_rows = {s: next(r for r in rows if r["method"] == f"{NAMES['teacher']} seed {s}" and r["sigma"] == 0.08)
              for s in cfg.seeds}
    n_rows = {s: next(r for r in rows if r["method"] == f"{NAMES['noise']} seed {s}" and r["sigma"] == 0.08)
              for s in cfg.seeds}
    expect = []
    for photo in sorted(test_sources):
        per = [np.mean([t - n for t, n, src in zip(t_rows[s]["per_pair"]["psnr"], n_rows[s]["per_pair"]["psnr"],
                                                    t_rows[s]["sources"]) if src == photo]) for s in cfg.seeds]
        expect.append(np.mean(per))
    assert a["mean_diff"] == pytest.approx(np.mean(expect))
    assert set(results["curves"]) == {run_name(k, s) for k in CONDITIONS for s in cfg.seeds}
    assert results["curves"][run_name("noise", 0)]["steps"] == [2, 4]
    text = (out / "results.md").read_text()
    assert "The recipe's questions" in text and "The proxies against the teacher" in text
    for png in ("metrics.png", "crops.png", "curves.png"):
        assert (out / png).stat().st_size > 1000
    # A rerun resumes: nothing is trained or evaluated again.
    def work(seconds: dict) -> dict:
        return {k: v for k, v in seconds.items() if k.startswith(("decoder", "proxy", "evaluate", "curves"))}

    before = json.loads((out / "experiment.json").read_text())["seconds"]
    run_experiment(out, cfg)
    assert work(json.loads((out / "experiment.json").read_text())["seconds"]) == work(before)
    # Other settings in the same folder are refused; more decoder steps continue every run and score again.
    with pytest.raises(ValueError, match="other settings"):
        run_experiment(out, ExperimentConfig(**{**cfg.__dict__, "lr": 1e-3}))
    longer = ExperimentConfig(**{**cfg.__dict__, "decoder_steps": 6})
    run_experiment(out, longer)
    summary = json.loads((out / "runs" / run_name("teacher", 1) / "summary.json").read_text())
    assert summary["steps_done"] == 6 and summary["finished"]
    assert json.loads((out / "results.json").read_text())["curves"][run_name("teacher", 1)]["steps"] == [2, 4, 6]


def test_a_run_another_process_trains_is_left_to_it(tmp_path, monkeypatch):
    import ldlib.train.decoder

    names = [p.name for p in sample_paths()]
    cfg = ExperimentConfig(preset="tiny", photos=str(sample_photos()), held_out=(names[0][:3],), hq_size=None,
                           crops_per_image=1, decoder_steps=2, checkpoint_every=1, proxy_steps=2, narrow_steps=2,
                           teacher_draws=1, seeds=(0,), eval_sigmas=(0.08,), noise_sigmas=(0.08,), curve_sigmas=(0.08,))
    real = ldlib.train.decoder.train_decoder

    def busy_for_teacher(tc, run, **kw):
        if run.name == run_name("teacher", 0):
            raise FolderBusyError(f"{run}: run folder in use by another process")
        return real(tc, run, **kw)

    monkeypatch.setattr(ldlib.train.decoder, "train_decoder", busy_for_teacher)
    state = run_experiment(tmp_path / "exp", cfg)
    assert state["waiting_for"] == [run_name("teacher", 0)] and "results" not in state
    assert not (tmp_path / "exp" / "results.md").exists()
    monkeypatch.setattr(ldlib.train.decoder, "train_decoder", real)
    state = run_experiment(tmp_path / "exp", cfg)  # the other process's run done: this one evaluates
    assert "waiting_for" not in state or not state["waiting_for"]
    assert (tmp_path / "exp" / "results.md").is_file()


def test_held_out_photos_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="no photo named zz9"):
        split_photos(sample_photos(), ("zz9",), tmp_path)


def test_pooled_rows_carry_their_seed():
    rows = [{"method": f"{NAMES['noise']} seed {s}", "sigma": 0.08, "psnr": 0.0,
             "per_pair": {"psnr": [s + 0.0, s + 1.0]}, "sources": ["a", "b"]} for s in (3, 4)]
    p = pooled(rows, "noise", (3, 4), 0.08)
    assert p["per_pair"]["psnr"] == [3.0, 4.0, 4.0, 5.0] and p["seeds"] == [3, 3, 4, 4]
    assert p["sources"] == ["a", "b", "a", "b"]
    assert seed_stats([{**r, "psnr": float(np.mean(r["per_pair"]["psnr"]))} for r in rows], "noise", (3, 4), 0.08,
                      "psnr")["sd"] == pytest.approx(np.std([3.5, 4.5], ddof=1))


def test_a_subset_of_conditions_trains_and_answers_only_those(tmp_path):
    names = [p.name for p in sample_paths()]
    held = (names[0][:3], names[1][:3])
    cfg = ExperimentConfig(preset="tiny", photos=str(sample_photos()), held_out=held, hq_size=None,
                           crops_per_image=1, decoder_steps=2, checkpoint_every=2, teacher_draws=1,
                           conditions=("teacher", "none"), seeds=(0,), eval_sigmas=(0.08,), noise_sigmas=(0.08,),
                           curve_sigmas=(0.08,))
    assert cfg.conditions == ("none", "teacher")  # the tables' order, whatever order they were named in
    out = tmp_path / "exp"
    state = run_experiment(out, cfg)
    assert sorted(p.name for p in (out / "runs").iterdir()) == [run_name("none", 0), run_name("teacher", 0)]
    assert not (out / "proxy_wide").exists() and not (out / "proxy_narrow").exists()
    assert not (out / "teacher_test").exists() and "proxy_fidelity" not in state
    results = json.loads((out / "results.json").read_text())
    assert {(a["ours"], a["vs"]) for a in results["answers"]} == {("teacher", "none")}
    text = (out / "results.md").read_text()
    assert "| clean-trained |" in text and "noise-trained" not in text and "The proxies" not in text
    assert "nan" not in text  # one seed: the held-out means, no standard error to print
    with pytest.raises(ValueError, match="conditions: gan"):
        ExperimentConfig(conditions=("none", "gan"))


def test_a_folder_from_before_a_new_setting_resumes_with_its_default(tmp_path):
    names = [p.name for p in sample_paths()]
    cfg = ExperimentConfig(preset="tiny", photos=str(sample_photos()), held_out=(names[0][:3],), hq_size=None,
                           crops_per_image=1, decoder_steps=1, checkpoint_every=1, teacher_draws=1,
                           conditions=CONDITIONS, proxy_steps=1, narrow_steps=1, seeds=(0,), eval_sigmas=(0.08,),
                           noise_sigmas=(0.08,), curve_sigmas=(0.08,))
    out = tmp_path / "exp"
    run_experiment(out, cfg)
    state = json.loads((out / "experiment.json").read_text())
    del state["config"]["conditions"]  # as an experiment.json written before the setting existed
    (out / "experiment.json").write_text(json.dumps(state))
    before = state["seconds"]
    run_experiment(out, cfg)
    after = json.loads((out / "experiment.json").read_text())["seconds"]
    assert {k: v for k, v in after.items() if k.startswith("decoder")} == \
        {k: v for k, v in before.items() if k.startswith("decoder")}
