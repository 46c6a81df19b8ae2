"""WAInjectBench honestly, on a local stand-in with the benchmark's shape (tools/make_synthetic_screenshots.py
--benchmark: its 2 benign and 7 malicious subset names, with byte-for-byte copies and the same pixels saved again):
tools/split_images.py splits the folder with no image (and no copy) on two sides; train_llava.py refuses manifests
that share an image (same bytes, or same pixels where the manifest carries a pixel hash) unless --allow_overlap,
and prints and saves the benchmark's per-subset table, whose counts are the test split's."""

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from test_llava import run_main  # train_llava.main in this process, with fresh Accelerate state

import tools.split_images as split_images
from common.errors import UserError
from common.run_log import file_sha256 as byte_hash
from llava_images import pixel_hash
from llava_metrics import threshold_at_fpr
from tools.make_synthetic_screenshots import BENCHMARK_SUBSETS, make_benchmark_folder
from tools.make_tiny_llava import build_tiny_llava


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    root = tmp_path_factory.mktemp("wainject")
    image = make_benchmark_folder(root / "image", per_subset=8, copies=8, seed=3)
    manifests = split_images.main([str(image), "--output_dir", str(root / "splits")])
    return image, root / "splits", manifests


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_stand_in_has_the_benchmark_s_subsets_and_copies_of_both_kinds(standin):
    image, _, _ = standin
    for kind, subsets in BENCHMARK_SUBSETS.items():
        assert sorted(p.name for p in (image / kind).iterdir()) == sorted(subsets)
    files = sorted(image.rglob("*.png"))
    assert len(files) == 9 * 8 + 8
    by_bytes, by_pixels = Counter(map(byte_hash, files)), Counter(map(pixel_hash, files))
    assert sum(n - 1 for n in by_bytes.values()) == 4 and sum(n - 1 for n in by_pixels.values()) == 8


def test_every_image_is_in_one_split_and_every_group_of_copies_too(standin, capsys):
    image, splits, manifests = standin
    records = [(split, r) for split, rs in manifests.items() for r in rs]
    paths = [(splits / r["path"]).resolve() for _, r in records]
    assert sorted(paths) == sorted(p.resolve() for p in image.rglob("*.png"))  # all of them, each once
    assert {split: read(splits / f"{split}.jsonl") for split in manifests} == manifests
    split_of_pixels = {}
    for (split, record), path in zip(records, paths):
        assert record["pixel_hash"] == pixel_hash(path)
        assert split_of_pixels.setdefault(record["pixel_hash"], split) == split, f"a copy of {path} is in two splits"
        assert record["label"] == (path.parts[-3] == "malicious") and record["subset"] == path.parts[-2]
    # Stratified: every class and subset with 8 images has about 20% in test and 10% in validation.
    counts = Counter((split, r["subset"]) for split, r in records)
    assert all(1 <= counts["test", s] <= 3 and counts["val", s] <= 2 for kind in BENCHMARK_SUBSETS.values()
               for s in kind)
    with pytest.raises(UserError, match="is not a new or empty folder"):
        split_images.main([str(image), "--output_dir", str(splits)])
    with pytest.raises(UserError, match=r"--val 0.6 and --test 0.5 must be shares"):
        split_images.main([str(image), "--output_dir", str(splits.parent / "new"), "--val", "0.6", "--test", "0.5"])
    assert not (splits.parent / "new").exists()


def test_split_train_and_test_give_the_benchmark_s_table_on_the_test_split(standin, tiny_model, tmp_path):
    _, splits, manifests = standin
    out = tmp_path / "run"
    results = run_main("--config", Path(__file__).parents[1] / "configs/llava_tiny_cpu.yaml", "--model", tiny_model,
                       "--epochs", 2,
                       "--num_workers", 0, "--output_dir", out, "--train_data", splits / "train.jsonl",
                       "--val_data", splits / "val.jsonl", "--test_data", splits / "test.jsonl")
    assert results["images_in_two_splits"] == 0 and results["copies_within_a_split"] >= 1
    with open(out / "test_per_subset.csv") as f:
        table = list(csv.DictReader(f))
    test = Counter((r["label"], r["subset"]) for r in manifests["test"])
    assert {(r["class"] == "malicious", r["subset"]): int(r["images"]) for r in table if r["subset"] != "all"} == test
    assert [r["rate"] for r in table] == ["TPR"] * 7 + ["FPR"] * 2 + ["TPR", "FPR"]  # the positive subsets first
    assert int(table[-2]["images"]) + int(table[-1]["images"]) == len(manifests["test"])
    # The threshold is chosen on validation: its FPR there is at most --target_fpr (0.05), whatever it is on test.
    val = [json.loads(line) for line in (out / "val_predictions.jsonl").read_text().splitlines()]
    import numpy as np

    scores, labels = np.array([r["p_yes"] for r in val]), np.array([r["label"] for r in val])
    t = threshold_at_fpr(scores, labels, 0.05)
    assert ((scores >= t) & (labels == 0)).sum() <= 0.05 * (labels == 0).sum()


def test_a_manifest_that_shares_an_image_with_another_split_is_refused_unless_allowed(standin, tiny_model, tmp_path):
    image, splits, manifests = standin
    train, val, test = (read(splits / f"{split}.jsonl") for split in ("train", "val", "test"))
    common = ["--model", tiny_model, "--num_workers", 0, "--epochs", 1, "--batch_size", 8, "--grad_accum_steps", 1]
    # The same bytes: a training image in the test manifest.
    leaky = tmp_path / "test_bytes.jsonl"
    leaky.write_text("".join(json.dumps(dict(r, path=str(splits / r["path"]))) + "\n" for r in [*test, train[0]]))
    name = Path(train[0]["path"]).name
    with pytest.raises(UserError, match=rf"1 image\(s\) appear in two of train, val, test, e\.g\. .*{name} \(test\) "
                                        rf"and .* \(train\) have the same bytes"):
        run_main(*common, "--train_data", splits / "train.jsonl", "--val_data", splits / "val.jsonl",
                 "--test_data", leaky, "--output_dir", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    # The same pixels, other bytes (saved again), found through the pixel hash the split tool wrote.
    copy = tmp_path / "saved_again.png"
    from PIL import Image

    Image.open(splits / train[1]["path"]).save(copy, compress_level=9)
    assert byte_hash(copy) != byte_hash(splits / train[1]["path"])
    resaved = tmp_path / "val_pixels.jsonl"
    resaved.write_text("".join(json.dumps(dict(r, path=str(splits / r["path"]))) + "\n" for r in val)
                       + json.dumps(dict(train[1], path=str(copy))) + "\n")
    with pytest.raises(UserError, match=r"saved_again.png \(val\) and .* \(train\) have the same pixels"):
        run_main(*common, "--train_data", splits / "train.jsonl", "--val_data", resaved,
                 "--output_dir", tmp_path / "refused")
    results = run_main(*common, "--train_data", splits / "train.jsonl", "--val_data", resaved, "--allow_overlap",
                       "true", "--output_dir", tmp_path / "allowed")
    assert results["images_in_two_splits"] == 1
    shutil.rmtree(tmp_path / "allowed")
