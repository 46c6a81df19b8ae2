"""Reading image files a user supplies (train_llava.py, predict_llava.py): every mode to 8-bit RGB, upright, and a
cheap header check before training.

Screenshots come as PNG, JPEG, WebP, ... in RGBA, CMYK, palette or 16-bit modes, and now and then
as a file that is empty, cut short, not an image at all, or one whose header claims billions of
pixels (a decompression bomb: decoding it would exhaust memory). `image_problem` finds what the
header (and, for PNG, the chunk checksums) show, before anything is trained or written; `load_rgb`
decodes, in DataLoader workers, and reports what only decoding finds (a JPEG cut short).
"""

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from common.errors import UserError, warn

# What reading an image can raise: missing or unreadable files (OSError), unknown formats and broken
# headers (PIL's UnidentifiedImageError is an OSError; some decoders raise ValueError or SyntaxError).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def open_checked(path: Path) -> Image.Image:
    """Open an image (reads its header only); refuse one whose pixel count could exhaust memory when decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with a clearer message
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
    img = ImageOps.exif_transpose(img)  # a phone photo stored sideways with a "rotate 90" tag: upright, as shown
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit grayscale: convert("RGB") would clip it
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")


def image_problems(paths: list[Path]) -> list[str | None]:
    """`image_problem` of each path, read in parallel threads (headers only: quick, and I/O-bound)."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(image_problem, paths))


def check_bad_images(bad: list[str], skip: bool, seen: set) -> None:
    """Images a DataLoader worker could not decode: stop on the first (one clear line), or remember and skip them."""
    for entry in bad:
        if not skip:
            raise UserError(f"cannot read image {entry}; fix or remove it, or pass --skip_bad_images")
        if entry not in seen:
            seen.add(entry)
            warn(f"skipping unreadable image {entry}", every_process=True)  # seen by this process only
