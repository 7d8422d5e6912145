"""Tiny, seeded, randomly initialised models of the real architectures: the tiny preset's VAE, transformer and
text encoder (with a byte tokenizer), built from configs in-process (CI, tests, plumbing checks)."""

from __future__ import annotations

import torch


# A tiny AutoencoderKLWan: the real architecture (causal 3-D convs, RMS norms, 8x spatial factor, 16 latent
# channels so real Wan latents fit), a few thousand times fewer weights.
TINY_WAN_VAE_CONFIG = dict(
    base_dim=16,
    z_dim=16,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
)

# A tiny VAE of the Wan 2.1 *architecture* (4 stages, 2 residual blocks: what the original single-file layout,
# diffusers' converter and ComfyUI assume; dim_mult [1, 2, 4, 4] fixes where the decoder's channel shortcut sits).
# Used for Wan single-file round trips and as the tiny Qwen-Image VAE; the `tiny` preset's VAE is smaller still.
TINY_WAN21_VAE_CONFIG = dict(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
)

# A tiny WanTransformer3DModel with the real block structure (patch 1x2x2, velocity output, text cross-attention).
TINY_WAN_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=64,
)

# The real Wan 2.1 T2V 1.3B transformer config (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json);
# used to build a random-weight model of the real size for timing (no download needed).
WAN21_1_3B_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=1024,
)


def tiny_wan_vae(seed: int = 0):
    """A seeded, randomly initialised tiny AutoencoderKLWan (the real architecture, tiny widths)."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan(**TINY_WAN_VAE_CONFIG).eval()


def tiny_wan_transformer(seed: int = 0):
    """A seeded, randomly initialised tiny WanTransformer3DModel."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**TINY_WAN_TRANSFORMER_CONFIG).eval()


# A tiny UMT5 encoder whose width matches TINY_WAN_TRANSFORMER_CONFIG["text_dim"] (the real one is UMT5-XXL, 4096).
TINY_UMT5_CONFIG = dict(
    vocab_size=259,  # ByteTokenizer: pad 0, eos 1, unk 2, then the 256 byte values
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    feed_forward_proj="gated-gelu",
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


def tiny_umt5_encoder(seed: int = 0):
    """A seeded, randomly initialised tiny transformers UMT5EncoderModel (the real architecture, tiny widths)."""
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UMT5EncoderModel(UMT5Config(**TINY_UMT5_CONFIG)).eval()


class ByteTokenizer:
    """UTF-8 bytes as token ids, called like a transformers tokenizer (T5 conventions: pad 0, eos 1 appended).

    The tiny preset's stand-in for the UMT5 sentencepiece tokenizer, which cannot be downloaded offline.
    """

    pad_token_id, eos_token_id, offset = 0, 1, 3

    def __call__(
        self,
        texts: str | list[str],
        padding: str = "max_length",
        max_length: int = 512,
        truncation: bool = True,
        add_special_tokens: bool = True,
        return_attention_mask: bool = True,
        return_tensors: str = "pt",
    ):
        """Token ids and attention mask (a BatchEncoding), padded to max_length (only padding="max_length", tensors "pt")."""
        if padding != "max_length" or return_tensors != "pt":
            raise ValueError("ByteTokenizer supports padding='max_length' and return_tensors='pt' only")
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.full((len(texts), max_length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for i, text in enumerate(texts):
            row = [b + self.offset for b in text.encode("utf-8")]
            limit = max_length - 1 if add_special_tokens else max_length
            if len(row) > limit and not truncation:
                raise ValueError(f"prompt of {len(row)} tokens exceeds max_length {max_length}")
            row = row[:limit] + ([self.eos_token_id] if add_special_tokens else [])
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        from transformers import BatchEncoding  # a dict with attribute access, as real tokenizers return

        return BatchEncoding({"input_ids": ids, "attention_mask": mask})
