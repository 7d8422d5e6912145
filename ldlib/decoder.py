"""The 2x decoder: the trainable module, and loading a trained one from a run folder or an exported folder.

A 2x decoder is a codec whose decoder's last conv outputs 12 channels (``codec.to_2x()``, then
``pixel_shuffle(2)``). Training, evaluation, export and upscaling all load it from here, never from the loop.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn


class TwoXDecoder(nn.Module):
    """The trainable module: ``forward(latents) = codec.decode(latents, clamp=False)`` of a 2x codec.

    Owns the codec (encoder frozen), so accelerate/DDP wrap one module whose trainable parameters are exactly
    ``codec.decoder_parameters()``.
    """

    def __init__(self, codec) -> None:
        super().__init__()
        if codec.upscale != 2:
            raise ValueError(f"TwoXDecoder needs a 2x codec (codec.to_2x()), got upscale {codec.upscale}")
        self.codec = codec
        codec.requires_grad_(False)
        for p in codec.decoder_parameters():
            p.requires_grad_(True)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the decoder's activations in backward (the codec knows how for its family)."""
        self.codec.enable_gradient_checkpointing()

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw (unclamped) 2x decode: a clamp has no gradient on saturated pixels."""
        return self.codec.decode(latents, clamp=False)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Name -> tensor of the trainable (decoder) parameters."""
        return {n: p for n, p in self.codec.named_parameters() if p.requires_grad}

    def load_trainable_state(self, sd: dict[str, torch.Tensor], origin: str = "checkpoint") -> None:
        """Copy decoder parameters in by name; a missing or extra name is an error naming it."""
        own = self.trainable_state()
        check_finite_weights(sd.items(), origin)
        missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or extra:
            raise ValueError(f"{origin}: decoder weights do not match this codec (missing {missing[:3]}, extra {extra[:3]})")
        with torch.no_grad():
            for n, p in own.items():
                if p.shape != sd[n].shape:
                    raise ValueError(f"{origin}: {n} has shape {tuple(sd[n].shape)}, expected {tuple(p.shape)}")
                p.copy_(sd[n].to(p))


def check_finite_weights(named, origin: str) -> None:
    """ValueError naming origin and the first tensor of (name, tensor) pairs that holds a NaN or inf.

    A diverged run's weights decode every latent to NaN (an all-black PNG once clamped and saved): never train on,
    export or upscale with them.
    """
    for name, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{origin}: weight {name} is not finite (NaN or inf): these weights come from a "
                             "diverged run and decode nothing; train again with a lower lr")


def read_run_config(run: str | os.PathLike) -> dict:
    """The config.json of a training run folder (the TrainConfig as a dict)."""
    path = Path(run) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: not a training run (no config.json)")
    return json.loads(path.read_text())


def run_checkpoint(run: str | os.PathLike, ema: bool = True) -> Path:
    """The newest checkpoint of a run whose (EMA or live) decoder weights read back whole."""
    import sys

    from .runs import CheckpointManager

    found = CheckpointManager(Path(run) / "checkpoints").load_intact(
        ["ema" if ema else "decoder"], restore_rng=False, with_objects=False,
        warn=lambda msg: print(msg, file=sys.stderr))
    if found is None:
        raise FileNotFoundError(f"{run}: no checkpoint yet (the run stopped before its first checkpoint_every steps)")
    return found[0]


def load_run_codec(run: str | os.PathLike, ema: bool = True, checkpoint: str | os.PathLike | None = None):
    """The trained 2x codec of a run folder (EMA weights by default) and the run's config (a dict)."""
    from .presets import get_preset, vae_overrides
    from .runs import load_safetensors

    run = Path(run)
    cfg = read_run_config(run)
    path = Path(checkpoint) if checkpoint else run_checkpoint(run, ema)
    codec = get_preset(cfg["preset"], taef2_path=cfg.get("taef2_dir"), **vae_overrides(cfg)).load_codec()
    model = TwoXDecoder(codec.to_2x())
    model.load_trainable_state(load_safetensors(path / ("ema.safetensors" if ema else "decoder.safetensors")), str(path))
    return model.codec.requires_grad_(False).eval(), cfg


def run_split(cfg: dict) -> tuple[float | None, int | None]:
    """(val_fraction, split seed) of the held-out split a run's config trained with (TrainConfig.held_out_seed)."""
    seed = cfg.get("split_seed") if cfg.get("split_seed") is not None else cfg.get("seed")
    return cfg.get("val_fraction"), seed


def _is_run(path: Path) -> bool:
    """A train-decoder run folder: checkpoints/, or the config.json of a run stopped before its first checkpoint."""
    if (path / "checkpoints").is_dir():
        return True
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "preset" in cfg and "loss" in cfg and "_class_name" not in cfg


def _export_family(path: Path) -> str | None:
    """The codec family of an exported decoder folder (ldlib_export.json, else config.json), None when unknown.

    ldlib's record comes first: a Qwen-Image 2x decoder is saved as an AutoencoderKLWan folder.
    """
    try:
        family = json.loads((path / "ldlib_export.json").read_text()).get("family")
        if family:
            return family
    except (OSError, ValueError, AttributeError):
        pass
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    names = {"AutoencoderKLWan": "wan", "AutoencoderKL": "kl", "AutoencoderKLQwenImage": "qwenimage",
             "AutoencoderKLFlux2": "flux2"}
    return names.get(cfg.get("_class_name"), cfg.get("family")) if isinstance(cfg, dict) else None


def load_decoder(model: str | os.PathLike, preset) -> tuple[object, dict]:
    """A 2x codec from a training run folder (EMA weights) or an exported folder, and what was loaded."""
    from .codecs import TAECodec, load_codec

    path = Path(model)
    if _is_run(path):
        codec, cfg = load_run_codec(path)
        val_fraction, seed = run_split(cfg)
        return codec, {"model": str(path), "kind": "run", "val_fraction": val_fraction, "seed": seed,
                       "made_with_preset": cfg.get("preset")}
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: neither a training run (config.json, checkpoints/) nor an exported "
                                "decoder folder (config.json and weights)")
    family = _export_family(path) or preset.family
    record = json.loads((path / "ldlib_export.json").read_text()) if (path / "ldlib_export.json").is_file() else {}
    made_with = record.get("preset")
    if family != preset.family:
        raise ValueError(f"{path}: a {family} decoder{f' (preset {made_with!r})' if made_with else ''}, but "
                         f"--preset {preset.name!r} is a {preset.family} VAE: its latents do not fit this decoder")
    codec = TAECodec.from_folder(path) if family == "tae" else load_codec(family, path)
    check_finite_weights(codec.named_parameters(), str(path))
    if codec.upscale != 2:
        raise ValueError(f"{path}: decoder outputs {codec.upscale}x, expected a 2x decoder")
    # The run's held-out split (exports made before ldlib recorded it, or not by ldlib, have none: None).
    return codec.eval(), {"model": str(path), "kind": "export", "val_fraction": record.get("val_fraction"),
                          "seed": record.get("split_seed"), "made_with_preset": made_with}
