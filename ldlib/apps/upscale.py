"""Decode images or latent files at 2x with a trained decoder, in overlapping tiles so any size fits in memory.

An image is encoded with the preset's (frozen) encoder; a latent file is read as normalised or raw latents. Both
encoder and decoder run tile by tile: tiles overlap by ``overlap`` latent pixels, and inside each overlap the two
tiles are cross-faded with linear weights over its middle half (the outer quarters, where a tile's own border
shapes the result, get weight 0), the weights normalised to sum to 1.

GroupNorm layers normalise with statistics of the whole feature map, so a tile alone would see other statistics
than the whole image (taef2's encoder and decoder each have three, at the latent resolution: per-tile statistics
shift colours visibly). When a network has at most ``MAX_SHARED_NORMS`` of them, their statistics are shared:
one pass over the tiles per GroupNorm (in the order the forward reaches them) sums each tile's own region, then
every tile normalises with the whole-image statistics. Networks with more (AutoencoderKL decoders have ~30, each
pass costing a partial decode) keep per-tile statistics, as diffusers' own tiled decoding does. Attention over
the whole image (Wan's middle blocks) cannot be shared; what remains is what the tiled-vs-whole numbers in the
tests and the README measure. ``--tile 0`` decodes in one piece when memory allows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..build import codec_of
from ..core.images import IMAGE_SUFFIXES, area_downsample, load_image, save_image


LATENT_SUFFIXES = (".safetensors", ".pt", ".pth")
MAX_SHARED_NORMS = 8  # GroupNorm layers whose statistics tiling shares (each costs one partial pass over the tiles)


@dataclass
class UpscaleConfig:
    """How to upscale: output scale, tiling (in latent pixels), how latent files are stored, side-by-side output."""

    scale: int = 2  # 2: the decoder's output; 1: that output area-downsampled 2x (a cleaner 1x decode)
    tile: int = 64  # latent pixels per tile side (512 image px at 8x); 0: one piece
    overlap: int = 16  # latent pixels shared by neighbouring tiles
    latents: str = "normalised"  # latent files hold normalised (what diffusion models produce) or raw VAE latents
    compare: bool = False  # also write [decoder + bicubic | ours] side by side
    overwrite: bool = False  # replace output files that exist already (from an earlier run); else refuse
    progress: bool = False  # a progress bar (stderr) over the tiles of each input that has more than one

    def __post_init__(self) -> None:
        if self.scale not in (1, 2):
            raise ValueError(f"--scale must be 2 or 1, got {self.scale}")
        if self.latents not in ("normalised", "raw"):
            raise ValueError(f"--latents must be normalised or raw, got {self.latents!r}")
        if self.tile < 0 or self.overlap < 0:
            raise ValueError(f"--tile and --overlap must be >= 0, got {self.tile}, {self.overlap}")
        if self.tile and (self.tile < 4 or 2 * self.overlap > self.tile):
            raise ValueError(f"need --tile >= 4 and --overlap <= tile / 2, got tile {self.tile}, overlap {self.overlap}")


# ------------------------------------------------------------------------------------------------------------
# tiling
# ------------------------------------------------------------------------------------------------------------


def tile_spans(size: int, tile: int, overlap: int, align: int = 2) -> list[tuple[int, int]]:
    """Overlapping [start, end) spans of length <= tile covering range(size); starts multiples of ``align``.

    The fewest tiles that fit, spread evenly so neighbours overlap by ``overlap`` (or slightly more), not by
    whatever the last tile happens to leave; all have one length but the last, which may be up to ``align - 1``
    shorter to end at an end that is not aligned. Starts are multiples of ``align`` so that position-dependent latent
    statistics (FLUX.2's 2x2-patch normalisation) keep their phase in every tile.
    """
    if tile <= 0 or size <= tile:
        return [(0, size)]
    n = -(-(size - overlap) // (tile - overlap))
    while True:
        length = min(tile, -(-(size + (n - 1) * overlap) // n) + align)
        starts = [(round(i * (size - length) / (n - 1)) // align) * align for i in range(n)]
        starts[-1] = -(-(size - length) // align) * align  # rounded up: the last tile never exceeds length
        spans = [(a, min(a + length, size)) for a in starts]
        spans[-1] = (spans[-1][0], size)
        if all(b0 - a1 >= overlap for (_, b0), (a1, _) in zip(spans, spans[1:])):
            return spans
        n += 1


def _ramp(length: int, before: int, after: int) -> torch.Tensor:
    """1-D weights of one tile: 1 inside, cross-fading over the middle half of each overlap with a neighbour.

    ``before`` / ``after``: overlap (in output pixels) with the previous / next tile (0 at the image border).
    """
    x = torch.arange(length, dtype=torch.float64) + 0.5
    w = torch.ones(length, dtype=torch.float64)
    if before:
        w = torch.minimum(w, ((x - before / 4) / (before / 2)).clamp(0, 1))
    if after:
        w = torch.minimum(w, ((length - x - after / 4) / (after / 2)).clamp(0, 1))
    return w.float()


def _owned(spans: list[tuple[int, int]], i: int) -> tuple[int, int]:
    """The part of span i that is nearer to it than to its neighbours: the spans' owned parts partition the axis."""
    a, b = spans[i]
    lo = (a + spans[i - 1][1]) // 2 if i else a
    hi = (spans[i + 1][0] + b) // 2 if i + 1 < len(spans) else b
    return lo - a, hi - a


class _Stop(Exception):
    """Raised by a GroupNorm that is collecting statistics: the rest of the forward is not needed in that pass."""


class SharedGroupNorm:
    """Make a network's GroupNorm layers normalise every tile with statistics of the whole input.

    Used as a context around the tile passes: a layer whose statistics are not known yet collects them (sums over
    the current tile's owned region, then stops the forward), a layer whose statistics are known applies them.
    """

    def __init__(self, norms: list[nn.GroupNorm]) -> None:
        self.norms = norms
        self.stats: dict[nn.GroupNorm, tuple[torch.Tensor, torch.Tensor]] = {}
        self.collecting: nn.GroupNorm | None = None
        self.sums: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self.region: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None  # owned rows, cols, tile size
        self.handles: list = []

    def __enter__(self) -> "SharedGroupNorm":
        self.handles = [m.register_forward_hook(self._hook) for m in self.norms]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    @property
    def complete(self) -> bool:
        """Whether every layer's statistics are known."""
        return len(self.stats) == len(self.norms)

    def _grouped(self, m: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], m.num_groups, -1, *x.shape[2:])

    def _hook(self, m: nn.GroupNorm, inputs: tuple, output: torch.Tensor):
        x = inputs[0]
        if m in self.stats:
            mean, var = self.stats[m]
            g = self._grouped(m, x.float())
            shape = (x.shape[0], m.num_groups) + (1,) * (g.dim() - 2)
            y = ((g - mean.view(shape)) / torch.sqrt(var.view(shape) + m.eps)).reshape(x.shape)
            if m.affine:
                y = y * m.weight.view(1, -1, *([1] * (x.dim() - 2))) + m.bias.view(1, -1, *([1] * (x.dim() - 2)))
            return y.to(output.dtype)
        if self.collecting is None:
            self.collecting, self.sums = m, None
        if m is not self.collecting:  # cannot happen in a feed-forward net; refuse rather than guess
            raise RuntimeError("GroupNorm statistics requested out of order")
        (r0, r1), (c0, c1), (th, tw) = self.region
        sh, sw = x.shape[-2] / th, x.shape[-1] / tw
        part = x[..., round(r0 * sh) : round(r1 * sh), round(c0 * sw) : round(c1 * sw)].double()
        g = self._grouped(m, part).flatten(2)
        s, ss, n = g.sum(-1), g.square().sum(-1), g.shape[-1]
        if self.sums is not None:
            s0, ss0, n0 = self.sums
            s, ss, n = s + s0, ss + ss0, n + n0
        self.sums = (s, ss, n)
        raise _Stop

    def freeze(self) -> None:
        """Turn the collected sums of the current layer into its mean and (biased) variance."""
        s, ss, n = self.sums
        mean = s / n
        self.stats[self.collecting] = (mean.float(), (ss / n - mean.square()).clamp_min(0).float())
        self.collecting, self.sums = None, None


