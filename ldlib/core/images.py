"""Image files <-> float tensors in [-1, 1] (N, C, H, W), and the exact area (box) downsample."""

from __future__ import annotations

import functools
import io
import os
import re
import threading
import warnings
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .files import atomic_write_bytes


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")


class ImageLoadError(ValueError):
    """A file could not be read as an image; the message names the file and the reason."""


def _to_uint8_rgb(img: Image.Image, float_max: float | None = None) -> tuple[np.ndarray, str]:
    """Convert any Pillow mode to 8-bit RGB; returns the array and a note of what was done.

    ``float_max``: for a float image, the largest value of the whole image when ``img`` is a crop of it.
    """
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale: Pillow's convert("L") clips at 255 instead of scaling, so scale by hand
        # (65535 -> 255 is a factor of 257, exactly mapping 8-bit-replicated values back).
        a = np.asarray(img).astype(np.float64)
        a = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2), "16-bit greyscale scaled to 8 bits"
    if mode == "F":
        a = np.asarray(img).astype(np.float64)
        # Float images come as [0, 1] or [0, 255]: which one is the whole image's, not a crop's (a shadow is <= 1).
        hi = 255.0 if (a.max() if float_max is None else float_max) > 1.0 else 1.0
        a = np.clip(np.rint(a * (255.0 / hi)), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2), "float greyscale scaled to 8 bits"
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB")), "alpha composited on white"
    if mode == "RGB":
        return np.asarray(img), ""
    return np.asarray(img.convert("RGB")), f"{mode} converted to RGB"


