"""The trained teacher's folder: a small flow-matching ``WanTransformer3DModel`` (fp16), its fixed prompt
embedding and ``teacher.json`` (codec identity of its latent space, its config, sources). Written by
``ldlib.train.teacher``, loaded by ``ldlib.build`` (the taef2 preset's teacher, ``diffusion`` degrader)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..core.files import atomic_write_bytes


TEACHER_MODEL_JSON = "teacher.json"  # a trained teacher's folder (data.teacher_data.TEACHER_DATA_JSON is another file)
PROMPT_EMBEDS = "prompt_embeds.safetensors"
TEACHER_SUBDIR = "teacher"
TRAIN_COMMAND = "python -m ldlib train-teacher PAIRS OUT --preset taef2"


def save_teacher(transformer, prompt_embeds: torch.Tensor, folder: str | os.PathLike, info: dict) -> Path:
    """Write a teacher folder: the transformer in fp16 (save_pretrained), the prompt embedding, teacher.json.

    Writes into folder as it is; ``train_teacher`` gives it a staging folder that replaces OUT/teacher whole.
    """
    from safetensors.torch import load_file, save

    folder = Path(folder)
    transformer.save_pretrained(str(folder), safe_serialization=True)
    # fp16 on disk halves the size (the shipped folder must stay small); load_teacher upcasts to float32.
    weights = folder / "diffusion_pytorch_model.safetensors"
    half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    atomic_write_bytes(weights, save(half, metadata={"format": "pt"}))
    atomic_write_bytes(folder / PROMPT_EMBEDS, save({"prompt_embeds": prompt_embeds.detach().float().cpu().contiguous()}))
    atomic_write_bytes(folder / TEACHER_MODEL_JSON, json.dumps(info, indent=2).encode())
    return folder


def is_teacher_folder(path: str | os.PathLike | None) -> bool:
    """Whether path is a folder written by save_teacher (it holds teacher.json)."""
    return path is not None and (Path(path) / TEACHER_MODEL_JSON).is_file()


def read_teacher_info(folder: str | os.PathLike) -> dict:
    """teacher.json of a teacher folder, or a clear error saying how to make one."""
    folder = Path(folder)
    if not (folder / TEACHER_MODEL_JSON).is_file():
        raise FileNotFoundError(
            f"{folder}: no trained teacher there ({TEACHER_MODEL_JSON} missing); train one with `{TRAIN_COMMAND}` and "
            f"use OUT/{TEACHER_SUBDIR} (for the taef2 preset: set $LDLIB_TAEF2_TEACHER to it)"
        )
    return json.loads((folder / TEACHER_MODEL_JSON).read_text())


def load_teacher(folder: str | os.PathLike, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32):
    """(transformer in eval mode, 1 x L x D prompt embedding, teacher.json) of a teacher folder."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    folder = Path(folder)
    info = read_teacher_info(folder)
    model = WanTransformer3DModel.from_pretrained(str(folder), torch_dtype=dtype)
    emb = load_file(str(folder / PROMPT_EMBEDS))["prompt_embeds"].float()
    return model.eval().to(device or "cpu"), emb, info


def load_prompt_embeds(folder: str | os.PathLike) -> torch.Tensor | None:
    """The fixed prompt embedding of a teacher folder (None when the folder has none)."""
    path = Path(folder) / PROMPT_EMBEDS
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(path))["prompt_embeds"].float()
