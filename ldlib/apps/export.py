"""Export a trained run's EMA (or live) decoder as a drop-in 2x decoder folder (+ README with the decode recipe), or a
train-latent-upscaler run's latent upscaler as a float16 folder (how ldlib ships one)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..core.files import WriteError, atomic_write_bytes, is_write_failure, write_reason


_README_WAN = """# 2x decoder (exported by ldlib)

An `AutoencoderKLWan` whose decoder's last conv has 12 output channels (the "Wan2.1 VAE upscale 2x" format):
the encoder is the original, the decoder was fine-tuned to output 2x resolution from (diffusion-degraded) latents.
Trained by `ldlib` run `{run}` (step {step}, preset `{preset}`, {weights}).

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
`config.json` the latent scaling. Trained by `ldlib` run `{run}` (step {step}, preset `{preset}`, {weights}).

```python
import torch
import torch.nn.functional as F
from ldlib.models.codecs import TAECodec

codec = TAECodec.from_folder("{folder}")
with torch.no_grad():
    image = codec.decode(latents)                          # N x 3 x 16h x 16w in [-1, 1] (pixel_shuffle inside)

# Without ldlib: TAESD's Decoder() with its last conv widened to 12 channels, then
# F.pixel_shuffle(decoder(raw_latents), 2) gives [0, 1] RGB at 2x (raw = latents / scaling_factor + shift_factor).
```
"""

_README_TAE_DECODER = """# 2x decoder (exported by ldlib)

