"""The 2x decoder as a trainable module.

A 2x decoder is a codec whose decoder's last conv outputs 12 channels (``codec.to_2x()``, then
``pixel_shuffle(2)``). Loading a trained one from a run folder or an exported folder is ``ldlib.build``'s
(``load_run_codec``, ``load_decoder``): training, evaluation, export and upscaling all load it from there.
"""

from __future__ import annotations

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
