"""Export a trained run's EMA decoder as a drop-in 2x decoder folder (+ README with the decode recipe)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .files import atomic_write_bytes

_README_WAN = """# 2x decoder (exported by ldlib)

An `AutoencoderKLWan` whose decoder's last conv has 12 output channels (the "Wan2.1 VAE upscale 2x" format):
the encoder is the original, the decoder was fine-tuned to output 2x resolution from (diffusion-degraded) latents.
Trained by `ldlib` run `{run}` (step {step}, preset `{preset}`, EMA weights).

```python
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

vae = AutoencoderKLWan.from_pretrained("{folder}")
# latents: what a Wan pipeline produces (normalised), N x 16 x T x h x w -> raw VAE latents
mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
with torch.no_grad():
    x = vae.decode(latents * std + mean).sample           # N x 12 x T x 8h x 8w
n, c, t, h, w = x.shape
r = round((c / 3) ** 0.5)                                  # upscale factor from the channel count: 2
x = F.pixel_shuffle(x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w), r)
video = x.reshape(n, t, 3, r * h, r * w).permute(0, 2, 1, 3, 4)   # N x 3 x T x 16h x 16w in [-1, 1]
```
"""

_README_TAE = """# 2x decoder (exported by ldlib)

A TAESD-format decoder whose last conv has 12 output channels: apply `pixel_shuffle(2)` to its output.
`encoder.safetensors` is the original encoder, `decoder.safetensors` the fine-tuned 2x decoder (TAESD key layout),
`config.json` the latent scaling. Trained by `ldlib` run `{run}` (step {step}, preset `{preset}`, EMA weights).

```python
import torch
import torch.nn.functional as F
from ldlib.codecs import TAECodec

codec = TAECodec.from_folder("{folder}")
with torch.no_grad():
    image = codec.decode(latents)                          # N x 3 x 16h x 16w in [-1, 1] (pixel_shuffle inside)

# Without ldlib: TAESD's Decoder() with its last conv widened to 12 channels, then
# F.pixel_shuffle(decoder(raw_latents), 2) gives [0, 1] RGB at 2x (raw = latents / scaling_factor + shift_factor).
```
"""


EXPORT_MARKER = "ldlib_export.json"


def export_folder(run: str | os.PathLike, out: str | os.PathLike):
    """A new folder to write an export of run into, swapped into out when the block succeeds (replaced_folder).

    Refuses an out that is the run, holds it or lies in its checkpoints (replacing it would destroy the run), and
    an out holding anything but a previous export (EXPORT_MARKER): its files would be mixed with the export's.
    """
    from .files import replaced_folder

    r, o = Path(run).resolve(), Path(out).resolve()
    if o == r or o in r.parents:
        raise ValueError(f"{out}: would replace the run {run} itself; export into a folder outside the run")
    if o == r / "checkpoints" or r / "checkpoints" in o.parents:
        raise ValueError(f"{out}: is inside the run's checkpoints; export into another folder")
    return replaced_folder(out, EXPORT_MARKER)


def export_run(run: str | os.PathLike, out: str | os.PathLike, ema: bool = True) -> Path:
    """Write the run's (EMA) 2x decoder into out: a diffusers folder (wan/kl) or TAESD files (tae), + README.md.

    out must be new, empty or a previous export, which is replaced whole (see export_folder).
    """
    with export_folder(run, out) as folder:
        _write_export(run, folder, ema, final=Path(out))
    return Path(out)


def _write_export(run: str | os.PathLike, out: str | os.PathLike, ema: bool, final: Path) -> Path:
    """The export's files, written into out (a staging folder that becomes final)."""
    from .decoder import load_run_codec, run_checkpoint

    run, out = Path(run), Path(out)
    ckpt = run_checkpoint(run, ema)
    codec, cfg = load_run_codec(run, ema=ema, checkpoint=ckpt)
    if not hasattr(codec, "save_pretrained"):
        raise ValueError(f"{run}: codec family {codec.family!r} has no export format")
    codec.save_pretrained(out)
    step = json.loads((ckpt / "state.json").read_text())["step"]
    template = _README_TAE if codec.family == "tae" else _README_WAN
    atomic_write_bytes(out / "README.md", template.format(run=run, step=step, preset=cfg["preset"], folder=final).encode())
    info = {"run": str(run), "checkpoint": str(ckpt), "step": step, "preset": cfg["preset"], "family": codec.family,
            "weights": "ema" if ema else "live", "upscale": codec.upscale}
    atomic_write_bytes(out / EXPORT_MARKER, json.dumps(info, indent=2).encode())
    return out
