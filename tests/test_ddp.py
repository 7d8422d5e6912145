"""DDP on CPU: 2 processes (torchrun, gloo) train the decoder a few steps; both ranks end with identical weights,
and their averaged gradient equals one process's at the same global batch (within float32 rounding); a resume where
one rank's file of the latest checkpoint is damaged takes every rank back to the previous checkpoint.

Run as a script (``python -m torch.distributed.run --nproc_per_node 2 tests/test_ddp.py OUT``) it is the worker;
under pytest it launches that worker and trains the single-process reference itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch


STEPS = 3
PER_RANK_BATCH = 1


def _train(out: Path, batch: int, accelerator=None, steps: int = STEPS, resume: bool = False):
    """Train to `steps` at `batch` per process (or resume to it); the TrainResult."""
    from ldlib.build import codec_of
    from ldlib.core.metrics import lpips_model
    from ldlib.data.datasets import sample_tensor_pairs
    from ldlib.models.losses import DecoderLoss, LossConfig
    from ldlib.presets import get_preset
    from ldlib.train.decoder import TrainConfig, train_decoder

    warnings.simplefilter("ignore")
    # GAN on from step 1: exercises the discriminator under DDP and the cross-rank averaged adaptive weight.
    cfg = TrainConfig(
        preset="tiny", steps=steps, batch=batch, warmup_steps=1, checkpoint_every=1, keep_checkpoints=STEPS, val_every=1000,
        log_every=1, lr=1e-3,
        # The nearest start: a least-squares head fitted on a random tiny decoder's features is ill-conditioned, so
        # the 1 vs 2 threads of these runs' decoder forwards (float32 rounding) move it by ~1e-3 and the step-0
        # gradients with it; what this test checks is DDP's gradient averaging from one start.
        head_init="nearest",
        loss=LossConfig(lpips_net="alex", gan_start=1, gan_warmup=0, disc_channels=8, disc_layers=2),
    )
    codec = codec_of(get_preset("tiny"))
    data = sample_tensor_pairs(codec, count=4, hq_size=32, seed=0)
    return train_decoder(cfg, out, data, None, codec=codec, accelerator=accelerator, resume=resume,
                         loss_fn=DecoderLoss(cfg.loss, lpips=lpips_model("alex")))


def _run(out: Path, batch: int, accelerator=None) -> dict[str, torch.Tensor]:
    """Train STEPS steps at `batch` per process; return this process's live decoder weights."""
    res = _train(out, batch, accelerator)
    return {n: p.detach().clone() for n, p in res.codec2x.named_parameters() if p.requires_grad}


def _worker(out: Path) -> None:
    from safetensors.torch import save_file

    from ldlib.core.runs import make_accelerator

    torch.set_num_threads(1)
    acc = make_accelerator("no")
    if acc.num_processes != 2:
        raise SystemExit(f"expected 2 processes, got {acc.num_processes}")
    weights = _run(out, PER_RANK_BATCH, acc)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / f"rank{acc.process_index}.safetensors"))
    acc.wait_for_everyone()
    # In a copy of the run, rank 1's RNG file of the latest checkpoint is damaged: every rank must resume from the
    # previous checkpoint (one rank on another step would leave DDP's collectives mismatched).
    copy = out.parent / "ddp_resume"
    if acc.is_main_process:
        shutil.copytree(out, copy)
    acc.wait_for_everyone()
    if acc.process_index == 1:
        (copy / "checkpoints" / f"step_{STEPS:06d}" / "rng_1.pt").write_bytes(b"damaged")
    acc.wait_for_everyone()
    res = _train(copy, PER_RANK_BATCH, acc, steps=STEPS + 1, resume=True)
    (out / f"resumed{acc.process_index}.json").write_text(json.dumps([r["step"] for r in res.history]))
    acc.wait_for_everyone()
    acc.end_training()


def test_ddp_two_cpu_processes_match_one(tmp_path):
    from safetensors.torch import load_file

    from ldlib.build import codec_of
    from ldlib.presets import get_preset

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = load_file(str(tmp_path / "ddp" / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "ddp" / "rank1.safetensors"))
    assert r0.keys() == r1.keys() and len(r0) > 0
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks diverged"
    # The resume after rank 1's damaged RNG file: both ranks from the previous checkpoint, the damaged one set aside.
    resumed = [json.loads((tmp_path / "ddp" / f"resumed{r}.json").read_text()) for r in (0, 1)]
    assert resumed == [[STEPS - 1, STEPS]] * 2, resumed
    assert (tmp_path / "ddp_resume" / "checkpoints" / f"unreadable_step_{STEPS:06d}").is_dir()

    single = _run(tmp_path / "single", 2 * PER_RANK_BATCH)
    init = {n: p for n, p in codec_of(get_preset("tiny")).to_2x().named_parameters() if n in single}
    moved = max((single[k] - init[k]).abs().max().item() for k in single)
    assert moved > 1e-4, "training did not move the weights: the comparison would be empty"
    # The gradients: step 0 has lr 0 (warm-up), so AdamW's moments after it hold the global batch's gradient at the
    # initial weights, whatever the split; DDP's averaged gradient must equal the single process's to float32
    # rounding (relative to the largest value). Not the weights: AdamW turns the rounding noise of a gradient that is
    # ~0 in exact arithmetic (attention key biases) into a +-lr step, on how many elements depends on the data.
    from conftest import rel_diff

    def moments(run):
        state = torch.load(run / "checkpoints" / "step_000001" / "optim.pt", weights_only=True)["opt_g"]["state"]
        return {m: torch.cat([state[k][m].flatten() for k in sorted(state)]) for m in ("exp_avg", "exp_avg_sq")}

    ddp, one = moments(tmp_path / "ddp"), moments(tmp_path / "single")
    for m in ddp:
        assert one[m].abs().max() > 0 and rel_diff(ddp[m], one[m]) <= 1e-4, m
    # And the whole run stays within AdamW's bounded step of the single process: at most lr per step per element.
    diff = torch.cat([(single[k] - r0[k]).abs().flatten() for k in single])
    assert diff.max().item() <= 1e-3 * STEPS * 1.01, f"DDP vs single process: max |dw| {diff.max().item():.3g}"
    # The logged terms are the mean over both processes' halves of the global batch, as the single process logs
    # its whole batch (not rank 0's half): history.jsonl, and the TensorBoard scalars and summary.json built from it.
    import pytest

    from ldlib.core.runs import read_history

    ddp_hist, one_hist = read_history(tmp_path / "ddp"), read_history(tmp_path / "single")
    assert [h["step"] for h in ddp_hist] == [h["step"] for h in one_hist] == list(range(STEPS))
    for a, b in zip(ddp_hist, one_hist):
        assert a.keys() == b.keys()
        # Steps 0 and 1 run on the same weights to float rounding (step 0's lr is 0). From step 2 on, the GAN's
        # terms follow the discriminator's AdamW steps on rounding noise (above); the reconstruction terms do not.
        keys = [k for k, v in b.items() if isinstance(v, float)]
        assert {"l1", "lpips", "total", "sigma_mean"} <= set(keys)
        for k in keys if b["step"] < 2 else ("l1", "lpips", "rec", "sigma_mean"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-9), (b["step"], k)
    means = [json.loads((tmp_path / run / "summary.json").read_text())["final_losses_mean_last_steps"]
             for run in ("ddp", "single")]
    for k in ("l1", "lpips", "rec", "sigma_mean"):
        assert means[0][k] == pytest.approx(means[1][k], rel=1e-5), k


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
