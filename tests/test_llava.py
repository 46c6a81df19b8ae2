"""train_llava.py on CPU with a tiny random LLaVA and synthetic screenshots (no network).

The tiny model, the screenshots and one full training run are built once per session; most tests
reuse them. Runs call `main()` in-process (resetting Accelerate's singletons around each call);
a few go through the command line to check the exit code and the one-line error, and that the
console holds the script's own lines only. The tests of
the answer position and of padding run for every tested family (LLaVA-1.5, LLaVA-NeXT, Idefics3); the
other families' training tests are in test_vlm_families.py.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts are files in the repo root, not an installed package

import predict_llava  # noqa: E402
import train_llava  # noqa: E402
from common.errors import UserError, exit_on_user_error  # noqa: E402
from common.schedules import warmup_cosine  # noqa: E402
from llava_metrics import classification_metrics  # noqa: E402
from llava_models import load_processor  # noqa: E402
from tools.make_synthetic_screenshots import make_dataset  # noqa: E402
from tools.make_tiny_llava import build_tiny_llava  # noqa: E402


def run_main(*args, script=train_llava):
    """train_llava.main (or another script's) in this process, with fresh Accelerate state (a per-process singleton).

    One intra-op thread: the tiny model's tensors gain nothing from more, and when another process
    holds a core, a second OpenMP thread stalls every op (runs took 20x longer here on 2 shared cores).
    """
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        return script.main([str(a) for a in args])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


FAMILIES = ["llava", "llava_next", "idefics3"]


@pytest.fixture(scope="session")
def family_models(tiny_model, tmp_path_factory):
    """family -> the folder of its tiny model (tools/make_tiny_llava.py --family), built once, on first use."""
    built = {"llava": tiny_model}

    def get(family):
        if family not in built:
            built[family] = build_tiny_llava(tmp_path_factory.mktemp(f"tiny_{family}"), family=family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("screenshots"), {"train": 400, "val": 100, "test": 40}, seed=0)


def demo_args(tiny_model, data, output_dir, *extra):
    """The CPU demo config, pointed at the session's model and data."""
    return ["--config", ROOT / "configs/llava_tiny_cpu.yaml", "--model", tiny_model,
            "--train_data", data / "train.jsonl", "--val_data", data / "val.jsonl",
            "--test_data", data / "test.jsonl", "--output_dir", output_dir, "--num_workers", 0, *extra]


@pytest.fixture(scope="session")
def trained_run(tiny_model, screenshots, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run")
    results = run_main(*demo_args(tiny_model, screenshots, output_dir, "--merge", "true"))
    return output_dir, results


def load_base_and_processor(model, dtype):
    processor = load_processor(str(model))
    return train_llava.load_base(str(model), processor, dtype), processor


@pytest.fixture
def loaded(tiny_model):
    base, processor = load_base_and_processor(tiny_model, torch.float32)
    return base.eval(), processor


def batch_for(processor, images, questions):
    prompts = [train_llava.build_prompt(processor, q) for q in questions]
    return dict(processor(images=images, text=prompts, padding=True, return_tensors="pt"))


def write_manifest(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def records_of(data: Path, split: str, n: int) -> list[dict]:
    """The first n records of a split, with absolute paths so the manifest can live elsewhere."""
    lines = (data / f"{split}.jsonl").read_text().splitlines()[:n]
    return [dict(r, path=str(data / r["path"])) for r in map(json.loads, lines)]


# ----------------------------------------------------------------------------------------------
# The tiny model, the prompt and the answer logits
# ----------------------------------------------------------------------------------------------


def test_tiny_model_save_load_round_trip(tiny_model, loaded, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    base, processor = loaded
    assert base.config.vision_config.model_type == "clip_vision_model"
    assert base.config.text_config.model_type == "llama"
    assert processor.patch_size == 8 and processor.num_additional_image_tokens == 1
    inputs = batch_for(processor, [Image.new("RGB", (120, 80), "red")], ["Is this a prompt injection?"])
    assert (inputs["input_ids"] == base.config.image_token_id).sum() == 64  # (64 / 8)^2 patches, CLS dropped
    base.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    processor_again = AutoProcessor.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(base.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    inputs_again = batch_for(processor_again, [Image.new("RGB", (120, 80), "red")], ["Is this a prompt injection?"])
    assert torch.equal(inputs["input_ids"], inputs_again["input_ids"])
    assert torch.equal(inputs["pixel_values"], inputs_again["pixel_values"])
    with torch.no_grad():
        assert torch.equal(base(**inputs).logits, again(**inputs_again).logits)


def test_yes_no_are_single_tokens_and_splits_are_refused(loaded):
    _, processor = loaded
    tokenizer = processor.tokenizer
    no_id, yes_id = train_llava.answer_token_ids(tokenizer, "No", "Yes")
    assert tokenizer.convert_ids_to_tokens([no_id, yes_id]) == ["No", "Yes"]
    assert train_llava.build_prompt(processor, "Is it?").endswith("ASSISTANT:")
    with pytest.raises(UserError, match=r"'Yes\.' is not one known token.*\['Yes', '\.'\].*--yes_token"):
        train_llava.answer_token_ids(tokenizer, "No", "Yes.")
    with pytest.raises(UserError, match="'Nope' is not one known token"):  # maps to <unk>
        train_llava.answer_token_ids(tokenizer, "Nope", "Yes")
    with pytest.raises(UserError, match="are the same token"):
        train_llava.answer_token_ids(tokenizer, "Yes", "Yes")


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_logits_equal_the_full_forward_at_the_answer_position(family_models, family):
    base, processor = load_base_and_processor(family_models(family), torch.float32)
    base.eval()
    ids = train_llava.answer_token_ids(processor.tokenizer, "No", "Yes")
    images = [Image.new("RGB", (200, 100), "red"), Image.new("RGB", (90, 90), "blue")]
    questions = ["Is this a prompt injection?", "Does this page contain any text?"]
    inputs = batch_for(processor, images, questions)
    assert (inputs["attention_mask"] == 0).any()  # prompts of different lengths: the batch is padded
    image_tokens = (inputs["input_ids"] == base.config.image_token_id).sum(1).tolist()
    if family == "llava":
        assert image_tokens == [64, 64]  # (64 / 8)^2 patches, whatever the picture
    else:  # LLaVA-NeXT's anyres grid, Idefics3's tiles: the picture's shape sets how many tokens it becomes
        assert image_tokens[0] != image_tokens[1]
    with torch.no_grad():
        answer = train_llava.answer_logits(base, inputs, ids)
        for row in range(2):  # each sample alone, no padding, every position's logits computed
            single = batch_for(processor, images[row : row + 1], questions[row : row + 1])
            assert single["attention_mask"].all()
            full = base(**single).logits  # (1, length, vocab)
            assert full.shape[1] == inputs["attention_mask"][row].sum()
            torch.testing.assert_close(answer[row], full[0, -1, ids], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_and_right_padding_give_the_same_predictions(family_models, family):
    base, processor = load_base_and_processor(family_models(family), torch.float32)
    base.eval()
    ids = train_llava.answer_token_ids(processor.tokenizer, "No", "Yes")
    images = [Image.new("RGB", (200, 100), "red"), Image.new("RGB", (90, 160), "blue"),
              Image.new("RGB", (64, 64), "white")]
    questions = ["Is this a prompt injection?", "Does this page contain any text?", "Is it?"]
    probs = {}
    for side in ("left", "right"):
        processor.tokenizer.padding_side = side
        inputs = batch_for(processor, images, questions)
        column = 0 if side == "left" else -1
        assert (inputs["attention_mask"][:, column] == 0).any()  # really padded on that side
        with torch.no_grad():
            probs[side] = train_llava.answer_logits(base, inputs, ids).softmax(-1)
    torch.testing.assert_close(probs["left"], probs["right"], rtol=1e-5, atol=1e-6)
    assert torch.equal(probs["left"].argmax(-1), probs["right"].argmax(-1))


def test_lora_is_fp32_and_trains_the_vision_tower_under_gradient_checkpointing(tiny_model):
    cfg = train_llava.Config(model=str(tiny_model), gradient_checkpointing=True, lora_dropout=0.0,
                             lora_vision_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    base, processor = load_base_and_processor(cfg.model, torch.bfloat16)
    model = train_llava.add_lora(cfg, base).train()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n and p.dtype == torch.float32 for n, p in lora.items())
    assert any(".vision_tower." in n for n in lora) and any(".language_model." in n for n in lora)
    ids = train_llava.answer_token_ids(processor.tokenizer, "No", "Yes")
    inputs = batch_for(processor, [Image.new("RGB", (100, 100), "red")] * 2, ["Is it?"] * 2)
    # B is zero-initialised: give it a value so gradients reach A as well.
    with torch.no_grad():
        for n, p in lora.items():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = train_llava.answer_logits(model, inputs, ids)
    train_llava.detector_loss(logits, torch.tensor([0, 1]), torch.ones(2), None).backward()
    # vision_feature_layer=-2: the tower's last layer does not feed the model, so it gets no LoRA (it could never
    # learn); every LoRA weight there is must learn.
    assert not any("encoder.layers.1." in n for n in lora) and any("encoder.layers.0." in n for n in lora)
    no_grad = [n for n, p in lora.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad


def test_loss_weights_classes_and_ignores_placeholders():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.2], [-1.0, 3.0], [9.0, -9.0]])
    labels = torch.tensor([0, 1, 1, 1])
    valid = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the last one stands for an unreadable image
    per_sample = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert train_llava.detector_loss(logits, labels, valid, None).item() == pytest.approx(per_sample[:3].mean().item())
    weights = torch.tensor([1.0, 3.0])  # [No, Yes]
    expected = (per_sample[0] + 3 * per_sample[1] + 3 * per_sample[2]) / 7
    assert train_llava.detector_loss(logits, labels, valid, weights).item() == pytest.approx(expected.item())
    assert train_llava.detector_loss(logits, labels, torch.zeros(4), weights).item() == 0.0


def test_metrics_match_a_pairwise_auroc_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) * 0.6 + 0.4 * labels, 1)  # rounded: many ties
    subsets = ["popup" if y else "news" for y in labels]
    m = classification_metrics(scores, labels, subsets, target_fpr=0.1)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert m["auroc"] == pytest.approx(pairwise)
    pred = scores >= 0.5
    assert m["accuracy"] == pytest.approx((pred == labels).mean())
    assert m["per_subset"]["popup"]["tpr"] == pytest.approx(pred[labels == 1].mean())
    assert m["per_subset"]["news"]["fpr"] == pytest.approx(pred[labels == 0].mean())
    c = m["confusion_matrix"]
    assert c["tp"] + c["fn"] == labels.sum() and c["tn"] + c["fp"] == (1 - labels).sum()
    fpr, tpr = (np.array(v) for v in m["roc"])
    assert m["tpr_at_fpr_0.1"] == tpr[fpr <= 0.1].max() and fpr[-1] == tpr[-1] == 1.0
    one_class = classification_metrics(scores[labels == 1], labels[labels == 1], ["x"] * len(pos), 0.1)
    assert one_class["auroc"] is None  # undefined, not a misleading number


# ----------------------------------------------------------------------------------------------
# Data: manifests, folders, image modes, resize policy, bad inputs
# ----------------------------------------------------------------------------------------------


def test_folder_layout_reads_like_the_manifest(screenshots):
    from_manifest, _ = train_llava.load_samples(str(screenshots / "val.jsonl"), skip_bad=False)
    from_folder, _ = train_llava.load_samples(str(screenshots / "val"), skip_bad=False)
    as_set = lambda samples: {(s.path.resolve(), s.label, s.subset) for s in samples}  # noqa: E731
    assert len(from_folder) == 100 and as_set(from_folder) == as_set(from_manifest)
    assert {s.subset for s in from_folder} == {"article", "shop", "popup", "banner"}


def test_alpha_cmyk_and_16_bit_images_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent: shows the white background
    rgba.save(tmp_path / "alpha.png")
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    gray16 = np.full((4, 4), 65535, dtype=np.uint16)
    gray16[0, 0] = 32896  # 128 * 257
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    palette = Image.new("P", (4, 4), 0)
    palette.save(tmp_path / "palette.png", transparency=0)

    images = {p.name: train_llava.load_rgb(p) for p in tmp_path.iterdir()}
    assert all(img.mode == "RGB" and img.size == (4, 4) for img in images.values())
    assert images["alpha.png"].getpixel((0, 0)) == (255, 255, 255)
    assert images["alpha.png"].getpixel((1, 1)) == (255, 0, 0)
    assert images["la.png"].getpixel((1, 1)) == (255, 255, 255)  # transparent black on white
    r, g, b = images["cmyk.jpg"].getpixel((1, 1))
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red
    assert images["gray16.png"].getpixel((0, 0)) == (128, 128, 128)  # scaled, not clipped to white
    assert images["gray16.png"].getpixel((1, 1)) == (255, 255, 255)
    assert images["palette.png"].getpixel((0, 0)) == (255, 255, 255)


def test_a_phone_photo_stored_sideways_reaches_the_model_upright(loaded, tmp_path):
    """A JPEG whose pixels are stored rotated, with the EXIF tag that says "rotate 90 to show" (orientation 6): the
    model gets the upright picture (as a PNG of it would give), in every path (they all read through load_rgb)."""
    _, processor = loaded
    upright = Image.new("RGB", (96, 64), (240, 240, 240))
    upright.paste((200, 30, 30), (0, 0, 48, 20))  # a red block in the top-left corner: not symmetric under rotation
    upright.save(tmp_path / "upright.png")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # how the phone stored it: 64 x 96, turned
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the 0th row is the visual right side; show it turned 90 degrees clockwise
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    stored.save(tmp_path / "untagged.jpg", quality=95)
    assert train_llava.load_rgb(tmp_path / "photo.jpg").size == (96, 64)

    def pixels(name):
        items = [(0, train_llava.Sample(tmp_path / name, 1, ""))]
        inputs = train_llava.collate(items, processor, "USER: <image>\nIs it? ASSISTANT:", "pad")["inputs"]
        return inputs["pixel_values"][0]

    assert (pixels("photo.jpg") - pixels("upright.png")).abs().mean() < 0.05  # JPEG's rounding only
    assert (pixels("untagged.jpg") - pixels("upright.png")).abs().mean() > 0.2  # what the model saw before


def test_pad_keeps_off_centre_content_that_crop_cuts(loaded, tmp_path):
    _, processor = loaded
    wide = Image.new("RGB", (400, 100), "white")
    wide.paste(Image.new("RGB", (60, 100), "red"), (0, 0))  # a red strip at the far left
    wide.save(tmp_path / "wide.png")
    items = [(0, train_llava.Sample(tmp_path / "wide.png", 1, ""))]

    def red_pixels(resize):
        inputs = train_llava.collate(items, processor, "USER: <image>\nIs it? ASSISTANT:", resize)["inputs"]
        pixels = inputs["pixel_values"][0]
        return int(((pixels[0] > 1.0) & (pixels[1] < -1.0)).sum())  # normalised: high red, low green

    assert red_pixels("pad") > 0 and red_pixels("stretch") > 0
    assert red_pixels("crop") == 0  # the processor's centre crop drops the left edge


def test_bad_label_is_a_one_line_error_with_exit_code_2(screenshots, tmp_path):
    records = records_of(screenshots, "train", 4)
    records[2]["label"] = 2
    manifest = write_manifest(tmp_path / "bad.jsonl", records)
    proc = subprocess.run([sys.executable, str(ROOT / "train_llava.py"), "--train_data", manifest, "--val_data",
                           manifest, "--output_dir", tmp_path / "out"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {manifest} line 3 has label 2; labels are 0 (benign) or 1 (prompt "
                                   f"injection); fix the line or pass --skip_bad_images")


def test_missing_and_corrupt_images_are_clear_errors(tiny_model, screenshots, tmp_path):
    records = records_of(screenshots, "train", 8)
    missing = write_manifest(tmp_path / "missing.jsonl", records + [{"path": "nowhere.png", "label": 1}])
    with pytest.raises(UserError, match=r"line 9 names image .*nowhere.png, which does not exist; fix the line or "
                                        r"pass --skip_bad_images"):
        run_main("--train_data", missing, "--val_data", missing, "--output_dir", tmp_path / "a")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    corrupt = write_manifest(tmp_path / "corrupt.jsonl", [{"path": "corrupt.png", "label": 0}] + records)
    with pytest.raises(UserError, match=r"^cannot read image .*corrupt.png \(.*\); fix or remove it, or pass "
                                        r"--skip_bad_images$") as err:
        run_main("--model", tiny_model, "--train_data", corrupt, "--val_data", corrupt, "--output_dir", tmp_path / "b",
                 "--num_workers", 0, "--batch_size", 4)
    assert "\n" not in str(err.value)


def test_skip_bad_images_skips_and_counts_them(tiny_model, screenshots, tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    Image.new("RGB", (300, 200), "white").save(tmp_path / "truncated.jpg")
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "truncated.jpg").read_bytes()[:200])
    train = records_of(screenshots, "train", 16) + [
        {"path": "corrupt.png", "label": 1}, {"path": "missing.png", "label": 0},
        {"path": records_of(screenshots, "train", 1)[0]["path"], "label": "yes"}]
    val = records_of(screenshots, "val", 12) + [{"path": "truncated.jpg", "label": 0}]
    results = run_main("--model", tiny_model, "--train_data", write_manifest(tmp_path / "train.jsonl", train),
                       "--val_data", write_manifest(tmp_path / "val.jsonl", val), "--output_dir", tmp_path / "out",
                       "--skip_bad_images", "true", "--num_workers", 0, "--batch_size", 6, "--grad_accum_steps", 1,
                       "--epochs", 1, "--log_every", 1)
    # 2 manifest lines (missing file, bad label) + 2 unreadable files (corrupt PNG, truncated JPEG)
    assert results["skipped_bad_images"] == 4
    assert results["val_num_samples"] == 12  # the truncated JPEG's placeholder is not scored
    losses = [r["train/loss"] for r in map(json.loads, (tmp_path / "out/metrics.jsonl").read_text().splitlines())
              if "train/loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)  # 17 images in batches of 6


# ----------------------------------------------------------------------------------------------
# Training end to end: learning, saved adapter, predict mode, merge, guard fallback
# ----------------------------------------------------------------------------------------------


def test_tiny_model_learns_the_synthetic_task(trained_run):
    output_dir, results = trained_run
    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["val_accuracy"] >= 0.9
    assert saved["val_auroc"] >= 0.95 and saved["val_f1"] >= 0.9
    assert saved["test_accuracy"] >= 0.85
    assert saved["num_processes"] == 1 and saved["distributed_type"] == "NO" and saved["mixed_precision"] == "no"
    assert saved["val_per_subset"]["popup"]["malicious"] + saved["val_per_subset"]["banner"]["malicious"] == 50
    assert 0 <= saved["val_per_subset"]["article"]["fpr"] <= 1
    assert saved["best_metric"] == "auroc" and saved["skipped_bad_images"] == 0
    assert saved["train_samples_per_second"] > 0 and saved["peak_memory_mb"] > 0
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/processor_config.json",
                 "adapter/detector.json", "roc_curve.png", "metrics.jsonl", "val_predictions.jsonl",
                 "merged/config.json"):
        assert (output_dir / name).is_file(), name


def test_building_the_tiny_model_leaves_the_callers_random_state_alone(tmp_path):
    """The demo's first run builds the tiny model: that must not reseed the run (it would train differently
    from every later run, which finds the model built). The script also sets its seed after the builders."""
    torch.manual_seed(3)
    before = torch.get_rng_state()
    build_tiny_llava(tmp_path / "model", seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    again = build_tiny_llava(tmp_path / "again", seed=0)  # and the model itself still comes from its own seed
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "model" / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reloaded_adapter_reproduces_predictions_exactly(trained_run, tiny_model, screenshots, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    output_dir, _ = trained_run
    adapter = load_file(output_dir / "adapter/adapter_model.safetensors")
    assert adapter and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in adapter.values())
    model, _, _ = predict_llava.load_trained(str(tiny_model), output_dir / "adapter", torch.float32)
    assert isinstance(model, PeftModel)

    run_main("--model", tiny_model, "--run_dir", output_dir, "--data", screenshots / "val.jsonl", "--output",
             tmp_path / "p.jsonl", "--batch_size", 50, "--num_workers", 0, script=predict_llava)
    read = lambda path: {r["path"]: r for r in map(json.loads, path.read_text().splitlines())}  # noqa: E731
    during_training, reloaded = read(output_dir / "val_predictions.jsonl"), read(tmp_path / "p.jsonl")
    assert len(reloaded) == 100 and reloaded.keys() == during_training.keys()
    assert all(reloaded[k]["p_yes"] == during_training[k]["p_yes"] for k in reloaded)  # exactly, not approximately
    accuracy = np.mean([(r["p_yes"] >= 0.5) == r["label"] for r in reloaded.values()])
    assert accuracy == json.loads((output_dir / "results.json").read_text())["val_accuracy"]

    # --merge: base + adapter folded into plain LLaVA weights give the same P(Yes) up to rounding.
    from transformers import LlavaForConditionalGeneration

    merged = LlavaForConditionalGeneration.from_pretrained(output_dir / "merged").eval()
    _, processor = load_base_and_processor(output_dir / "merged", torch.float32)
    samples, _ = train_llava.load_samples(str(screenshots / "val.jsonl"), skip_bad=False)
    prompt = train_llava.build_prompt(processor, train_llava.QUESTION)
    batch = train_llava.collate(list(enumerate(samples[:8])), processor, prompt, "pad")
    ids = train_llava.answer_token_ids(processor.tokenizer, "No", "Yes")
    with torch.no_grad():
        p_yes = train_llava.answer_logits(merged, batch["inputs"], ids).softmax(-1)[:, 1]
    expected = torch.tensor([during_training[str(s.path)]["p_yes"] for s in samples[:8]])
    torch.testing.assert_close(p_yes, expected, rtol=0, atol=1e-4)


def test_guard_falls_back_to_fp32_with_lr_backoff(tiny_model, screenshots, tmp_path, monkeypatch):
    """A NaN loss at update 3 under bf16: that update is skipped, the run continues without autocast with half the
    LR: the LoRA weights compute in fp32, the frozen bf16 base stays bf16 (fp32's range, and it does not learn)."""
    from safetensors.torch import load_file

    seen = []  # (training?, dtype the last LoRA layer computed in, dtype of the frozen lm_head) per forward
    real_answer_logits = train_llava.answer_logits

    def answer_logits_with_a_nan(model, inputs, answer_ids):
        # Accelerate converts the model's outputs to fp32: look inside, at the last LoRA layer's own output.
        lora = [m for name, m in model.named_modules() if name.endswith("lora_B.default")][-1]
        computed = []
        hook = lora.register_forward_hook(lambda module, args, output: computed.append(output.dtype))
        logits = real_answer_logits(model, inputs, answer_ids)
        hook.remove()
        seen.append((model.training, computed[0], model.base_model.model.lm_head.weight.dtype))
        if model.training and sum(t for t, _, _ in seen) == 3:
            logits = logits * float("nan")
        return logits

    monkeypatch.setattr(train_llava, "answer_logits", answer_logits_with_a_nan)
    train = write_manifest(tmp_path / "train.jsonl", records_of(screenshots, "train", 32))
    val = write_manifest(tmp_path / "val.jsonl", records_of(screenshots, "val", 8))
    output_dir = tmp_path / "out"
    results = run_main("--model", tiny_model, "--train_data", train, "--val_data", val, "--output_dir", output_dir,
                       "--mixed_precision", "bf16", "--model_dtype", "bf16", "--batch_size", 8, "--grad_accum_steps", 1,
                       "--max_steps", 4, "--epochs", 1, "--warmup_ratio", 0.5, "--lr", 1e-3, "--min_lr_factor", 0.1,
                       "--log_every", 1, "--checkpoint_every", 4, "--num_workers", 0)

    training = [(dtype, weight) for is_training, dtype, weight in seen if is_training]
    assert training == [(torch.bfloat16, torch.bfloat16)] * 3 + [(torch.float32, torch.bfloat16)]
    assert results["fell_back_to_fp32_at_step"] == 3
    optimizer = torch.load(output_dir / "checkpoints/step_00000004/optimizer.bin", weights_only=True)
    assert {float(s["step"]) for s in optimizer["state"].values()} == {3.0}  # 4 updates, the NaN one skipped
    assert all(torch.isfinite(t).all() for t in load_file(output_dir / "adapter/adapter_model.safetensors").values())
    lrs = {r["step"]: r["train/lr"] for r in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())
           if "train/lr" in r}
    schedule = {s: 1e-3 * warmup_cosine(s, 2, 4, final_factor=0.1) for s in range(1, 5)}
    assert lrs[1] > 0  # the first update already has a learning rate
    for step in (1, 2, 3):
        assert lrs[step] == pytest.approx(schedule[step])
    assert lrs[4] == pytest.approx(0.5 * schedule[4])  # backoff x schedule, not undone by the schedule


def test_resume_from_a_checkpoint_continues_exactly(tiny_model, screenshots, tmp_path):
    import shutil

    from safetensors.torch import load_file

    train = write_manifest(tmp_path / "train.jsonl", records_of(screenshots, "train", 32))
    val = write_manifest(tmp_path / "val.jsonl", records_of(screenshots, "val", 8))
    common = ["--model", tiny_model, "--train_data", train, "--val_data", val, "--batch_size", 8,
              "--grad_accum_steps", 1, "--epochs", 1, "--checkpoint_every", 2, "--lr", 1e-3, "--num_workers", 0]
    run_main(*common, "--output_dir", tmp_path / "straight")
    checkpoint = tmp_path / "straight/checkpoints/step_00000002"
    saved = load_file(checkpoint / "model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # the frozen base is not written into checkpoints
    shutil.copytree(checkpoint, tmp_path / "resumed/checkpoints/step_00000002")
    run_main(*common, "--output_dir", tmp_path / "resumed",
             "--resume_from", tmp_path / "resumed/checkpoints/step_00000002")
    straight = load_file(tmp_path / "straight/adapter/adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed/adapter/adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    last = load_file(tmp_path / "straight/checkpoints/step_00000004/model.safetensors")
    assert any(not torch.equal(saved[k], last[k]) for k in saved)  # steps 3 and 4 did change the weights


# ----------------------------------------------------------------------------------------------
# Never lose a run: kill, preemption, resume after a fallback and at an epoch boundary
# ----------------------------------------------------------------------------------------------


def small_run_args(tiny_model, screenshots, tmp_path, *extra):
    train = write_manifest(tmp_path / "train.jsonl", records_of(screenshots, "train", 32))
    val = write_manifest(tmp_path / "val.jsonl", records_of(screenshots, "val", 8))
    return ["--model", tiny_model, "--train_data", train, "--val_data", val, "--batch_size", 8, "--grad_accum_steps", 1,
            "--epochs", 3, "--checkpoint_every", 1, "--lr", 1e-3, "--num_workers", 0, "--num_threads", 1, *extra]


def assert_same_adapter(a: Path, b: Path):
    from safetensors.torch import load_file

    first, second = (load_file(p / "adapter/adapter_model.safetensors") for p in (a, b))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_killed_or_preempted_run_resumes_to_the_same_adapter(tiny_model, screenshots, tmp_path, signal_name):
    """kill -9 loses nothing past the last checkpoint; SIGTERM checkpoints the current step and exits 75."""
    import signal
    import time

    from common.checkpoint import resolve_resume

    args = [str(a) for a in small_run_args(tiny_model, screenshots, tmp_path)]
    run_main(*args, "--output_dir", tmp_path / "straight")
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "train_llava.py", *args, "--output_dir", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        latest = resolve_resume(out, "latest")
        if latest is not None and json.loads((latest / "meta.json").read_text())["step"] >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(getattr(signal, signal_name))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == (-signal.SIGKILL if signal_name == "SIGKILL" else 75), stderr[-2000:]
    assert not (out / "results.json").exists() and not (out / "adapter").exists()
    if signal_name == "SIGTERM":
        stopped_at = int(stdout.split("stopped by a signal at step ")[1].split()[0])
        assert json.loads((resolve_resume(out, "latest") / "meta.json").read_text())["step"] == stopped_at < 12
    run_main(*args, "--output_dir", out, "--resume_from", "latest")
    assert_same_adapter(tmp_path / "straight", out)


def test_resume_after_a_fallback_or_at_an_epoch_boundary_is_exact(tiny_model, screenshots, tmp_path, monkeypatch):
    import shutil

    real_answer_logits = train_llava.answer_logits
    training_forwards = {"n": 0}

    def nan_at_update_3(model, inputs, answer_ids):
        logits = real_answer_logits(model, inputs, answer_ids)
        training_forwards["n"] += model.training
        return logits * float("nan") if model.training and training_forwards["n"] == 3 else logits

    monkeypatch.setattr(train_llava, "answer_logits", nan_at_update_3)
    args = small_run_args(tiny_model, screenshots, tmp_path, "--epochs", 2, "--mixed_precision", "bf16",
                          "--log_every", 1, "--keep_checkpoints", 100)
    straight = run_main(*args, "--output_dir", tmp_path / "straight")
    assert straight["fell_back_to_fp32_at_step"] == 3 and straight["optimizer_steps"] == 8
    training_forwards["n"] = -1_000_000  # the NaN lies in the past of the resumed runs
    for step in (4, 5):  # the epoch end (after the fallback), and the first step of the next epoch
        checkpoint = tmp_path / "straight" / "checkpoints" / f"step_{step:08d}"
        shutil.copytree(checkpoint, tmp_path / f"from_{step}" / "checkpoints" / checkpoint.name)
        resumed = run_main(*args, "--output_dir", tmp_path / f"from_{step}", "--resume_from", "latest")
        assert resumed["fell_back_to_fp32_at_step"] == 3
        assert_same_adapter(tmp_path / "straight", tmp_path / f"from_{step}")
        assert resumed["val_accuracy"] == straight["val_accuracy"]


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the problem and the fix, and nothing of an existing run touched
# ----------------------------------------------------------------------------------------------


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file whose header claims width x height (what a decompression bomb looks like)."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), "white").save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of header fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case, message", [
    ("empty manifest", r"empty.jsonl holds no usable images; add lines like"),
    ("missing manifest", r"data path .*nowhere.jsonl does not exist; pass a JSONL manifest"),
    ("not JSON", r'garbled.jsonl line 2 is not a JSON object with a "path"; fix the line or pass --skip_bad_images'),
    ("unknown key", r"unknown config key 'lora_rank' in the command line \(did you mean 'lora_r'\?\)"),
    ("wrong type", r"config key 'lora_r' expects int, got 'eight'"),
])
def test_bad_input_leaves_an_existing_run_untouched(trained_run, tiny_model, screenshots, tmp_path, case, message):
    """Each case is refused before anything is written, even when resuming into a finished run's folder (with its
    own model: a resume with another one is refused by the checkpoint's settings, before the data is read)."""
    output_dir, _ = trained_run
    before = snapshot(output_dir)
    good = write_manifest(tmp_path / "good.jsonl", records_of(screenshots, "val", 4))
    manifest = {
        "empty manifest": lambda: write_manifest(tmp_path / "empty.jsonl", []),
        "missing manifest": lambda: tmp_path / "nowhere.jsonl",
        "not JSON": lambda: tmp_path / "garbled.jsonl",
    }.get(case, lambda: good)()
    (tmp_path / "garbled.jsonl").write_text(good.read_text().splitlines()[0] + "\n{'path': oops\n")
    extra = {"unknown key": ["--lora_rank", 8], "wrong type": ["--lora_r", "eight"]}.get(case, [])
    with pytest.raises(UserError, match=message) as err:
        run_main("--train_data", manifest, "--val_data", good, "--output_dir", output_dir, "--resume_from", "latest",
                 "--model", tiny_model, *extra)
    assert "\n" not in str(err.value)
    assert snapshot(output_dir) == before


def test_a_new_run_into_a_folder_holding_another_is_refused(trained_run, screenshots, tmp_path):
    output_dir, _ = trained_run
    good = write_manifest(tmp_path / "good.jsonl", records_of(screenshots, "val", 4))
    with pytest.raises(UserError, match=r"already holds a run; pass --resume_from latest to continue it, --overwrite"):
        run_main("--train_data", good, "--val_data", good, "--output_dir", output_dir)


@pytest.mark.parametrize("kind, message", [
    ("gigantic", r"gigantic.png \(ValueError: 10000x10000 pixels is over the 89,478,485-pixel limit\)"),
    ("truncated", r"truncated.jpg \(OSError: Truncated File Read\)"),
])
def test_gigantic_and_truncated_images_are_named(tiny_model, screenshots, tmp_path, kind, message):
    if kind == "gigantic":
        png_claiming_size(tmp_path / "gigantic.png", 10_000, 10_000)
    else:
        Image.new("RGB", (300, 200), "white").save(tmp_path / "truncated.jpg")
        (tmp_path / "truncated.jpg").write_bytes((tmp_path / "truncated.jpg").read_bytes()[:200])
    name = "gigantic.png" if kind == "gigantic" else "truncated.jpg"
    train = write_manifest(tmp_path / "train.jsonl", [{"path": name, "label": 1}] + records_of(screenshots, "train", 3))
    with pytest.raises(UserError, match=rf"^cannot read image .*{message}.*; fix or remove it, or pass "
                                        rf"--skip_bad_images$"):
        run_main("--model", tiny_model, "--train_data", train, "--val_data", train, "--output_dir", tmp_path / "out",
                 "--num_workers", 0, "--batch_size", 4)


# ----------------------------------------------------------------------------------------------
# Another yes/no question with class names of its own; predict without --model; a console of our own lines
# ----------------------------------------------------------------------------------------------

LOGIN = ["--positive_label", "login", "--negative_label", "other",
         "--question", "Is this a login page? Answer Yes or No."]
DEFAULT_WORDS = re.compile("malicious|benign|injection", re.IGNORECASE)


def relabelled(screenshots: Path, root: Path, split: str, per_class: int) -> Path:
    """The first images of each class of a split, laid out as {other,login}/<subset>/<image>."""
    for source, name in (("benign", "other"), ("malicious", "login")):
        for image in sorted((screenshots / split / source).rglob("*.*"))[:per_class]:
            target = root / split / name / image.relative_to(screenshots / split / source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, target)
    return root / split


@pytest.fixture(scope="module")
def login_run(tiny_model, screenshots, tmp_path_factory):
    """The CPU demo's settings (a DataLoader worker, one thread) with gradient checkpointing, asking another question
    with class names of its own, from the command line as a user starts it; then predict_llava.py without --model.
    Returns the run folder, the validation folder and both finished processes (stdout and stderr captured)."""
    root = tmp_path_factory.mktemp("login")
    train, val, test = (relabelled(screenshots, root, split, n)
                        for split, n in (("train", 16), ("val", 8), ("test", 4)))
    out, env = root / "run", {**os.environ, "OMP_NUM_THREADS": "1"}
    trained = subprocess.run([sys.executable, "train_llava.py", *map(str, [
        "--config", ROOT / "configs/llava_tiny_cpu.yaml", "--model", tiny_model,
        "--train_data", train, "--val_data", val, "--test_data", test,
        "--output_dir", out, "--epochs", 1, "--gradient_checkpointing", "true", *LOGIN])],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    predicted = subprocess.run([sys.executable, "predict_llava.py", "--run_dir", str(out),
                                "--data", str(val), "--num_workers", "1", "--num_threads", "1"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return out, val, trained, predicted


def test_another_question_with_its_own_class_names(login_run):
    """--positive_label login --negative_label other: read from login/ and other/ folders, and named so in the console,
    results.json and the adapter's detector.json; the default names appear nowhere."""
    out, _, trained, predicted = login_run
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert trained.stdout.splitlines()[0] == ("32 train images (16 other, 16 login), 16 val images (8 other, 8 login), "
                                              "8 test images (4 other, 4 login)")
    results = json.loads((out / "results.json").read_text())
    for split, n in (("val", 8), ("test", 4)):
        per_subset = results[f"{split}_per_subset"]
        assert set().union(*per_subset.values()) <= {"login", "tpr", "other", "fpr"}
        counts = [sum(s.get(name, 0) for s in per_subset.values()) for name in ("login", "other")]
        assert counts == [n, n]
        assert all(0 <= s.get(rate, 0) <= 1 for s in per_subset.values() for rate in ("tpr", "fpr"))
    detector = json.loads((out / "adapter/detector.json").read_text())
    assert (detector["positive_label"], detector["negative_label"]) == ("login", "other")
    for name in ("results.json", "val_predictions.jsonl", "predictions.jsonl", "adapter/detector.json", "config.yaml"):
        assert not DEFAULT_WORDS.search((out / name).read_text()), name
    assert not DEFAULT_WORDS.search(trained.stdout + trained.stderr + predicted.stdout + predicted.stderr)
    # Labels from the folder names, as trained (predict read detector.json's names), and the same P(Yes) as training's.
    read = lambda path: {r["path"]: r for r in map(json.loads, path.read_text().splitlines())}  # noqa: E731
    during_training, reloaded = read(out / "val_predictions.jsonl"), read(out / "predictions.jsonl")
    assert len(reloaded) == 16 and reloaded.keys() == during_training.keys()
    assert all(r["label"] == ("/login/" in path) for path, r in reloaded.items())
    assert all(reloaded[k]["p_yes"] == during_training[k]["p_yes"] for k in reloaded)


def test_predict_without_model_takes_the_base_from_detector_json(login_run, tiny_model):
    out, _, _, predicted = login_run
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert predicted.stdout.splitlines() == [
        f"base model {tiny_model}, from {out / 'adapter/detector.json'} (--model to load a copy from elsewhere)",
        f"P(Yes) for 16 images written to {out / 'predictions.jsonl'}"]


def test_the_console_holds_only_our_own_lines(login_run):
    """No library warnings (transformers' FutureWarnings about gradient checkpointing, from our call and from peft's)
    and no library progress bars (loading and writing weights) when stderr is not a terminal: only `warning:` lines."""
    _, _, trained, predicted = login_run
    for process in (trained, predicted):
        assert process.returncode == 0, process.stderr[-3000:]
        assert [line for line in process.stderr.splitlines() if not line.startswith("warning: ")] == []


def test_a_folder_with_other_class_names_is_refused(screenshots, tmp_path):
    with pytest.raises(UserError, match=rf"^{re.escape(str(screenshots / 'val'))} has no login/ folder, only benign/, "
                                        r"malicious/; lay it out as \{benign,login\}/<subset>/<image>, or name its "
                                        r"class folders with --negative_label and --positive_label$"):
        run_main("--train_data", screenshots / "val", "--val_data", screenshots / "val", "--positive_label", "login",
                 "--output_dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for names, message in [({"positive_label": "log in"}, "--positive_label 'log in' cannot name a data folder"),
                           ({"negative_label": "tpr"}, "--negative_label 'tpr' cannot name a data folder"),
                           ({"negative_label": "login", "positive_label": "login"}, "are both 'login'")]:
        with pytest.raises(UserError, match=message):
            train_llava.Config(**names)


def test_predict_refuses_another_base_unless_allowed(trained_run, tiny_model, screenshots, tmp_path, capsys):
    """A moved copy of the base is the same base; a checkpoint of another size is refused (exit code 2, nothing
    written) unless --allow_other_base, which loads the adapter onto it with a warning."""
    output_dir, _ = trained_run
    moved, other = shutil.copytree(tiny_model, tmp_path / "moved"), shutil.copytree(tiny_model, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 1024  # a size that changes no weight: the adapter still loads
    (other / "config.json").write_text(json.dumps(config))
    images = write_manifest(tmp_path / "images.jsonl", records_of(screenshots, "val", 8))

    def predict(model, output, *extra):
        return run_main("--model", model, "--run_dir", output_dir, "--data", images,
                        "--output", tmp_path / output, "--num_workers", 0, *extra, script=predict_llava)

    assert len(predict(moved, "moved.jsonl")["p_yes"]) == 8
    before = snapshot(output_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        exit_on_user_error(lambda: predict(other, "refused.jsonl"))
    assert exit_.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == (
        f"error: {other} is not the base model the adapter in {output_dir / 'adapter'} was trained on ({tiny_model}): "
        f"its text_config.max_position_embeddings is 1024, not 512; drop --model to use the trained base, or pass "
        f"--allow_other_base true to use this one anyway")
    assert not (tmp_path / "refused.jsonl").exists() and snapshot(output_dir) == before
    assert len(predict(other, "allowed.jsonl", "--allow_other_base", "true")["p_yes"]) == 8
    assert "warning: --allow_other_base: the adapter goes onto" in capsys.readouterr().err
    assert len((tmp_path / "allowed.jsonl").read_text().splitlines()) == 8


def test_every_file_a_run_and_its_prediction_write_follows_the_umask(tiny_model, screenshots, tmp_path):
    """safetensors creates its files 0600 (the adapter, the checkpoints' weights, merged/): they must end with the
    umask's mode, as every other output does, so a teammate who can read results.json can load the adapter too."""
    train = write_manifest(tmp_path / "train.jsonl", records_of(screenshots, "train", 8))
    val = write_manifest(tmp_path / "val.jsonl", records_of(screenshots, "val", 8))
    test = write_manifest(tmp_path / "test.jsonl", records_of(screenshots, "test", 8))
    out, previous = tmp_path / "run", os.umask(0o002)  # group-writable: unlike both 0600 and the usual 0644
    try:
        run_main(*demo_args(tiny_model, screenshots, out, "--train_data", train, "--val_data", val, "--test_data", test,
                            "--epochs", 1, "--merge", "true"))
        run_main("--run_dir", out, "--data", val, "--num_workers", 0, script=predict_llava)
    finally:
        os.umask(previous)
    files = [p for p in out.rglob("*") if p.is_file()]
    safetensors = {str(p.relative_to(out).parent) for p in files if p.suffix == ".safetensors"}
    assert {"adapter", "merged"} <= safetensors and any(s.startswith("checkpoints/") for s in safetensors), safetensors
    assert (out / "predictions.jsonl") in files
    modes = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in files}
    assert {name: mode for name, mode in modes.items() if mode != "0o664"} == {}


def test_the_base_dtype_follows_fp16_autocast_and_native_bf16(monkeypatch):
    """--mixed_precision fp16 with a bf16 base would cast every frozen weight to fp16 at every op (and keep the
    copies for backward): the base is loaded in fp16. bf16 only where the GPU has it natively, not emulated (a V100
    or T4 reports emulation as support)."""
    assert train_llava.base_dtype(None, "fp16") == torch.float16
    assert train_llava.base_dtype("bf16", "fp16") == torch.bfloat16  # --model_dtype wins
    assert train_llava.base_dtype(None, "bf16") == torch.float32  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert train_llava.base_dtype(None, "bf16") == torch.float32  # emulated only: fp32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert train_llava.base_dtype(None, "no") == torch.bfloat16


def test_fsdp2_wraps_the_blocks_of_any_family_and_refuses_a_language_model_it_would_gather_whole(tmp_path,
                                                                                                monkeypatch):
    """The launch config's classes and the model's own (and its parts') _no_split_modules, those the model has;
    a language model whose blocks are in neither would be one FSDP2 unit, gathered whole: refused in one line."""
    from types import SimpleNamespace

    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    def fsdp2(names=None):
        plugin = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=names)
        return SimpleNamespace(is_fsdp2=True, state=SimpleNamespace(fsdp_plugin=plugin))

    for text_model, block in (("llama", "LlamaDecoderLayer"), ("qwen2", "Qwen2DecoderLayer")):
        model, _ = load_base_and_processor(build_tiny_llava(tmp_path / text_model, text_model=text_model),
                                           torch.float32)
        accelerator = fsdp2(["NotInThisModel"])
        train_llava.fit_fsdp_wrapping(accelerator, model)
        assert accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap == sorted(
            {block, "CLIPEncoderLayer", "CLIPVisionEmbeddings"})
    for module in model.modules():  # a model that names none of its blocks
        if getattr(module, "_no_split_modules", None):
            monkeypatch.setattr(module, "_no_split_modules", [])
    with pytest.raises(UserError, match=r"^FSDP2 would gather the whole language model at once: its blocks "
                                        r"\(Qwen2DecoderLayer\) are not in its _no_split_modules; name them"):
        train_llava.fit_fsdp_wrapping(fsdp2(), model)
    train_llava.fit_fsdp_wrapping(fsdp2(["Qwen2DecoderLayer"]), model)  # named in the launch config: accepted