def group_norms(modules: list[nn.Module]) -> list[nn.GroupNorm]:
    """Every GroupNorm inside the given modules."""
    return [m for mod in modules for m in mod.modules() if isinstance(m, nn.GroupNorm)]


def run_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    unit_in: int,
    unit_out: int,
    tile: int,
    overlap: int,
    norms: list[nn.GroupNorm] | None = None,
    progress: str | None = None,
) -> torch.Tensor:
    """Apply ``fn`` to overlapping tiles of x and blend the results.

    Tiles are laid out in "units" (latent pixels): x has ``unit_in`` pixels per unit, fn's output ``unit_out``
    (decode: 1 -> 8 * upscale; encode: 8 -> 1). ``norms``: GroupNorm layers inside fn whose statistics are shared
    across tiles (see ``SharedGroupNorm``). The output is accumulated on fn's device in float32. ``progress``: the
    label of a tqdm bar (stderr) over the calls of fn, shown when there is more than one tile.
    """
    h_u, w_u = x.shape[-2] // unit_in, x.shape[-1] // unit_in
    rows, cols = tile_spans(h_u, tile, overlap), tile_spans(w_u, tile, overlap)
    if len(rows) == 1 and len(cols) == 1:
        return fn(x).float()
    tiles = [(i, j) for i in range(len(rows)) for j in range(len(cols))]
    if progress is not None:
        from tqdm.auto import tqdm

        # A 3000 px photo is minutes of CPU per pass: say how far it is. One pass per shared GroupNorm (each
        # stops at its norm), then the blending pass.
        bar = tqdm(total=len(tiles) * (len(norms or []) + 1), desc=progress, unit="tile", dynamic_ncols=True)
        inner = fn

        def fn(t: torch.Tensor) -> torch.Tensor:
            try:
                return inner(t)
            finally:
                bar.update(1)

    try:
        return _blend_tiles(fn, x, tiles, rows, cols, unit_in, unit_out, h_u, w_u, norms)
    finally:
        if progress is not None:
            bar.close()


