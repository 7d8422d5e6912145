"""`make demo`'s plumbing at the tiny preset: every stage runs, the page reports what the run did."""

from __future__ import annotations

import json
from types import SimpleNamespace

from ldlib.apps.demo import DemoConfig, run_demo, write_page
from ldlib.core.images import list_images
from ldlib.core.samples import sample_photos
from ldlib.data.datasets import PairDataset
from ldlib.presets import get_preset


def test_tiny_demo_writes_the_page_from_its_own_results(tmp_path):
    out = tmp_path / "demo"
    cfg = DemoConfig.for_preset("tiny", decoder_steps=4, proxy_steps=10, teacher_draws=2)
    summary = run_demo(out, cfg)
    photos = sorted(p.name for p in list_images(sample_photos()))
    # The split the page reports is the pair set's own, by source photo.
    train, held = PairDataset(out / "pairs").split(cfg.val_fraction, cfg.split_seed)
    assert summary["train_sources"] == train.sources and summary["held_out_sources"] == held.sources
    assert sorted(summary["train_sources"] + summary["held_out_sources"]) == photos
    assert summary["pairs"] == len(train) + len(held) == 2 * len(photos)
    assert summary["decoder_steps"] == 4
    for name in ("index.html", "pairs.png", "degradation.png", "sweep.png", "crops.png", "proxy/eval.png",
                 "eval/eval.json", "summary.json"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "eval" / "eval.json").read_text())
    assert doc["info"]["held_out_sources"] == held.sources
    page = (out / "index.html").read_text()
    assert "used the <b>tiny</b> preset" in page
    assert doc["verdict"]["ours_beats_baselines"] is None  # random models: no verdict
    assert "never saw" not in page  # the paragraph about a real run is not shown for random models
    # The same results rendered as a real preset's page: its sentence counts the run's own photos and pairs.
    sweeps = {k: SimpleNamespace(rows=v["rows"]) for k, v in json.loads((out / "sweep.json").read_text()).items()}
    real = write_page(out, summary, doc, sweeps, get_preset("taef2")).read_text()
    assert f"on {len(train)} crops of {len(train.sources)} photos" in real
    assert f"judged on {len(held)} crops of {len(held.sources)} photos it never saw" in real
    # Where the preset ships a decoder, the page gives its own section: its PSNR gains from the rows, its verdict.
    from ldlib.apps.demo import SHIPPED

    rows = doc["rows"] + [{**r, "method": SHIPPED, "psnr": r["psnr"] + 1.0} for r in doc["rows"] if r["method"] == "ours"]
    gains = {r["sigma"]: r["psnr"] + 1.0 - next(b["psnr"] for b in doc["rows"] if b["method"] == "decoder+bicubic"
                                                and b["sigma"] == r["sigma"]) for r in doc["rows"] if r["method"] == "ours"}
    with_shipped = write_page(out, {**summary, "shipped_decoder": "ldlib/assets/taef2_2x", "shipped_verdict": "VERDICT"},
                              {**doc, "rows": rows}, sweeps, get_preset("taef2")).read_text()
    assert "The 2x decoder ldlib ships for taef2" in with_shipped and "VERDICT" in with_shipped
    assert all(f"{g:+.2f} dB at sigma {s:g}" in with_shipped for s, g in gains.items())
    assert "ldlib ships" not in real
    # The sweep takes the held-out photos' crops in turn (the pairs come sorted by photo).
    source = {r["id"]: r["source"] for r in held.records}
    swept = [source[i] for i in summary["sweep_pairs"]]
    assert len(swept) == min(8, len(held)) and swept[: 2 * len(held.sources)] == held.sources * 2
    # A rerun with more decoder steps resumes every stage and trains on to them (the warm-up does not follow steps).
    summary = run_demo(out, DemoConfig.for_preset("tiny", decoder_steps=6, proxy_steps=10, teacher_draws=2))
    assert summary["decoder_steps"] == 6
    history = (out / "decoder" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in history] == list(range(6))


def test_demo_writes_each_preset_into_its_own_folder(monkeypatch):
    # `make demo` (taef2) after the one-minute tiny run: their folders would refuse each other's pairs and settings.
    import ldlib.apps.demo
    from ldlib.apps.cli import main

    seen = []
    monkeypatch.setattr(ldlib.apps.demo, "run_demo", lambda out, cfg: seen.append((str(out), cfg.preset)))
    for argv in (["demo"], ["demo", "--preset", "tiny"], ["demo", "--preset", "tiny", "--out", "x"]):
        assert main(argv) == 0
    assert seen == [("runs/demo", "taef2"), ("runs/demo-tiny", "tiny"), ("x", "tiny")]


def test_the_demo_holds_out_three_photos_neither_shipped_model_trained_on():
    from ldlib.data.pairs import split_by_source
    from ldlib.presets import shipped_decoder

    cfg = DemoConfig()
    records = [{"id": p.name, "source": p.name} for p in list_images(sample_photos())]
    _, held = split_by_source(records, cfg.val_fraction, cfg.split_seed)
    assert sorted(h[:3] for h in held) == ["p09", "p12", "p21"]  # three: the paired test's minimum
    card = (shipped_decoder(get_preset("taef2")) / "README.md").read_text()
    assert "never trained on, never used for the head fit): p09, p12, p14, p17, p21, p25" in card
