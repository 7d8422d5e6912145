"""Prompt embeddings of the diffusion teacher: computed once with the pipeline's text encoder, cached as safetensors.

The degrader runs the teacher with one fixed prompt, no classifier-free guidance: Wan's generic negative prompt by
default (what the recipe uses), or the empty prompt. A multi-GB text encoder is loaded only on a cache miss.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..core.files import atomic_write_bytes


# Wan's generic negative prompt (Wan-Video/Wan2.1, wan/configs/shared_config.py, sample_neg_prompt), verbatim.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
PROMPTS = {"empty": "", "negative": WAN_NEGATIVE_PROMPT}



def resolve_prompt(prompt: str) -> str:
    """"empty" and "negative" name the two degrader prompts; any other string is used as the prompt itself."""
    return PROMPTS.get(prompt, prompt)


def encode_prompt(prompt: str, tokenizer, text_encoder: nn.Module, max_sequence_length: int = 512) -> torch.Tensor:
    """1 x L x D prompt embedding exactly as diffusers' Wan pipelines compute it (padding positions zeroed)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    inputs = tokenizer(
        [prompt_clean(prompt)],
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    device = next(text_encoder.parameters()).device
    with torch.no_grad():
        hidden = text_encoder(ids.to(device), mask.to(device)).last_hidden_state
    # The pipeline keeps the real tokens and zeroes the rest (the encoder's outputs at padding are not used).
    keep = mask.to(device).gt(0).unsqueeze(-1)
    return torch.where(keep, hidden, torch.zeros_like(hidden)).float().cpu()


class PromptCache:
    """Prompt embeddings keyed by (text encoder id, prompt, length), one safetensors file each in a folder.

    ``get`` calls ``encode(prompt)`` only when no file exists, so a multi-GB text encoder loaded lazily inside
    ``encode`` is loaded once per prompt and machine, never again.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def path(self, model_id: str, prompt: str, max_sequence_length: int = 512) -> Path:
        """The cache file of one (model id, prompt, length)."""
        key = hashlib.sha256(f"{model_id}\0{prompt}\0{max_sequence_length}".encode()).hexdigest()[:20]
        return self.folder / f"prompt_{key}.safetensors"

    def get(
        self,
        model_id: str,
        prompt: str,
        encode: Callable[[str], torch.Tensor],
        max_sequence_length: int = 512,
    ) -> torch.Tensor:
        """The cached 1 x L x D embedding, computing it with encode(prompt) and writing the file on a miss."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open, save


        path = self.path(model_id, prompt, max_sequence_length)
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                emb = load_file(str(path))["prompt_embeds"]
            except (SafetensorError, KeyError, OSError) as e:
                raise ValueError(f"{path}: unreadable prompt-embedding cache file ({e}); delete it to recompute") from e
            if meta.get("model_id") != model_id or meta.get("prompt") != prompt:
                raise ValueError(f"{path}: cache key collision (file holds {meta.get('model_id')!r}); delete it")
            return emb
        emb = encode(prompt).detach().float().cpu().contiguous()
        if emb.dim() != 3 or emb.shape[0] != 1:
            raise ValueError(f"encode({prompt!r}) must return a 1 x L x D embedding, got {tuple(emb.shape)}")
        meta = {"model_id": model_id, "prompt": prompt, "max_sequence_length": str(max_sequence_length)}
        atomic_write_bytes(path, save({"prompt_embeds": emb}, metadata=meta))
        return emb


def prompt_cache_dir() -> Path:
    """Where prompt embeddings are cached: $LDLIB_CACHE, else ~/.cache/ldlib."""
    return Path(os.environ.get("LDLIB_CACHE") or Path.home() / ".cache" / "ldlib") / "prompt_embeds"