def _blend_tiles(fn, x, tiles, rows, cols, unit_in: int, unit_out: int, h_u: int, w_u: int, norms) -> torch.Tensor:
    """run_tiled's work once the tiles are laid out: GroupNorm statistics passes, then the blended outputs."""

    def cut(i: int, j: int) -> torch.Tensor:
        (r0, r1), (c0, c1) = rows[i], cols[j]
        return x[..., r0 * unit_in : r1 * unit_in, c0 * unit_in : c1 * unit_in]

    with SharedGroupNorm(list(norms or [])) as shared:
        while not shared.complete:  # one pass over the tiles per GroupNorm, in the order the forward meets them
            for i, j in tiles:
                shared.region = (_owned(rows, i), _owned(cols, j), (rows[i][1] - rows[i][0], cols[j][1] - cols[j][0]))
                try:
                    fn(cut(i, j))
                except _Stop:
                    continue
                raise RuntimeError("a GroupNorm passed to run_tiled is not used by fn")
            shared.freeze()
        out = weight = None
        for i, j in tiles:
            (r0, r1), (c0, c1) = rows[i], cols[j]
            wr = _ramp((r1 - r0) * unit_out, (rows[i - 1][1] - r0) * unit_out if i else 0,
                       (r1 - rows[i + 1][0]) * unit_out if i + 1 < len(rows) else 0)
            wc = _ramp((c1 - c0) * unit_out, (cols[j - 1][1] - c0) * unit_out if j else 0,
                       (c1 - cols[j + 1][0]) * unit_out if j + 1 < len(cols) else 0)
            y = fn(cut(i, j)).float()
            if out is None:
                out = torch.zeros((*y.shape[:2], h_u * unit_out, w_u * unit_out), dtype=torch.float32, device=y.device)
                weight = torch.zeros((h_u * unit_out, w_u * unit_out), dtype=torch.float32, device=y.device)
            w = (wr[:, None] * wc[None, :]).to(y.device)
            rs, cs = slice(r0 * unit_out, r1 * unit_out), slice(c0 * unit_out, c1 * unit_out)
            out[..., rs, cs] += y * w
            weight[rs, cs] += w
    return out / weight


