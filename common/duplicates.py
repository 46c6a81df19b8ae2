"""The same image twice, for train_llava.py (the leak check between train, val and test) and tools/split_images.py
(which keeps every group of identical images on one side of a split): a file's byte hash, the hash of its decoded
pixels, and the images that two splits share.

"The same image" means the same bytes, or the same decoded pixels (upright RGB: a PNG saved again with other
settings, or as another lossless format) where a pixel hash is known. Decoding costs far more than hashing bytes,
so the split tool decodes once and writes each image's pixel hash into its manifests; the leak check hashes bytes
and reads the pixel hashes the manifests carry.
"""

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.errors import UserError, warn
from common.images import load_rgb


def byte_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pixel_hash(path: Path) -> str:
    """The hash of the decoded, upright RGB pixels and the picture's size."""
    img = load_rgb(path)
    return hashlib.sha256(f"{img.width}x{img.height}:".encode() + img.tobytes()).hexdigest()


def hash_all(function, paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(8) as pool:  # hashlib and PIL's decoders release the GIL
        return list(pool.map(function, paths))


def find_overlap(splits: dict[str, list]) -> tuple[list[tuple[str, Path, str, Path, str]], int]:
    """Images (objects with .path and an optional .pixel_hash) that appear in two splits, as (split, path, other
    split, other path, "bytes" or "pixels"), one entry per image that repeats an image of an earlier split; and how
    many images repeat one of their own split."""
    first: dict[tuple[str, str], tuple[str, Path]] = {}
    leaks, within = [], 0
    for split, samples in splits.items():
        byte_hashes = hash_all(byte_hash, [sample.path for sample in samples])
        for sample, digest in zip(samples, byte_hashes):
            pixels = getattr(sample, "pixel_hash", None)  # carried by the manifests tools/split_images.py writes
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
    """Refuse images that appear in two of the splits (one line naming a pair and the fix) unless `allowed`;
    returns (images in two splits, copies within a split)."""
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
