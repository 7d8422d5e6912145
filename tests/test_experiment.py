"""The experiment command end to end at tiny size: every decoder trained, the GAN run forked, results written, resumable."""

from __future__ import annotations

import json

from ldlib.apps.experiment import DEGRADERS, NAMES, ExperimentConfig, run_experiment
from ldlib.core.runs import read_history
from ldlib.core.samples import sample_photos


def test_experiment_runs_every_stage_and_resumes(tmp_path, monkeypatch):
    import ldlib.apps.evaluate

    pictured = []  # the decoders crops.png shows
    real_comparison = ldlib.apps.evaluate.comparison_images

    def comparison(codec, decoders, *args, **kwargs):
        pictured.append(list(decoders))
        return real_comparison(codec, decoders, *args, **kwargs)

    monkeypatch.setattr(ldlib.apps.evaluate, "comparison_images", comparison)
    cfg = ExperimentConfig(preset="tiny", photos=str(sample_photos()), crops_per_image=1, decoder_steps=4,
                           proxy_steps=4, teacher_draws=2, eval_sigmas=(0.0, 0.08), gan_warmup=1)
    out = tmp_path / "exp"
    state = run_experiment(out, cfg)
    best = state["best"]
    assert best in DEGRADERS and set(state["best_scores"]) == set(DEGRADERS)
    # Four decoders that differ only in the degrader: same settings otherwise.
    configs = {k: json.loads((out / "runs" / k / "config.json").read_text()) for k in DEGRADERS}
    strip = [{k: v for k, v in c.items() if k != "degrader"} for c in configs.values()]
    assert all(s == strip[0] for s in strip) and len({c["degrader"] for c in configs.values()}) == 4
    # The GAN run continues its twin from the middle checkpoint with the GAN on.
    gan = out / "runs" / f"{best}+gan"
    assert [h["step"] for h in read_history(gan)] == [2, 3]
    assert json.loads((gan / "config.json").read_text())["init_from"].endswith(f"{best}/checkpoints/step_000002")
    assert "g_loss" in read_history(gan)[-1]
    results = json.loads((out / "results.json").read_text())
    methods = {r["method"] for r in results["rows"]["teacher"]}
    assert methods == {"decoder+bicubic", "decoder+lanczos", *NAMES.values(), f"{NAMES[best]} + GAN"}
    assert {r["sigma"] for r in results["rows"]["noise"]} == {0.0, 0.08}
    assert "Paired comparisons" in (out / "results.md").read_text()
    assert (out / "metrics.png").stat().st_size > 1000 and (out / "crops.png").stat().st_size > 1000
    assert pictured == [[*NAMES.values(), f"{NAMES[best]} + GAN"]]  # every decoder, the GAN run included
    # A rerun resumes: nothing is trained or evaluated again.
    before = json.loads((out / "experiment.json").read_text())["seconds"]
    run_experiment(out, cfg)
    after = json.loads((out / "experiment.json").read_text())["seconds"]
    assert {k: v for k, v in after.items() if k.startswith(("decoder", "evaluate", "choose"))} == \
        {k: v for k, v in before.items() if k.startswith(("decoder", "evaluate", "choose"))}