def _shared_norms(modules: list[nn.Module]) -> list[nn.GroupNorm]:
    """The GroupNorms whose statistics tiling shares: all of them, when there are at most MAX_SHARED_NORMS."""
    norms = group_norms(modules)
    return norms if len(norms) <= MAX_SHARED_NORMS else []


@torch.no_grad()
def decode_tiled(codec, latents: torch.Tensor, tile: int = 64, overlap: int = 16, clamp: bool = True,
                 progress: str | None = None) -> torch.Tensor:
    """Normalised latents (N x C x h x w) -> images at the codec's full scale, decoded in blended latent tiles."""
    unit = codec.spatial_factor * codec.upscale
    norms = _shared_norms(codec.decoder_modules())
    y = run_tiled(lambda z: codec.decode(z, clamp=False), latents, 1, unit, tile, overlap, norms, progress)
    return y.clamp(-1, 1) if clamp else y


@torch.no_grad()
def encode_tiled(codec, images: torch.Tensor, tile: int = 64, overlap: int = 16,
                 progress: str | None = None) -> torch.Tensor:
    """Images (N x 3 x H x W, H and W multiples of the spatial factor) -> normalised latents, in blended tiles."""
    return run_tiled(codec.encode, images, codec.spatial_factor, 1, tile, overlap, _shared_norms(codec.encoder_modules()),
                     progress)


# ------------------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------------------


def _family_of_preset(name: str, taef2_dir: str | None) -> str:
    from ..presets import get_preset

    try:
        return get_preset(name, taef2_path=taef2_dir).family
    except FileNotFoundError:  # taef2 weights elsewhere: the family is still known
        return "tae" if name == "taef2" else ""


def describe_model(model: str | os.PathLike, taef2_dir: str | None = None) -> dict:
    """What a model path is without loading weights: kind (run / export / folder), preset and VAE family."""
    from ..build import export_family, is_run, read_run_config

    path = Path(model)
    if is_run(path):
        cfg = read_run_config(path)
        name = cfg.get("preset", "tiny")
        return {"kind": "run", "preset": name, "family": _family_of_preset(name, taef2_dir),
                "vae": cfg.get("vae"), "vae_config": cfg.get("vae_config")}
    if (path / "ldlib_export.json").is_file():
        info = json.loads((path / "ldlib_export.json").read_text())
        return {"kind": "export", "preset": info.get("preset"), "family": info.get("family"),
                "vae": info.get("vae"), "vae_config": info.get("vae_config")}
    if path.is_dir() and (path / "config.json").is_file():
        return {"kind": "folder", "preset": None, "family": export_family(path), "vae": None, "vae_config": None}
    raise FileNotFoundError(f"{path}: neither a training run, an ldlib export nor a decoder folder")


def default_upscaler(preset_name: str) -> Path:
    """The 2x decoder shipped for a preset (what ``upscale`` uses without ``--model``); one line when there is none."""
    from ..presets import PRESETS, get_preset, shipped_decoder

    folder = shipped_decoder(get_preset(preset_name))
    if folder is None:
        have = [name for name in PRESETS if get_preset(name).decoder_2x]
        raise ValueError(f"ldlib ships no trained 2x decoder for preset {preset_name!r} (it ships one for: "
                         f"{', '.join(have)}); pass --model RUN_OR_EXPORT")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: the shipped 2x decoder is missing from this installation; "
                                "pass --model RUN_OR_EXPORT")
    return folder


