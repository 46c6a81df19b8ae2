"""Image files a user supplies, for train_llava.py, predict_llava.py and tools/split_images.py: every mode to 8-bit
RGB, upright; a cheap header check before training; and the same image in two splits (the leak check).

Screenshots come as PNG, JPEG, WebP, ... in RGBA, CMYK, palette or 16-bit modes, and now and then as a file
that is empty, cut short, not an image at all, or one whose header claims billions of pixels (a
decompression bomb). `image_problem` finds what the header (and, for PNG, the chunk checksums) show, before
anything trains; `load_rgb` decodes, in DataLoader workers, and meets what only decoding finds. "The same
image" is the same bytes, or the same decoded pixels where the manifests carry a pixel hash
(tools/split_images.py writes them): decoding costs far more than hashing bytes.
"""

import hashlib
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from common.errors import UserError, warn
from common.run_log import file_sha256

# What reading an image can raise: a missing or unreadable file (OSError; PIL's UnidentifiedImageError is one),
# some decoders' ValueError or SyntaxError, a decompression bomb.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def open_checked(path: Path) -> Image.Image:
    """Open an image (its header only); refuse one whose pixel count could exhaust memory when decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, more clearly
        img = Image.open(path)
    if img.width * img.height > Image.MAX_IMAGE_PIXELS:  # PIL only warns below twice this
        img.close()
        raise ValueError(f"{img.width}x{img.height} pixels is over the {Image.MAX_IMAGE_PIXELS:,}-pixel limit")
    return img


def image_problem(path: Path) -> str | None:
    """Why `path` cannot be read as an image, as far as its header shows; None if it looks fine."""
    try:
        with open_checked(path) as img:
            img.verify()  # PIL's check without decoding: a PNG cut short or with a bad checksum fails here
    except IMAGE_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return None


def load_rgb(path: Path) -> Image.Image:
    """Any image as 8-bit RGB, upright: the EXIF orientation applied, alpha composited on white, CMYK and palettes
    converted, 16-bit scaled."""
    with open_checked(path) as img:
        img.load()
    img = ImageOps.exif_transpose(img)  # a photo stored sideways with a "rotate 90" tag: upright, as shown
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit grayscale: convert("RGB") would clip it
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")


def pixel_hash(path: Path) -> str:
    """The hash of the decoded, upright RGB pixels and the picture's size."""
    img = load_rgb(path)
    return hashlib.sha256(f"{img.width}x{img.height}:".encode() + img.tobytes()).hexdigest()


def in_threads(function, paths: list[Path]) -> list:
    with ThreadPoolExecutor(8) as pool:  # file reads, hashlib and PIL's decoders release the GIL
        return list(pool.map(function, paths))


def find_overlap(splits: dict[str, list]) -> tuple[list[tuple], int]:
    """Images (objects with .path and an optional .pixel_hash) in two splits, as (split, path, other split, other
    path, "bytes" or "pixels"), one per image that repeats one of an earlier split; and how many images repeat one
    of their own split."""
    first = {}  # (how, hash) -> (split, path) of its first image
    leaks = []
    within = 0
    for split, samples in splits.items():
        for sample, digest in zip(samples, in_threads(file_sha256, [sample.path for sample in samples])):
            pixels = getattr(sample, "pixel_hash", None)
            keys = [("bytes", digest)] + ([("pixels", pixels)] if pixels else [])
            seen = [(first[key], key[0]) for key in keys if key in first]
            other = next(((where, how) for where, how in seen if where[0] != split), None)
            if other:
                leaks.append((split, sample.path, other[0][0], other[0][1], other[1]))
            elif seen:
                within += 1
            for key in keys:
                first.setdefault(key, (split, sample.path))
    return leaks, within


def check_overlap(splits: dict[str, list], allowed: bool) -> tuple[int, int]:
    """Refuse images in two of the splits (one line naming a pair and the fix) unless `allowed`; returns (images in
    two splits, copies within a split)."""
    leaks, within = find_overlap(splits)
    if leaks and not allowed:
        split, path, other_split, other_path, how = leaks[0]
        raise UserError(f"{len(leaks)} image(s) appear in two of {', '.join(splits)}, e.g. {path} ({split}) and "
                        f"{other_path} ({other_split}) have the same {how}: scores would count images trained on; "
                        f"split the data with python tools/split_images.py, which keeps copies on one side, or pass "
                        f"--allow_overlap true")
    if within:
        warn(f"{within} image(s) repeat another of their own split (as a copy or the same pixels): each copy counts "
             f"again in that split's loss or scores")
    return len(leaks), within
