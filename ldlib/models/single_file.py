"""Single-file VAE checkpoints: the original Wan 2.1 layout (write and read), and loading any single file offline.

The published "Wan2.1 VAE upscale 2x" decoder, the Wan 2.1 VAE itself and the Qwen-Image VAE are distributed as one
``.safetensors`` in the layout of the original Wan code (``encoder.conv1``, ``encoder.downsamples.N``,
``decoder.upsamples.N.residual.M``, ``decoder.head.2``, ``conv1`` / ``conv2`` for quant / post-quant). ComfyUI reads
that layout and takes the decoder's output channels from ``decoder.head.2.weight`` (12 channels: a 2x decoder);
diffusers reads it with ``AutoencoderKLWan.from_single_file`` through ``convert_wan_vae_to_diffusers``.

``to_original_wan`` is the inverse of that converter, derived from the original code's module order (the decoder's
``upsamples`` is one flat Sequential: per stage ``num_res_blocks + 1`` residual blocks, then a resample). The
converter hard-codes the Wan 2.1 block indices, so only VAEs of that architecture (4 stages of 3 decoder residual
blocks, no attention outside the middle block: every Wan 2.1 / Qwen-Image VAE) can be written;
``original_wan_state_dict`` checks every file it writes by running diffusers' converter on it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ..core.files import atomic_write_file


SINGLE_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")

# Residual block: diffusers' attribute names -> the original nn.Sequential indices (RMS_norm, SiLU, conv, ...).
_RESIDUAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
             "conv_shortcut": "shortcut"}
_MIDDLE = {"resnets.0": "middle.0", "attentions.0": "middle.1", "resnets.1": "middle.2"}


class LayoutError(ValueError):
    """A VAE (or a file) that the original Wan 2.1 single-file layout cannot represent."""


def _residual_rest(rest: str) -> str:
    """``norm1.gamma`` -> ``residual.0.gamma`` etc. (the tail of a residual block's key)."""
    head, _, tail = rest.partition(".")
    if head not in _RESIDUAL:
        raise LayoutError(f"unexpected residual block parameter {rest!r}")
    return f"{_RESIDUAL[head]}.{tail}"


def _decoder_flat_index(config: dict) -> dict[tuple[int, str], int]:
    """(up_block i, 'resnets.j' | 'upsamplers.0') -> index in the original decoder's flat ``upsamples``."""
    stages = len(config["dim_mult"])
    n_res = int(config["num_res_blocks"]) + 1
    flat, index = {}, 0
    for i in range(stages):
        for j in range(n_res):
            flat[(i, f"resnets.{j}")] = index
            index += 1
        if i != stages - 1:
            flat[(i, "upsamplers.0")] = index
            index += 1
    return flat


def _check_wan21(config: dict) -> None:
    """Raise LayoutError for VAE configs the original Wan 2.1 layout (and diffusers' converter) cannot express."""
    problems = []
    if config.get("is_residual"):
        problems.append("is_residual=True (a Wan 2.2-style VAE)")
    if config.get("patch_size") is not None:
        problems.append(f"patch_size={config['patch_size']}")
    if config.get("attn_scales"):
        problems.append(f"attn_scales={config['attn_scales']}")
    if config.get("decoder_base_dim") not in (None, config.get("base_dim")):
        problems.append(f"decoder_base_dim={config['decoder_base_dim']}")
    if problems:
        raise LayoutError("the original Wan 2.1 layout has no place for " + ", ".join(problems))


def to_original_wan(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKLWan`` / ``AutoencoderKLQwenImage`` state dict -> the original Wan 2.1 key layout."""
    _check_wan21(config)
    flat = _decoder_flat_index(config)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        side, _, rest = key.partition(".")
        if key.startswith("quant_conv."):
            new = "conv1." + key[len("quant_conv."):]
        elif key.startswith("post_quant_conv."):
            new = "conv2." + key[len("post_quant_conv."):]
        elif side in ("encoder", "decoder"):
            new = f"{side}." + _side_key(side, rest, flat)
        else:
            raise LayoutError(f"unexpected parameter {key!r} for the original Wan 2.1 layout")
        if new in out:
            raise LayoutError(f"two parameters map to {new!r}")
        out[new] = value
    return out


def _side_key(side: str, rest: str, flat: dict[tuple[int, str], int]) -> str:
    """The original name of an encoder/decoder parameter (without the side prefix)."""
    if rest.startswith("conv_in."):
        return "conv1." + rest[len("conv_in."):]
    if rest.startswith("norm_out."):
        return "head.0." + rest[len("norm_out."):]
    if rest.startswith("conv_out."):
        return "head.2." + rest[len("conv_out."):]
    if rest.startswith("mid_block."):
        parts = rest.split(".")  # mid_block, resnets|attentions, k, ...
        mid = _MIDDLE.get(f"{parts[1]}.{parts[2]}")
        if mid is None:
            raise LayoutError(f"unexpected middle block parameter {side}.{rest!r}")
        tail = ".".join(parts[3:])
        return f"{mid}.{_residual_rest(tail) if parts[1] == 'resnets' else tail}"
    if side == "encoder" and rest.startswith("down_blocks."):
        _, n, tail = rest.split(".", 2)  # flat in both layouts (Wan 2.1): residual blocks and resamples
        head = tail.partition(".")[0]
        return f"downsamples.{n}.{_residual_rest(tail) if head in _RESIDUAL else tail}"
    if side == "decoder" and rest.startswith("up_blocks."):
        _, i, kind, j, tail = rest.split(".", 4)
        index = flat.get((int(i), f"{kind}.{j}"))
        if index is None:
            raise LayoutError(f"unexpected decoder block parameter decoder.{rest!r}")
        return f"upsamples.{index}.{_residual_rest(tail) if kind == 'resnets' else tail}"
    raise LayoutError(f"unexpected parameter {side}.{rest!r} for the original Wan 2.1 layout")


def original_wan_state_dict(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A Wan-architecture diffusers VAE's weights in the original layout, checked against diffusers' converter.

    The check: ``convert_wan_vae_to_diffusers`` (what ``AutoencoderKLWan.from_single_file`` runs) must give back
    the model's own state dict key for key; a config whose block indices the converter hard-codes differently
    (e.g. ``num_res_blocks != 2``) is refused here instead of producing a file that loads scrambled.
    """
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    config = dict(vae.config)
    ours = {k: v.detach() if v.is_meta else v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    original = to_original_wan(ours, config)
    back = convert_wan_vae_to_diffusers(dict(original))
    # The converter passes tensors through, so the round trip must hand every key its own tensor back.
    if set(back) != set(ours) or any(back[k] is not ours[k] for k in ours):
        bad = sorted(set(back) ^ set(ours))[:3] or [k for k in ours if back[k] is not ours[k]][:3]
        raise LayoutError(
            "diffusers' Wan single-file converter (and ComfyUI) assume the Wan 2.1 architecture (dim_mult "
            f"[1, 2, 4, 4], num_res_blocks 2); this VAE (dim_mult {config.get('dim_mult')}, num_res_blocks "
            f"{config.get('num_res_blocks')}) would load scrambled (e.g. {bad})"
        )
    return original


def save_original_wan(
    vae: torch.nn.Module,
    path: str | os.PathLike,
    metadata: dict | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the VAE as one safetensors file in the original Wan 2.1 layout (atomically).

    ``state_dict``: the VAE's ``original_wan_state_dict`` when the caller already has it (checked there).
    """
    from safetensors.torch import save_file


    path = Path(path)
    sd = state_dict if state_dict is not None else original_wan_state_dict(vae)
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    atomic_write_file(path, lambda tmp: save_file(sd, str(tmp), metadata=meta))
    return path


# ------------------------------------------------------------------------------------------------------------
# reading single files
# ------------------------------------------------------------------------------------------------------------


def published_config(cls) -> dict:
    """The defaults of a diffusers VAE class's ``__init__``: for AutoencoderKLWan / AutoencoderKLQwenImage, the
    published Wan 2.1 / Qwen-Image VAE configs (base_dim 96, dim_mult [1, 2, 4, 4], their latents_mean/std)."""
    import copy
    import inspect

    params = inspect.signature(cls.__init__).parameters
    return copy.deepcopy({k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty})


def is_single_file(source: str | os.PathLike) -> bool:
    """Whether a VAE source names one weights file (rather than a diffusers folder or a hub id)."""
    return Path(source).suffix.lower() in SINGLE_FILE_SUFFIXES


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A weights file's tensors (safetensors, or a pickle read with ``weights_only=True``); clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and why, in one line
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from e
    while isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return sd


def config_dict(config: str | os.PathLike | dict, cls) -> dict:
    """A diffusers config as a dict, from a dict, a config.json, a VAE folder, or a pipeline folder (vae/)."""
    if isinstance(config, dict):
        return dict(config)
    p = Path(config)
    for candidate in (p, p / "config.json", p / "vae" / "config.json"):
        if candidate.is_file():
            return dict(cls.load_config(str(candidate.parent)))
    raise FileNotFoundError(f"{p}: no diffusers config.json there (nor in {p / 'vae'})")


def load_single_file_vae(
    cls,
    path: str | os.PathLike,
    config: str | os.PathLike | dict | None = None,
    default_config: dict | None = None,
    torch_dtype: torch.dtype = torch.float32,
):
    """A diffusers VAE of class ``cls`` from one file, offline: ``cls.from_single_file`` with a local config.

    ``config`` is a diffusers VAE folder, a pipeline folder (``vae/``), a ``config.json`` or a dict; without it
    ``default_config`` (the family's published architecture) is used. The decoder's output channels are read off
    the file (``decoder.head.2.weight`` / ``decoder.conv_out.weight``), so a 2x file loads as a 2x model.
    from_single_file reads pickles with ``weights_only=True``; its own config lookup would need the hub, so the
    config is always given as a local folder.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such VAE file")
    if config is None and default_config is None:
        raise ValueError(
            f"{path}: a single file holds no architecture; pass its config (--vae-config DIR: a diffusers VAE "
            "folder or config.json of the same architecture)"
        )
    cfg = config_dict(config, cls) if config is not None else dict(default_config)
    head = _output_channels(path)
    if head is not None:
        cfg["out_channels"] = head
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    with tempfile.TemporaryDirectory(prefix="ldlib_vae_config_") as tmp:
        cfg_json = {"_class_name": cls.__name__, **cfg}
        (Path(tmp) / "config.json").write_text(json.dumps(cfg_json))
        try:
            vae = cls.from_single_file(str(path), config=tmp, local_files_only=True, torch_dtype=torch_dtype)
        except (RuntimeError, ValueError, KeyError) as e:
            origin = f"the config in {config}" if config is not None else "the built-in published config"
            raise ValueError(
                f"{path}: does not load as {cls.__name__} with {origin} ({type(e).__name__}: {str(e)[:200]}); "
                "pass --vae-config DIR (a diffusers VAE folder or config.json of the file's architecture)"
            ) from e
    return vae.eval()


def _output_channels(path: Path) -> int | None:
    """The decoder head's output channels stored in a single file, or None when it has no known head key."""
    keys = ("decoder.head.2.weight", "decoder.conv_out.weight", "first_stage_model.decoder.conv_out.weight")
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                for k in keys:
                    if k in f.keys():
                        return int(f.get_slice(k).get_shape()[0])
        except Exception as e:
            raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
        return None
    sd = read_state_dict(path)
    for k in keys:
        if k in sd:
            return int(sd[k].shape[0])
    return None