def load_upscaler(
    model: str | os.PathLike,
    preset_name: str | None = None,
    taef2_dir: str | None = None,
    vae: str | None = None,
    vae_config: str | None = None,
):
    """The 2x codec of a run (EMA weights) or export, and the preset's 1x codec; refuses a family mismatch.

    Returns ``(codec2x, original, preset)``. ``preset_name`` defaults to the one the model was trained with.
    """
    from ..presets import get_preset

    desc = describe_model(model, taef2_dir)
    name = preset_name or desc["preset"]
    if not name:
        raise ValueError(f"{model}: not made by ldlib, so its preset is unknown; pass --preset")
    vae = vae or (desc["vae"] if name == desc["preset"] else None)
    vae_config = vae_config or (desc["vae_config"] if name == desc["preset"] else None)
    family = _family_of_preset(name, taef2_dir)
    if desc["family"] and family and desc["family"] != family:
        made = f" (trained with preset {desc['preset']!r})" if desc["preset"] else ""
        raise ValueError(
            f"{model}: a {desc['family']} decoder{made}, but preset {name!r} is a {family} VAE; "
            "its latents would mean nothing to this decoder (pass the matching --preset)"
        )
    overrides = {k: v for k, v in (("vae", vae), ("vae_config", vae_config)) if v}
    preset = get_preset(name, taef2_path=taef2_dir, **overrides)
    original = codec_of(preset)
    if desc["kind"] == "run":
        from ..build import load_run_codec

        codec, _ = load_run_codec(model)
    else:
        from ..build import load_decoder

        codec, _ = load_decoder(model, preset)
    if codec.upscale != 2:
        raise ValueError(f"{model}: decoder outputs {codec.upscale}x, expected a 2x decoder")
    if codec.latent_channels != original.latent_channels:
        raise ValueError(
            f"{model}: decoder takes {codec.latent_channels} latent channels, preset {preset.name!r}'s VAE makes "
            f"{original.latent_channels}"
        )
    if codec.identity()["encoder_sha256"] != original.identity()["encoder_sha256"]:
        raise ValueError(
            f"{model}: trained on latents of another encoder than preset {preset.name!r}'s VAE ({original.source}); "
            "pass the preset (and --vae) it was trained with"
        )
    return codec.eval(), original.eval(), preset


# ------------------------------------------------------------------------------------------------------------
# inputs and outputs
# ------------------------------------------------------------------------------------------------------------