# Pillow refuses images over 89.5 Mpx (its decompression-bomb guard), but a 100 Mpx photo (medium format, a
# stitched panorama) is a normal input for this recipe. Up to 400 Mpx (20000 x 20000: 1.2 GB as 8-bit RGB) opens;
# headers claiming more are still refused. A limit the user set on Pillow themselves is kept as it is.
MAX_PHOTO_PIXELS = 400_000_000
_PILLOW_DEFAULT_LIMIT = int(1024 * 1024 * 1024 // 4 // 3)
_limit_lock = threading.Lock()
_limit_users = 0
_limit_before: int | None = None


@contextmanager
def _photo_pixel_limit() -> Iterator[int | None]:
    """Pillow's pixel limit at MAX_PHOTO_PIXELS inside the block (unless the user changed it; yields it), restored.

    Pillow reads the limit from a module global; the count keeps overlapping blocks in threads from restoring early.
    """
    global _limit_users, _limit_before
    with _limit_lock:
        if _limit_users == 0:
            _limit_before = Image.MAX_IMAGE_PIXELS
            if Image.MAX_IMAGE_PIXELS == _PILLOW_DEFAULT_LIMIT:
                Image.MAX_IMAGE_PIXELS = MAX_PHOTO_PIXELS
        _limit_users += 1
        limit = Image.MAX_IMAGE_PIXELS
    try:
        yield limit
    finally:
        with _limit_lock:
            _limit_users -= 1
            if _limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _limit_before


@contextmanager
def open_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """A fully decoded, EXIF-upright Pillow image of a file; a failure to read it is an ImageLoadError naming it.

    Images up to MAX_PHOTO_PIXELS open; larger ones are refused as decompression bombs.
    """
    path = Path(path)
    img = None
    limit = None
    try:
        with warnings.catch_warnings(), _photo_pixel_limit() as limit:
            # Pillow warns before its hard limit; we want one clear error type instead.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # in place: no full-image copy when upright
    except FileNotFoundError as e:
        raise ImageLoadError(f"{path}: no such file") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if img is not None:
            img.close()
        m = re.search(r"\((\d+) pixels\)", str(e))  # Pillow's message names 2x the limit for its hard error
        size = f"{int(m.group(1)) / 1e6:,.0f} Mpx, " if m else ""
        raise ImageLoadError(
            f"{path}: too many pixels ({size}over the {limit / 1e6:,.0f} Mpx decompression bomb limit)"
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        if img is not None:
            img.close()
        raise ImageLoadError(f"{path}: not a decodable image ({type(e).__name__}: {e})") from e
    try:
        yield img
    finally:
        img.close()


@functools.lru_cache(maxsize=16)
def _srgb_equivalent(icc: bytes) -> bool:
    """Whether an RGB colour profile maps every colour of a 16-level grid to sRGB within one 8-bit level."""
    from PIL import ImageCms

    # By what it does, not by its name: photo sites embed compact sRGB profiles named "c2" and the like, and
    # converting through them would move a few values by one level and flag every photo.
    levels = np.arange(0, 256, 17, dtype=np.uint8)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(64, 64, 3)
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    mapped = ImageCms.profileToProfile(Image.fromarray(grid), profile, ImageCms.createProfile("sRGB"))
    return int(np.abs(np.asarray(mapped).astype(np.int16) - grid).max()) <= 1


def _to_srgb(img: Image.Image, icc: bytes | None) -> tuple[Image.Image, str]:
    """An image in sRGB, converted from the colour profile it carries (if any, and not sRGB), and a note of it."""
    if not icc:
        return img, ""
    if img.mode in ("P", "PA", "LA", "La", "RGBa"):  # palette and alpha modes: colours in a mode littleCMS takes
        img = img.convert("RGBA" if img.mode != "P" or "transparency" in img.info else "RGB")
    if img.mode not in ("RGB", "RGBA", "CMYK", "L"):  # 16-bit and float modes: littleCMS takes none of them
        return img, f"colour profile not applied to a {img.mode} image: values taken as sRGB"
    from PIL import ImageCms

    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        name = ImageCms.getProfileDescription(profile).strip() or "an unnamed profile"
        if profile.profile.xcolor_space == "RGB " and _srgb_equivalent(icc):
            return img, ""
    except (OSError, ImageCms.PyCMSError) as e:
        return img, f"colour profile not readable ({e}): values taken as sRGB"
    try:
        # Phones and cameras tag photos Display P3 or Adobe RGB: their numbers are not sRGB's, and the VAE, the
        # metrics and every viewer of an untagged PNG read sRGB. (Matrix profiles: the intent is colorimetric.)
        out = ImageCms.profileToProfile(img, profile, ImageCms.createProfile("sRGB"),
                                        outputMode="RGBA" if img.mode == "RGBA" else "RGB")
    except ImageCms.PyCMSError as e:
        return img, f"colour profile {name!r} could not be applied ({e}): values taken as sRGB"
    return out, f"converted from {name} to sRGB"


def rgb8(img: Image.Image, box: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, str]:
    """H x W x 3 uint8 sRGB array of an image, or of a box (left, top, right, bottom) of it, and a conversion note.

    Cropping first copies only the region out of Pillow (a 4k photo's full copy costs as much as a crop's work);
    a colour profile is applied to that region (colour conversion is per pixel). The array may be read-only: copy
    it before writing into it.
    """
    region, profile_note = _to_srgb(img if box is None else img.crop(box), img.info.get("icc_profile"))
    array, note = _to_uint8_rgb(region, img.getextrema()[1] if img.mode == "F" and box is not None else None)
    return array, "; ".join(n for n in (profile_note, note) if n)


def load_rgb8(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """Load an image file as an H x W x 3 uint8 array (EXIF orientation applied) and a conversion note.

    The array may be read-only (it wraps Pillow's buffer without a copy): copy it before writing into it.
    """
    with open_image(path) as img:
        return rgb8(img)


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 array -> 1 x 3 x H x W float tensor in [-1, 1]."""
    x = torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1)  # astype copies: fine for read-only input
    return (x / 127.5 - 1.0).unsqueeze(0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """1 x 3 x H x W (or 3 x H x W) tensor in [-1, 1] -> H x W x 3 uint8 array (clamped, rounded)."""
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"to_uint8 takes one image, got a batch of {x.shape[0]}")
        x = x[0]
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.to(torch.uint8).permute(1, 2, 0).numpy()


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Load an image file as a 1 x 3 x H x W float tensor in [-1, 1]; raises ImageLoadError naming the file."""
    return to_tensor(load_rgb8(path)[0])


def save_image(x: torch.Tensor | np.ndarray, path: str | os.PathLike) -> None:
    """Save one image (tensor in [-1, 1], or uint8 H x W x 3 array) atomically; format from the suffix."""
    path = Path(path)
    array = x if isinstance(x, np.ndarray) else to_uint8(x)
    buf = io.BytesIO()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image suffix {path.suffix!r}")
    # compress_level 1: pair sets are written once and read many times; size matters less than build speed.
    Image.fromarray(array).save(buf, format=fmt, **({"compress_level": 1} if fmt == "PNG" else {}))
    atomic_write_bytes(path, buf.getvalue())


def area_downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Exact box-average downsample of N x C x H x W by an integer factor (H and W must divide)."""
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"area_downsample: factor must be a positive integer, got {factor}")
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"area_downsample: size {h}x{w} is not divisible by factor {factor}; crop first")
    return F.avg_pool2d(x, kernel_size=factor, stride=factor)


def walk_files(folder: str | os.PathLike) -> tuple[list[Path], list[dict]]:
    """Every non-hidden file under folder (recursive, sorted) and what was not listed, with the reason.

    Symbolic links to folders are followed (photos kept on another disk), each real folder and file once: a link
    to something already listed (a loop, a second link, a link to a file in the tree) is reported, never read
    twice. Entries reached without a link come first, so a link never takes the place of the path it points to.
    Broken links are reported, and so are names that are not valid UTF-8 (they cannot be stored in a manifest as
    they are) and folders that cannot be read. Non-images are listed so callers can report them.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    files: list[Path] = []
    not_listed: list[dict] = []
    listed: dict[Path, str] = {}  # real path -> the name it was listed under
    links: deque[Path] = deque()

    def add(entry: Path) -> None:
        name = entry.relative_to(root).as_posix()
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # bytes the file system's encoding could not decode (e.g. Latin-1 from a zip)
            shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            not_listed.append({"source": shown, "reason": "name is not valid UTF-8 (rename it)"})
            return
        if not (entry.is_dir() or entry.is_file()):
            if entry.is_symlink():
                not_listed.append({"source": name, "reason": f"broken symbolic link (to {os.readlink(entry)})"})
            return
        real = entry.resolve()
        if real in listed:
            kind = "folder" if entry.is_dir() else "file"
            not_listed.append({"source": name, "reason": f"symbolic link to a {kind} already listed as {listed[real]}"})
            return
        listed[real] = name
        if entry.is_file():
            files.append(entry)
            return
        try:
            children = sorted(entry.iterdir())
        except OSError as e:
            if entry == root:
                raise
            not_listed.append({"source": name, "reason": f"folder not readable ({e.strerror or e})"})
            return
        for child in children:
            if not child.name.startswith("."):
                if child.is_symlink():
                    links.append(child)  # after every entry reached without a link
                else:
                    add(child)

    add(root)
    while links:
        add(links.popleft())
    return sorted(files), sorted(not_listed, key=lambda s: s["source"])


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Every non-hidden file under folder (recursive, sorted, symlinked folders followed once; see walk_files)."""
    return walk_files(folder)[0]
