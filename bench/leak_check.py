"""What the leak check of train_llava.py costs: byte hashes of every image of train/val/test (and the pixel hashes
the manifests carry), on screenshot-sized images; and what tools/split_images.py's pixel hashes cost, once.

    python bench/leak_check.py --images 3000        # synthetic 1280x800 pages, written once into --folder

Prints a table: images, megabytes, seconds for the leak check (cold: first read; warm: the files in the page
cache, as right after the header check train_llava.py makes), and seconds to decode and hash the pixels.
"""

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava_images import find_overlap, in_threads, pixel_hash  # noqa: E402
from tools.make_synthetic_screenshots import _inject, _page  # noqa: E402


class Image:  # what find_overlap reads of a sample
    def __init__(self, path: Path, pixels: str | None = None):
        self.path, self.pixel_hash = path, pixels


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n pages of 1280x800, a third with an injected element, saved as PNG (written once, reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, paths = random.Random(seed), []
    for i in range(n):
        path = folder / f"page_{i:05d}.png"
        if not path.exists():
            img = _page(rng, 1280, 800, rng.choice(["article", "shop"]))
            (_inject(rng, img, rng.choice(["popup", "banner"])) if i % 3 == 0 else img).save(path, compress_level=6)
        paths.append(path)
    return paths


def drop_page_cache(paths: list[Path]) -> bool:
    """Ask the kernel to forget these files' pages (Linux), so that the next read is from the disk."""
    try:
        import os

        for path in paths:
            with open(path, "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except (AttributeError, OSError):
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--folder", default="runs/leak_check_images", help="where the images are written once")
    args = parser.parse_args()
    paths = make_images(Path(args.folder), args.images)
    megabytes = sum(p.stat().st_size for p in paths) / 2**20
    splits = {"train": paths[: int(0.7 * len(paths))], "val": paths[int(0.7 * len(paths)): int(0.8 * len(paths))],
              "test": paths[int(0.8 * len(paths)):]}

    start = time.perf_counter()
    pixels = dict(zip(paths, in_threads(pixel_hash, paths)))
    pixel_seconds = time.perf_counter() - start
    rows = []
    for cache in ("cold", "warm"):
        if cache == "cold" and not drop_page_cache(paths):
            continue
        for carried in (False, True):
            samples = {name: [Image(p, pixels[p] if carried else None) for p in ps] for name, ps in splits.items()}
            start = time.perf_counter()
            leaks, within = find_overlap(samples)
            rows.append((cache, carried, time.perf_counter() - start, len(leaks), within))
            drop_page_cache(paths) if cache == "cold" else None
    print(f"\n{len(paths)} images, {megabytes:,.0f} MB (PNG, 1280x800)\n")
    print("| what | page cache | pixel hashes in the manifests | seconds | images in two splits |")
    print("|---|---|---|---|---|")
    for cache, carried, seconds, leaks, _ in rows:
        print(f"| leak check (train_llava.py) | {cache} | {'yes' if carried else 'no'} | {seconds:.2f} | {leaks} |")
    print(f"| pixel hashes (tools/split_images.py, once) | | | {pixel_seconds:.2f} | |")


if __name__ == "__main__":
    main()