def read_latents(path: str | os.PathLike, channels: int) -> torch.Tensor:
    """N x C x h x w latents from a .safetensors / .pt file (C x h x w, N x C x h x w, or Wan's N x C x 1 x h x w)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as e:  # a truncated, foreign or unsafe pickle: one line naming the file
        raise ValueError(f"{path}: not a readable latent file ({type(e).__name__}: {str(e)[:160]})") from e
    if isinstance(data, dict):
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        key = next((k for k in ("latents", "latent", "samples", "z") if k in tensors), None)
        if key is None and len(tensors) == 1:
            key = next(iter(tensors))
        if key is None:
            raise ValueError(f"{path}: holds {sorted(tensors)[:5]}; expected one tensor or a 'latents' entry")
        data = tensors[key]
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"{path}: holds a {type(data).__name__}, not a latent tensor")
    z = data.float()
    if z.dim() == 5 and z.shape[2] == 1:  # a video VAE's single frame
        z = z[:, :, 0]
    if z.dim() == 3:
        z = z.unsqueeze(0)
    if z.dim() != 4:
        raise ValueError(f"{path}: latents of shape {tuple(data.shape)}; expected C x h x w or N x C x h x w")
    if z.shape[1] != channels:
        raise ValueError(f"{path}: latents have {z.shape[1]} channels, this model's VAE takes {channels}")
    if not torch.isfinite(z).all():
        raise ValueError(f"{path}: latents contain NaN or inf")
    return z


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad the bottom/right edges up to a multiple (cropped off the output again)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def clashing_inputs(inputs: Sequence[str | os.PathLike]) -> list[list[str]]:
    """Groups of inputs with one stem: their outputs overwrite each other in one folder whatever the files hold.

    Known before anything is read; a latent file's numbered outputs (``x_0_2x.png``) can also meet another stem's
    (``x_1.png``), which only ``upscale_file``'s ``claimed`` check sees, once the file's latent count is known.
    """
    by_stem: dict[str, list[str]] = {}
    for item in inputs:
        by_stem.setdefault(Path(item).stem, []).append(str(item))
    return [names for names in by_stem.values() if len(names) > 1]


def upscale_file(path: str | os.PathLike, codec, original, out_dir: str | os.PathLike, cfg: UpscaleConfig,
                 claimed: dict[Path, str] | None = None) -> list[Path]:
    """Upscale one image or latent file; write PNG(s) named by its stem under out_dir; return the files written.

    ``claimed``: files this run has written, by the input that wrote each. An input whose outputs would overwrite
    one of them fails with a ValueError naming both inputs before it writes anything; its own outputs are added.
    """
    path, out_dir = Path(path), Path(out_dir)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        image = load_image(path)
        h, w = image.shape[-2:]
        # multiple of 2 latent pixels too: FLUX.2's normalisation is defined on 2x2 latent patches
        x = _pad_to(image, 2 * original.spatial_factor)
        # The encoder works at 1x: tiles twice as large per side cost the memory of one 2x decoder tile, and give
        # its large receptive field (TAESD's: ~18 latent pixels) more context.
        z = encode_tiled(original, x, 2 * cfg.tile, 2 * cfg.overlap, progress=f"{path.name}: encode" if cfg.progress else None)
        sizes = [(h, w)]
    elif suffix in LATENT_SUFFIXES:
        z = read_latents(path, codec.latent_channels)
        if cfg.latents == "raw":
            z = codec.normalise(z)
        f = codec.spatial_factor
        sizes = [(z.shape[-2] * f, z.shape[-1] * f)] * z.shape[0]
    else:
        raise ValueError(f"{path}: not an image ({', '.join(IMAGE_SUFFIXES)}) nor a latent file "
                         f"({', '.join(LATENT_SUFFIXES)})")
    tags = [f"_{k}" if z.shape[0] > 1 else "" for k in range(z.shape[0])]
    targets = [out_dir / f"{path.stem}{tag}_{cfg.scale}x.png" for tag in tags]
    sides = [out_dir / f"{path.stem}{tag}_compare.png" for tag in tags]
    if claimed is not None:
        # Checked on the real names, now that the latent count is known: "x.pt" holding two latents writes
        # x_1_2x.png, as an image "x_1.png" does. Refused before decoding: the earlier input's file stays.
        for name in targets + (sides if cfg.compare else []):
            if name in claimed:
                raise ValueError(f"{path}: its output {name.name} would overwrite that of {claimed[name]}, written "
                                 "earlier in this run; upscale them into separate --out folders")
    if not cfg.overwrite:  # a user's file (an earlier run's output, or anything of that name) is never replaced silently
        for name in targets + (sides if cfg.compare else []):
            if name.exists() and (claimed is None or name not in claimed):
                raise ValueError(f"{name}: exists already; pass --overwrite to replace it, or choose another --out")
    written: list[Path] = []

    def save(image: torch.Tensor, name: Path) -> None:
        save_image(image, name)
        written.append(name)
        if claimed is not None:  # as each file lands: an input that fails half-way still holds what it wrote
            claimed[name] = str(path)

    for k, (target, side) in enumerate(zip(targets, sides)):
        zk = z[k : k + 1]
        h, w = sizes[k]
        label = f"{path.name}{tags[k]}: decode" if cfg.progress else None
        ours = decode_tiled(codec, zk, cfg.tile, cfg.overlap, progress=label)[..., : 2 * h, : 2 * w]
        if cfg.scale == 1:
            ours = area_downsample(ours, 2)
        save(ours[0], target)
        if cfg.compare:
            base = decode_tiled(original, zk, cfg.tile, cfg.overlap)[..., :h, :w]
            if cfg.scale == 2:
                base = F.interpolate(base, scale_factor=2, mode="bicubic", align_corners=False).clamp(-1, 1)
            save(torch.cat([base, ours], dim=-1)[0], side)
    return written