A TAESD-format decoder whose last conv has 12 output channels (apply `pixel_shuffle(2)` to its output), stored in
float16 without an encoder: its encoder is the original one of the VAE it was trained on (`ldlib_export.json`
records that encoder's hash). Trained by `ldlib` run `{run}` (step {step}, preset `{preset}`, {weights}).

```python
import torch
from ldlib.models.codecs import TAECodec

codec = TAECodec.from_folder("{folder}", encoder_folder="ldlib/assets/taef2")  # the VAE's own encoder
with torch.no_grad():
    image = codec.decode(latents)                          # N x 3 x 16h x 16w in [-1, 1] (pixel_shuffle inside)
```
"""

_README_LATENT_UPSCALER = """# Latent 2x upscaler (exported by ldlib)

A latent upscaler for preset `{preset}` ({channels} x h x w -> {channels} x 2h x 2w in its normalised latent space;
width {width}, depth {depth}, {params:.2f}M parameters, stored in float16): a hires fix without leaving latent space.
Trained by `ldlib` run `{run}` ({steps} steps{start}). It refuses the latents of another VAE (`config.json` records the
codec identity it was trained in).

```bash
python -m ldlib upscale-latents z.safetensors --model {folder} --preset {preset}   # writes z_2x.safetensors
python -m ldlib evaluate-latent-upscaler TESTPAIRS --model {folder} --preset {preset}
```
```python
from ldlib.build import load_latent_upscaler
from ldlib.presets import get_preset

net, info = load_latent_upscaler("{folder}", get_preset("{preset}"))
z2 = net(z)                                   # N x {channels} x h x w normalised latents -> N x {channels} x 2h x 2w
```
"""

_README_QWEN = """# 2x decoder for Qwen-Image (exported by ldlib)

The Qwen-Image VAE with its decoder's last conv widened to 12 output channels (apply `pixel_shuffle(2)`), fine-tuned
by `ldlib` run `{run}` (step {step}, preset `{preset}`, {weights}). `AutoencoderKLQwenImage`'s config cannot
express a decoder with 12 output channels and an encoder with 3 input channels, so this folder is an
`AutoencoderKLWan` (the same architecture and weight names) with Qwen-Image's config values:

```python
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

vae = AutoencoderKLWan.from_pretrained("{folder}")
mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
with torch.no_grad():
    x = vae.decode(latents * std + mean).sample[:, :, 0]   # Qwen-Image latents N x 16 x 1 x h x w -> N x 12 x 8h x 8w
image = F.pixel_shuffle(x, 2)                               # N x 3 x 16h x 16w in [-1, 1]
```
"""

_README_KL = """# 2x decoder (exported by ldlib)

A diffusers `{cls}` whose decoder's last conv has 12 output channels: apply `pixel_shuffle(2)` to its output.
The encoder is the original, the decoder was fine-tuned by `ldlib` run `{run}` (step {step}, preset `{preset}`,
{weights}).

```python
import torch
import torch.nn.functional as F
from diffusers import {cls}

vae = {cls}.from_pretrained("{folder}")
with torch.no_grad():
    image = F.pixel_shuffle(vae.decode(raw_latents).sample, 2)   # N x 3 x 16h x 16w, in [-1, 1] after clamp
```
`raw_latents` are the VAE's own latents: undo the pipeline's normalisation first ({normalisation}).
"""

_NORMALISATION = {
    "AutoencoderKL": "`latents / scaling_factor + shift_factor` with the values in config.json",
    "AutoencoderKLFlux2": "as Flux2Pipeline does: `latents * sqrt(bn.running_var + batch_norm_eps) + bn.running_mean` "
    "on the 2x2-patchified latents, then unpatchify",
}

_README_WAN_FILE = """
## One file in the original Wan 2.1 layout: `{file}`

The same VAE as one safetensors file in the layout the Wan 2.1 VAE is distributed in (the original Wan code's
names: `encoder.conv1`, `decoder.upsamples.N.residual.M`, `decoder.head.2`, `conv1` / `conv2`), encoder
included. `decoder.head.2.weight` has 12 output channels: that is how loaders recognise a 2x decoder.

- diffusers: `AutoencoderKLWan.from_single_file("{folder}/{file}", config="{folder}")` (the config is this
  folder's `config.json`, so nothing is downloaded); decode and `pixel_shuffle(2)` as above.
- ComfyUI: copy the file to `ComfyUI/models/vae/` and load it with the Load VAE node, which reads the decoder's
  output channels from `decoder.head.2.weight` (on ComfyUI versions that do not, the "Load VAE (VAE Utils)" and
  "VAE Decode (VAE Utils)" nodes of ComfyUI-VAE-Utils do, and apply the pixel shuffle).
- The original Wan code: `WanVAE_` with the decoder head's last conv built with 12 output channels, then
  `load_state_dict`.
"""

EXPORT_MARKER = "ldlib_export.json"


def export_folder(run: str | os.PathLike, out: str | os.PathLike):
    """A new folder to write an export of run into, swapped into out when the block succeeds (replaced_folder).

    Refuses an out that is the run, holds it or lies in its checkpoints (replacing it would destroy the run), and
    an out holding anything but a previous export (EXPORT_MARKER): its files would be mixed with the export's.
    """
    from ..core.files import replaced_folder

    r, o = Path(run).resolve(), Path(out).resolve()
    if o == r or o in r.parents:
        raise ValueError(f"{out}: would replace the run {run} itself; export into a folder outside the run")
    if o == r / "checkpoints" or r / "checkpoints" in o.parents:
        raise ValueError(f"{out}: is inside the run's checkpoints; export into another folder")
    return replaced_folder(out, EXPORT_MARKER)


FORMATS = ("diffusers", "wan", "tae", "tae-decoder", "latent-upscaler")
# Written only when asked: the 2x decoder alone in float16, to sit beside its VAE's own encoder (how ldlib ships
# taef2's); it writes the same file names as "tae", so the two are not combined.
ASKED_ONLY = ("tae-decoder",)


def formats_for(family: str) -> tuple[str, ...]:
    """The export formats that apply to a codec family (all but ``ASKED_ONLY``: the default of ``export_run``)."""
    table = {"wan": ("diffusers", "wan"), "qwenimage": ("diffusers", "wan"), "kl": ("diffusers",),
             "flux2": ("diffusers",), "tae": ("tae", "tae-decoder")}
    if family not in table:
        raise ValueError(f"codec family {family!r} has no export format")
    return table[family]


def wan_file_name(preset: str) -> str:
    """File name of the original-layout single file (what users see in ComfyUI's VAE list)."""
    return f"{preset}_vae_upscale2x.safetensors"


def export_run(
    run: str | os.PathLike, out: str | os.PathLike, ema: bool = True, formats: tuple[str, ...] | list[str] | None = None
) -> Path:
    """Write the run's 2x decoder (EMA, or live weights: ema=False) into out in each format (default: all), README.

    ``diffusers``: a ``from_pretrained`` folder (wan, qwenimage, kl, flux2); ``wan``: one safetensors file in the
    original Wan 2.1 layout (wan, qwenimage; with the folder's ``config.json`` for ``from_single_file``);
    ``tae``: TAESD files. A format that does not apply to the run's family is an error; by default ``wan`` is
    skipped (and said so in ``ldlib_export.json``) for Wan VAEs of another architecture than Wan 2.1's.
    ``latent-upscaler``: a train-latent-upscaler run's upscaler in float16 (the only format of such a run).
    out must be new, empty or a previous export, which is replaced whole (see export_folder).
    """
    from ..build import is_latent_upscaler_run

    write = _write_latent_upscaler if is_latent_upscaler_run(run) else _write_export
    try:
        with export_folder(run, out) as folder:
            write(run, folder, ema, final=Path(out), formats=formats)
    except Exception as e:
        if not is_write_failure(e) or isinstance(e, FileNotFoundError):
            raise
        # The half-written staging folder is gone (replaced_folder); what out held before is untouched.
        kept = "the previous export there is unchanged" if Path(out).exists() else "nothing was written"
        raise WriteError(getattr(e, "errno", None) or 5, f"{out}: export not written ({write_reason(e)}); {kept}") from e
    return Path(out)


def _write_export(run: str | os.PathLike, out: str | os.PathLike, ema: bool, final: Path,
                  formats: tuple[str, ...] | list[str] | None = None) -> Path:
    """The export's files, written into out (a staging folder that becomes final)."""
    from ..build import load_run_codec, run_checkpoint, run_split
    from ..models.single_file import LayoutError, original_wan_state_dict, save_original_wan

    run, out = Path(run), Path(out)
    ckpt = run_checkpoint(run, ema)
    codec, cfg = load_run_codec(run, ema=ema, checkpoint=ckpt)
    applicable = formats_for(codec.family)
    asked = tuple(dict.fromkeys(formats)) if formats else None
    for f in asked or ():
        if f not in FORMATS:
            raise ValueError(f"unknown export format {f!r}; choose from {', '.join(FORMATS)}")
        if f not in applicable:
            raise ValueError(f"{run}: format {f!r} does not apply to a {codec.family} decoder (it has: {', '.join(applicable)})")
    if asked and "tae" in asked and "tae-decoder" in asked:
        raise ValueError("formats 'tae' and 'tae-decoder' write the same files: ask for one of them")
    todo = [f for f in applicable if f in (asked or [a for a in applicable if a not in ASKED_ONLY])]
    step = json.loads((ckpt / "state.json").read_text())["step"]
    skipped: dict[str, str] = {}
    vae = codec.as_wan_vae() if codec.family == "qwenimage" else getattr(codec, "vae", None)
    original = None
    if "wan" in todo:
        try:
            original = original_wan_state_dict(vae)  # checked against diffusers' converter before anything is written
        except LayoutError as e:
            if asked:
                raise ValueError(f"{run}: cannot export format 'wan': {e}") from e
            todo.remove("wan")
            skipped["wan"] = str(e)
    weights = "EMA weights" if ema else "live weights (export --live)"
    fmt = dict(run=run, step=step, preset=cfg["preset"], folder=final, weights=weights)
    readme, files = [], []
    if "diffusers" in todo:
        codec.save_pretrained(out)
        files += ["config.json", "diffusion_pytorch_model.safetensors"]
        if codec.family == "wan":
            readme.append(_README_WAN.format(**fmt))
        elif codec.family == "qwenimage":
            readme.append(_README_QWEN.format(**fmt))
        else:
            cls = type(codec.vae).__name__
            readme.append(_README_KL.format(cls=cls, normalisation=_NORMALISATION.get(cls, "see the pipeline"), **fmt))
    if "tae" in todo:
        codec.save_pretrained(out)
        files += ["encoder.safetensors", "decoder.safetensors", "config.json"]
        readme.append(_README_TAE.format(**fmt))
    if "tae-decoder" in todo:
        codec.save_pretrained(out, decoder_only=True, dtype=torch.float16)
        files += ["decoder.safetensors", "config.json"]
        readme.append(_README_TAE_DECODER.format(**fmt))
    if "wan" in todo:
        name = wan_file_name(cfg["preset"])
        if "diffusers" not in todo:  # from_single_file needs the config beside it
            vae.save_config(out)
            files.append("config.json")
            readme.append(f"# 2x decoder (exported by ldlib)\n\nTrained by `ldlib` run `{run}` (step {step}, preset "
                          f"`{cfg['preset']}`, {weights}); decode with `pixel_shuffle(2)` of the 12-channel "
                          "output.\n")
        save_original_wan(vae, out / name, metadata={"ldlib_run": run, "step": step, "upscale": codec.upscale},
                          state_dict=original)
        files.append(name)
        readme.append(_README_WAN_FILE.format(file=name, folder=final))
    atomic_write_bytes(out / "README.md", "\n".join(readme).encode())
    # The run's held-out split: evaluating the export on its "held-out" pairs must not score its training photos.
    val_fraction, split_seed = run_split(cfg)
    info = {"run": str(run), "checkpoint": str(ckpt), "step": step, "preset": cfg["preset"], "family": codec.family,
            "weights": "ema" if ema else "live", "upscale": codec.upscale, "formats": todo,
            "files": sorted(set(files)), "skipped_formats": skipped,
            "vae": cfg.get("vae"), "vae_config": cfg.get("vae_config"), "val_fraction": val_fraction,
            "split_seed": split_seed, "encoder_sha256": codec.identity()["encoder_sha256"]}
    atomic_write_bytes(out / EXPORT_MARKER, json.dumps(info, indent=2).encode())
    return out


def _write_latent_upscaler(run: str | os.PathLike, out: str | os.PathLike, ema: bool, final: Path,
                           formats: tuple[str, ...] | list[str] | None = None) -> Path:
    """A train-latent-upscaler run's upscaler, in float16, into out (a staging folder that becomes final)."""
    from ..build import latent_upscaler_folder
    from ..models.latent_upscaler import load_latent_upscaler, save_latent_upscaler

    if not ema:
        raise ValueError(f"{run}: a latent upscaler run keeps no EMA; export it without --live")
    if formats and set(formats) != {"latent-upscaler"}:
        raise ValueError(f"{run}: a latent upscaler run exports as 'latent-upscaler' only (asked: {', '.join(formats)})")
    run, out = Path(run), Path(out)
    net, info = load_latent_upscaler(latent_upscaler_folder(run))
    kept = {k: v for k, v in info.items() if k not in ("format", "config", "dtype")}
    save_latent_upscaler(net, out, {**kept, "exported_from": str(run)}, dtype=torch.float16)
    steps = info.get("steps", "?")
    init = (info.get("training") or {}).get("init_from")
    start = f", started from `{init}`" if init else ""
    atomic_write_bytes(out / "README.md", _README_LATENT_UPSCALER.format(
        preset=info.get("preset", "?"), run=run, steps=steps, folder=final, start=start,
        params=sum(p.numel() for p in net.parameters()) / 1e6, **net.config).encode())
    doc = {"run": str(run), "preset": info.get("preset"), "formats": ["latent-upscaler"],
           "files": ["README.md", "config.json", "latent_upscaler.safetensors"]}
    atomic_write_bytes(out / EXPORT_MARKER, json.dumps(doc, indent=2).encode())
    return out
