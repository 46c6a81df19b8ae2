"""Split labelled images into train/val/test manifests for train_llava.py, with no image on two sides of the split.

    python tools/split_images.py wainject/image --output_dir wainject/splits      # 70 / 10 / 20 per class and subset
    python tools/split_images.py all.jsonl --output_dir splits --val 0.1 --test 0.2 --seed 0

SOURCE is a folder laid out as {<negative>,<positive>}/<subset>/<image> (WAInjectBench's image/: benign/ and
malicious/; --negative_label and --positive_label name others) or a JSONL manifest of {"path", "label", "subset"}.
Every image lands in exactly one split, stratified by class and subset, and every group of identical images (the
same decoded pixels, whatever their bytes: a copy, or the same picture saved again) in one split, so that no test
image is a copy of one trained on. The manifests hold one {"path", "label", "subset", "pixel_hash"} per line, paths
relative to --output_dir; the pixel hash lets train_llava.py's leak check compare pixels without decoding again.
It prints the counts per split, class and subset, and the duplicate groups found. It writes only into a new or
empty folder.
"""

import argparse
import json
import os
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo's modules are importable

from common.errors import UserError, exit_on_user_error  # noqa: E402
from llava_images import in_threads, pixel_hash  # noqa: E402

SPLITS = ("train", "val", "test")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], exit_on_error=False)
    parser.add_argument("source", help="a {<negative>,<positive>}/<subset>/<image> folder or a JSONL manifest")
    parser.add_argument("--output_dir", required=True, help="a new or empty folder for train/val/test.jsonl")
    parser.add_argument("--val", type=float, default=0.1, help="share of each class and subset for validation")
    parser.add_argument("--test", type=float, default=0.2, help="share of each class and subset for the test set")
    parser.add_argument("--seed", type=int, default=0, help="seed of the assignment")
    parser.add_argument("--negative_label", default="benign", help="the folder name of class 0")
    parser.add_argument("--positive_label", default="malicious", help="the folder name of class 1")
    try:
        args, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as err:
        raise UserError(f"{err}; see --help") from None
    if unknown:
        raise UserError(f"unexpected argument {unknown[0]!r}; see --help")
    if not (0 <= args.val < 1 and 0 <= args.test < 1 and args.val + args.test < 1):
        raise UserError(f"--val {args.val:g} and --test {args.test:g} must be shares from 0 that leave some images to "
                        f"train on (val + test < 1); pass e.g. --val 0.1 --test 0.2")
    out = Path(args.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--output_dir {out} is not a new or empty folder; the manifests are written only into one")
    return args


def groups_of(samples: list, hashes: list[str]) -> list[list[int]]:
    """Indices of `samples` grouped by identical pixels, in the order of each group's first image."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, digest in enumerate(hashes):
        by_hash[digest].append(i)
    return list(by_hash.values())


def assign(samples: list, groups: list[list[int]], shares: dict[str, float], seed: int) -> dict[int, str]:
    """split of every sample: within each (class, subset) of a group's first image, groups in a seeded order fill the
    test and validation shares (rounded), the rest trains; a group never straddles two splits."""
    strata: dict[tuple, list[list[int]]] = defaultdict(list)
    for group in groups:
        strata[(samples[group[0]].label, samples[group[0]].subset)].append(group)
    split_of = {}
    for stratum, members in sorted(strata.items()):
        random.Random(f"{seed}/{stratum}").shuffle(members)
        size = sum(len(group) for group in members)
        targets, counts = {name: round(share * size) for name, share in shares.items()}, Counter()
        for group in members:
            split = next((name for name in ("test", "val") if counts[name] + len(group) <= targets[name]), "train")
            counts[split] += len(group)
            split_of.update(dict.fromkeys(group, split))
    return split_of


def main(argv=None) -> dict[str, list]:
    args = parse_args(argv)
    import train_llava  # its reader: the same layouts, checks and error lines as training

    classes = (args.negative_label, args.positive_label)
    samples, _ = train_llava.load_samples(args.source, skip_bad=False, classes=classes)
    try:
        hashes = in_threads(pixel_hash, [sample.path for sample in samples])
    except (OSError, ValueError, SyntaxError) as err:
        raise UserError(f"an image of {args.source} cannot be decoded ({err}); fix or remove it") from None
    groups = groups_of(samples, hashes)
    split_of = assign(samples, groups, {"val": args.val, "test": args.test}, args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in SPLITS:
        records = [{"path": os.path.relpath(sample.path.absolute(), out.absolute()), "label": sample.label,
                    "subset": sample.subset, "pixel_hash": hashes[i]}
                   for i, sample in enumerate(samples) if split_of[i] == split]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
        written[split] = records
    report(written, groups, samples, classes)
    return written


def report(written: dict[str, list], groups: list[list[int]], samples: list, classes: tuple[str, str]) -> None:
    """The counts per split, class and subset, and the duplicates found, as a table on the console."""
    subsets = sorted({(record["label"], record["subset"]) for records in written.values() for record in records})
    print(f"| class | subset | {' | '.join(SPLITS)} |\n|---|---|{'---|' * len(SPLITS)}")
    for label, subset in subsets:
        counts = [sum(r["label"] == label and r["subset"] == subset for r in written[split]) for split in SPLITS]
        print(f"| {classes[label]} | {subset or '-'} | {' | '.join(map(str, counts))} |")
    print(f"| all | | {' | '.join(str(len(written[split])) for split in SPLITS)} |")
    duplicates = [group for group in groups if len(group) > 1]
    mixed = sum(len({samples[i].label for i in group}) > 1 for group in duplicates)
    print(f"{len(duplicates)} groups of identical images ({sum(map(len, duplicates))} images), each kept in one split"
          + (f"; {mixed} of them hold images of both classes: check their labels" if mixed else ""))


if __name__ == "__main__":
    exit_on_user_error(main)
