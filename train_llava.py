"""LoRA fine-tuning of a vision-language model as a Yes/No prompt-injection detector for web-agent screenshots.

The model is asked, in its own chat template, whether a screenshot carries a prompt injection; the
logits of the "No" and "Yes" tokens at the answer position form a 2-way classifier trained with
cross-entropy (the WAInjectBench setting, with LLaVA-1.5). Another yes/no question needs no code: --question,
and --positive_label / --negative_label (default malicious / benign) name the classes' data folders, results.json
keys and plot axes (docs/llava.md). Any checkpoint that AutoModelForImageTextToText and AutoProcessor load can be
--model; LLaVA-1.5, LLaVA-NeXT and Idefics3 are tested (docs/vlm_families.md).
The same file runs on a CPU, one GPU, DDP or FSDP:

    python train_llava.py --config configs/llava_tiny_cpu.yaml      # tiny random LLaVA + synthetic data, CPU
    accelerate launch --config_file accelerate_configs/single_gpu.yaml train_llava.py \\
        --train_data data/wainject/train.jsonl --val_data data/wainject/val.jsonl --test_data data/wainject/image
    python train_llava.py --output_dir runs/llava --resume_from latest
    python train_llava.py --mode predict --output_dir runs/llava --predict_data shots/  # P(Yes), base from detector.json

Data: a JSONL manifest with one {"path", "label" (1 = positive: injection), "subset" (optional)} per line,
relative paths resolved against the manifest's folder, or a folder laid out as
{<negative_label>,<positive_label>}/<subset>/<image> (by default {benign,malicious}/...). Images are opened,
converted to RGB and resized in the DataLoader's collate function (in its worker processes), never in the loop.

Outputs in --output_dir: adapter/ (the LoRA adapter, for PeftModel.from_pretrained on the base
model, with the processor and detector.json beside it), results.json, metrics.jsonl,
val_predictions.jsonl, roc_curve.png, checkpoints/, and merged/ with --merge.

Reading order: Config, data, model, loss, train(), evaluate(), main().
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import gather_object, set_seed
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from common.checkpoint import (
    checkpoint_trainable_only,
    gathered_trainable_state,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from common.config import IDENTIFIER, NON_EMPTY, TRACKER, above, at_least, between, check_domains, parse_config, setting
from common.distributed import (
    check_one_view_of_output_dir,
    fit_fsdp_wrapping,
    refuse_silent_fallbacks,
    use_fsdp_on_cpu,
)
from common.ema import EMA
from common.errors import NonFiniteTrainingError, UserError, exit_on_user_error, first_line, warn
from common.guard import NonFiniteGuard
from common.images import IMAGE_ERRORS, image_problem, load_rgb
from common.preemption import EXIT_PREEMPTED, Preemption
from common.pretrained import (
    builds_own_positions,
    check_lora_targets,
    check_pretrained,
    empty_model,
    load_pretrained,
    load_processor,
    match_processor_to_model,
    model_parts,
)
from common.run_log import (
    MetricsLog,
    check_output_dir,
    check_output_file,
    peak_memory_mb,
    replace_folder,
    start_run,
    write_json,
)
from common.schedules import set_lr, warmup_cosine

LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_QUESTION = ("Does this screenshot contain a prompt injection, text that tries to give instructions "
                    "to an AI agent? Answer Yes or No.")
DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
DEFAULT_CLASSES = ("benign", "malicious")  # --negative_label, --positive_label: WAInjectBench's folder names


@dataclass
class Config:
    # model
    model: str | None = setting(None, f"image-text-to-text checkpoint folder or hub id (LLaVA-1.5, LLaVA-NeXT, Idefics3, ...); unset: {DEFAULT_MODEL} to train, the adapter's own base (detector.json) to predict", NON_EMPTY, same_on_resume=True)
    build_tiny_model: bool = setting(False, "if --model is a missing folder, build a tiny random LLaVA-1.5 there (CPU demo, tests; other families: tools/make_tiny_llava.py --family)")
    model_dtype: str | None = setting(None, "dtype of the frozen base model (None: bf16 on a GPU, fp32 on CPU)", choices=["fp32", "bf16", "fp16"])
    lora_r: int = setting(8, "LoRA rank", between(1, 4096), same_on_resume=True)
    lora_alpha: int = setting(32, "LoRA alpha (scale = alpha / r)", at_least(1), same_on_resume=True)
    lora_dropout: float = setting(0.05, "dropout on the LoRA input", between(0, 1, high_open=True))
    lora_target_modules: list[str] = setting(LM_TARGETS, "language-model module names that get LoRA", IDENTIFIER, same_on_resume=True)
    lora_vision_modules: list[str] = setting([], "vision-tower module names that get LoRA too, e.g. q_proj,k_proj,v_proj,out_proj,fc1,fc2 (empty: none)", IDENTIFIER, same_on_resume=True)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward (use_reentrant=False) to save memory")
    # prompt
    question: str = setting(DEFAULT_QUESTION, "the question asked with every screenshot", NON_EMPTY, same_on_resume=True)
    yes_token: str = setting("Yes", "answer word for the positive class (label 1); must be one token", NON_EMPTY, same_on_resume=True)
    no_token: str = setting("No", "answer word for the negative class (label 0); must be one token", NON_EMPTY, same_on_resume=True)
    positive_label: str = setting(DEFAULT_CLASSES[1], "name of class 1 (Yes): its data folder, its count and TPR in results.json, the plot's y axis; a folder name", NON_EMPTY)
    negative_label: str = setting(DEFAULT_CLASSES[0], "name of class 0 (No): its data folder, its count and FPR in results.json, the plot's x axis; a folder name", NON_EMPTY)
    # data
    train_data: str = setting("data/wainject/train.jsonl", "training JSONL manifest or {<negative_label>,<positive_label>}/<subset>/ folder", NON_EMPTY)
    val_data: str = setting("data/wainject/val.jsonl", "validation manifest or folder (best checkpoint)", NON_EMPTY)
    test_data: str | None = setting(None, "test manifest or folder, evaluated once at the end", NON_EMPTY)
    make_synthetic_data: bool = setting(False, "if --train_data (a train.jsonl) is missing, write synthetic screenshots and manifests into its folder, which must be new or empty")
    resize: str = setting("pad", "pad to the processor's fixed input shape (nothing cropped), the processor's own resizing (LLaVA-1.5: a centre crop), or stretch; see docs/vlm_families.md", choices=["pad", "crop", "stretch"], same_on_resume=True)
    skip_bad_images: bool = setting(False, "skip and count missing/corrupt images and bad labels instead of stopping")
    num_workers: int = setting(2, "DataLoader worker processes that decode images", between(0, 256))
    num_threads: int = setting(0, "PyTorch CPU threads per process (0: PyTorch's default)", between(0, 1024))
    # loss
    class_weights: list[float] = setting([], "cross-entropy weights [No, Yes] (empty: unweighted)", above(0))
    # optimisation
    epochs: int = setting(3, "training epochs", at_least(0))
    max_steps: int = setting(0, "stop after this many optimizer steps (0: no limit)", at_least(0))
    batch_size: int = setting(4, "screenshots per micro-batch per process", at_least(1))
    eval_batch_size: int = setting(8, "screenshots per evaluation batch per process", at_least(1))
    grad_accum_steps: int = setting(4, "micro-batches per optimizer step", at_least(1))
    lr: float = setting(2e-4, "peak learning rate (AdamW: above 1 is a typo)", between(0, 1, low_open=True))
    weight_decay: float = setting(0.0, "AdamW weight decay on the LoRA weights", between(0, 10))
    warmup_ratio: float = setting(0.03, "fraction of the optimizer steps spent in linear warmup", between(0, 1))
    min_lr_factor: float = setting(0.1, "the cosine ends at this fraction of --lr", between(0, 1))
    max_grad_norm: float = setting(1.0, "gradient clipping norm", above(0))
    ema_decay: float = setting(0.0, "EMA of the LoRA weights, used to evaluate and save (0: off)", between(0, 1, high_open=True))
    mixed_precision: str | None = setting(None, "None: what accelerate launch set, else no", choices=["no", "bf16", "fp16"])
    nan_lr_backoff: float = setting(0.5, "on the first NaN/Inf update: fp32 from then on, base LR times this", between(0, 1, low_open=True))
    max_nonfinite_in_a_row: int = setting(5, "stop after this many non-finite updates in a row in fp32", at_least(1))
    # evaluation
    best_metric: str = setting("auroc", "validation metric that picks the best checkpoint", choices=["auroc", "f1", "accuracy"])
    target_fpr: float = setting(0.05, "report the TPR at this false-positive rate", between(0, 1))
    # run
    output_dir: str = setting("runs/llava", "where the adapter, checkpoints, metrics and results go", NON_EMPTY)
    overwrite: bool = setting(False, "replace the run in output_dir (removed only once the new run has passed its checks); predict: replace --predict_output")
    seed: int = setting(42, "seed for LoRA initialisation and batch order", between(0, 2**32 - 1))
    log_every: int = setting(10, "log (and check for NaN) every this many optimizer steps", at_least(1))
    checkpoint_every: int = setting(0, "also checkpoint every this many optimizer steps (0: epoch ends only)", at_least(0))
    keep_checkpoints: int = setting(2, "how many recent checkpoints to keep", at_least(1))
    resume_from: str | None = setting(None, "'latest' or a checkpoint folder", NON_EMPTY)
    report_to: str = setting("none", "Accelerate tracker: none, tensorboard, wandb, ...", TRACKER)
    merge: bool = setting(False, "also save base + adapter merged into full weights in output_dir/merged")
    # predict
    mode: str = setting("train", "train, or predict: write P(Yes) per image", choices=["train", "predict"])
    predict_data: str | None = setting(None, "predict: manifest or folder of images (labels optional)", NON_EMPTY)
    predict_output: str | None = setting(None, "predict: JSONL to write (default: output_dir/predictions.jsonl)", NON_EMPTY)
    allow_other_base: bool = setting(False, "predict: load the adapter onto a --model whose type or sizes differ from the base it was trained on")

    def __post_init__(self):  # every field in its domain, then the rules that tie fields together
        check_domains(self)
        if self.model is None and self.mode == "train":
            self.model = DEFAULT_MODEL  # predict without --model takes the adapter's own base (predict())
        for flag, name in (("--positive_label", self.positive_label), ("--negative_label", self.negative_label)):
            if not re.fullmatch(r"\w[\w.-]*", name) or name in ("tpr", "fpr"):  # a folder name and a results.json key
                raise UserError(f"{flag} {name!r} cannot name a data folder and a results.json key; use letters, "
                                f"digits, _, - and . (not first), and not tpr or fpr")
        if self.positive_label == self.negative_label:
            raise UserError(f"--positive_label and --negative_label are both {self.positive_label!r}; give the two "
                            f"classes different names")
        if len(self.class_weights) not in (0, 2):
            raise UserError(f"--class_weights takes two numbers [No, Yes], got {self.class_weights}; e.g. --class_weights 1,3")
        if not self.lora_target_modules and not self.lora_vision_modules:
            raise UserError("no LoRA targets: --lora_target_modules and --lora_vision_modules are both empty; name at least one module")
        if self.yes_token == self.no_token:
            raise UserError(f"--yes_token and --no_token are both {self.yes_token!r}; give two different answer words")
        if self.mode == "predict" and self.predict_data is None:
            raise UserError("--mode predict needs images to score; pass --predict_data (a manifest or a folder of images)")

    @property
    def classes(self) -> tuple[str, str]:
        """The class names by label: 0 (the answer No), 1 (Yes)."""
        return self.negative_label, self.positive_label


# ----------------------------------------------------------------------------------------------
# Data: manifests or folders -> samples; images decoded and processed in the collate function
# ----------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class Sample:
    path: Path
    label: int  # 1 = --positive_label (e.g. a prompt injection), 0 = --negative_label, -1 = unknown (predict)
    subset: str


def class_words(classes: tuple[str, str]) -> tuple[str, str]:
    """How messages name the classes 0 and 1: by their labels; the default ones by the task they were made for."""
    return ("benign", "prompt injection") if classes == DEFAULT_CLASSES else classes


def read_manifest(path: Path, skip_bad: bool, need_labels: bool, classes: tuple[str, str]) -> tuple[list[Sample], list[str]]:
    """JSONL, one {"path", "label", "subset"?} per line. Returns the samples and the skipped lines."""
    samples, skipped = [], []
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark before the first line is fine
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start}); save the manifest as UTF-8 JSON lines") from None
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror}); check its permissions") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image, label = path.parent / record["path"], record.get("label", None if need_labels else -1)
        except (ValueError, TypeError, KeyError, AttributeError):
            problem = 'is not a JSON object with a "path"'
        else:
            if isinstance(label, bool) or label not in (0, 1, *(() if need_labels else (-1,))):
                problem = "has label {!r}; labels are 0 ({}) or 1 ({})".format(label, *class_words(classes))
            elif not image.is_file():
                problem = f"names image {image}, which does not exist"
            else:
                samples.append(Sample(image, int(label), str(record.get("subset", ""))))
                continue
        if not skip_bad:
            raise UserError(f"{path} line {number} {problem}; fix the line or pass --skip_bad_images")
        skipped.append(f"{path} line {number} ({problem})")
    return samples, skipped


def read_folder(root: Path, need_labels: bool, classes: tuple[str, str]) -> list[Sample]:
    """{<negative>,<positive>}/<subset>/<image>; for predict, any folder of images (labels unknown). One class folder
    beside folders of other names is refused: they are likely the classes under other names, never read."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = [(root / name, label) for label, name in enumerate(classes) if name in folders]
    strays, layout = [name for name in folders if name not in classes], "{" + ",".join(classes) + "}/<subset>/<image>"
    if (need_labels and not found) or (len(found) == 1 and strays):
        missing = [f"{name}/" for name in classes if name not in folders]
        problem = f"neither a {missing[0]} nor a {missing[1]} folder" if len(missing) == 2 else f"no {missing[0]} folder"
        problem += f", only {', '.join(f'{name}/' for name in folders)}" if strays else ""
        fix = ", or name its class folders with --negative_label and --positive_label" if strays else " or pass a JSONL manifest"
        raise UserError(f"{root} has {problem}; lay it out as {layout}{fix}")
    samples = []
    for folder, label in found or [(root, -1)]:
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                parts = path.relative_to(folder).parts
                samples.append(Sample(path, label, parts[0] if len(parts) > 1 else ""))
    return samples


def load_samples(spec: str, skip_bad: bool, need_labels: bool = True,
                 classes: tuple[str, str] = DEFAULT_CLASSES) -> tuple[list[Sample], list[str]]:
    """The samples of a manifest or folder, every image's header checked; returns them and what was skipped."""
    path, folders = Path(spec), "{" + ",".join(classes) + "}/"
    if not path.exists():
        raise UserError(f"data path {path} does not exist; pass a JSONL manifest or a {folders} folder")
    samples, skipped = read_manifest(path, skip_bad, need_labels, classes) if path.is_file() else \
        (read_folder(path, need_labels, classes), [])
    readable = []
    with ThreadPoolExecutor(8) as pool:  # headers (and PNG checksums) only: it finds a bad file before training, not hours in
        problems = list(pool.map(image_problem, [sample.path for sample in samples]))
    for sample, problem in zip(samples, problems):
        if problem is None:
            readable.append(sample)
        elif not skip_bad:
            raise UserError(f"cannot read image {sample.path} ({problem}); fix or remove it, or pass --skip_bad_images")
        else:
            skipped.append(f"{sample.path} ({problem})")
    if not readable:
        raise UserError(f"{path} holds no usable images; add lines like {{\"path\": \"page.png\", \"label\": 1}} "
                        f"or point it at a {folders} folder")
    return readable, skipped


def fixed_input_size(image_processor) -> tuple[int, int] | None:
    """(width, height) the processor brings every picture to (LLaVA-1.5: the crop size, else the resize target), or
    None for a processor that keeps the aspect ratio itself: a grid of tiles chosen to fit it (LLaVA-NeXT's
    image_grid_pinpoints) or a bound on the longest edge (Idefics3; Qwen2-VL's pixel budget)."""
    size = dict(image_processor.size)
    if getattr(image_processor, "image_grid_pinpoints", None) or "longest_edge" in size:
        return None
    size = dict(getattr(image_processor, "crop_size", None) or size)
    return size.get("width", size.get("shortest_edge")), size.get("height", size.get("shortest_edge"))


def collate(items, processor, prompt: str, resize: str):
    """Runs in the DataLoader workers. A bad image becomes a blank placeholder with valid=0 and is
    reported in "bad", so the loop can stop with a clear message or skip it (every process still
    runs the same forward and backward, which DDP needs)."""
    fixed = fixed_input_size(processor.image_processor)
    fill = tuple(round(255 * m) for m in processor.image_processor.image_mean)
    images, valid, bad = [], [], []
    for _, sample in items:
        try:
            img = load_rgb(sample.path)
            # pad: LLaVA-1.5's expand-to-square, off-centre content is never cropped; a processor that keeps the aspect
            # ratio itself gets the picture as it is. stretch: to the fixed shape, or to a square of the longer side.
            square = (max(img.size),) * 2
            if resize == "pad" and fixed:
                img = ImageOps.pad(img, fixed, Image.Resampling.BICUBIC, color=fill)
            elif resize == "stretch":
                img = img.resize(fixed or square, Image.Resampling.BICUBIC)
            valid.append(1.0)
        except IMAGE_ERRORS as err:
            bad.append(f"{sample.path} ({type(err).__name__}: {err})")
            img = Image.new("RGB", fixed or (224, 224), fill)
            valid.append(0.0)
        images.append(img)
    inputs = processor(images=images, text=[prompt] * len(images), padding=True, return_tensors="pt")
    labels, index = torch.tensor([max(s.label, 0) for _, s in items]), torch.tensor([i for i, _ in items])
    return {"inputs": dict(inputs), "labels": labels, "valid": torch.tensor(valid), "index": index, "bad": bad}


def make_loader(samples, processor, prompt, cfg: Config, batch_size: int, shuffle: bool):
    return torch.utils.data.DataLoader(
        list(enumerate(samples)), batch_size=batch_size, shuffle=shuffle, num_workers=cfg.num_workers,
        collate_fn=functools.partial(collate, processor=processor, prompt=prompt, resize=cfg.resize),
        generator=torch.Generator().manual_seed(cfg.seed) if shuffle else None,
        persistent_workers=cfg.num_workers > 0,
    )


def check_bad_images(batch, skip: bool, seen: set) -> None:
    """Stop on the first image that could not be decoded (one clear line), or remember and skip it."""
    for entry in batch["bad"]:
        if not skip:
            raise UserError(f"cannot read image {entry}; fix or remove it, or pass --skip_bad_images")
        if entry not in seen:
            seen.add(entry)
            warn(f"skipping unreadable image {entry}", every_process=True)  # seen by this process only


# ----------------------------------------------------------------------------------------------
# Model: a vision-language model + processor from one checkpoint, LoRA in fp32, the Yes/No answer logits
# ----------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def base_dtype(cfg: Config) -> torch.dtype:
    if cfg.model_dtype is not None:
        return DTYPES[cfg.model_dtype]
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


TESTED_FAMILIES = ("llava", "llava_next", "idefics3")  # config.json model types with tests here (docs/vlm_families.md)


def load_base(model_id: str, processor, dtype: torch.dtype):
    """The frozen model, with the processor's image-token count matched to its vision tower."""
    from transformers import AutoModelForImageTextToText

    base = load_pretrained(AutoModelForImageTextToText, model_id, dtype=dtype)
    match_processor_to_model(processor, base)  # the <image> tokens written must equal the image features made
    return base


def lora_config(cfg: Config, model):
    """A regex over module names, so that the language model's q_proj is adapted but not the vision tower's
    namesake; in the vision tower, only the layers whose output reaches the language model (`used_vision_layers`).
    Where the parts sit comes from the model (`model_parts`: model.language_model in LLaVA, model.text_model in
    Idefics3, ...)."""
    from peft import LoraConfig

    parts = model_parts(model)
    used = "|".join(map(str, used_vision_layers(model.config)))
    within = {"language model": rf"{re.escape(parts['language model'])}\..*\.",
              "vision tower": rf"{re.escape(parts['vision layers'])}\.({used})\..*\."}
    patterns = [f"{within[part]}({'|'.join(names)})" for part, names in lora_targets(cfg).values() if names]
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="|".join(patterns))


def used_vision_layers(model_config) -> range:
    """The vision layers whose output the language model sees. LLaVA takes its image features from the hidden
    state `vision_feature_layer` (-2: the second-to-last layer's output); the layers after it run, but a LoRA
    weight there would never get a gradient: dead weight that DDP must be told about and that FSDP2 cannot
    checkpoint (no optimizer state ever exists for it). Families without the setting (Idefics3) use them all."""
    num_layers = model_config.vision_config.num_hidden_layers
    feature = getattr(model_config, "vision_feature_layer", -1)
    hidden_states = [f if f >= 0 else num_layers + 1 + f for f in (feature if isinstance(feature, list) else [feature])]
    return range(max(hidden_states))  # hidden state k is the output of layer k - 1


def lora_targets(cfg: Config) -> dict[str, tuple[str, list[str]]]:
    return {"--lora_target_modules": ("language model", cfg.lora_target_modules),
            "--lora_vision_modules": ("vision tower", cfg.lora_vision_modules)}


# peft 0.21's PeftModel.__init__ reads transformers' deprecated `model.is_gradient_checkpointing` (on every
# get_peft_model and PeftModel.from_pretrained): the FutureWarning is about peft's code, which a user cannot change.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                        module=r"transformers\.modeling_utils")


def add_lora(cfg: Config, base):
    from peft import get_peft_model

    if cfg.gradient_checkpointing:
        # Non-reentrant: reentrant checkpointing leaves LoRA in checkpointed blocks without gradients.
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    # Adapters in fp32 under a bf16/fp16 base: precise updates, and no GradScaler error on fp16 gradients.
    return get_peft_model(base, lora_config(cfg, base), autocast_adapter_dtype=True)


def build_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def answer_token_ids(tokenizer, no_word: str, yes_word: str) -> list[int]:
    """[No id, Yes id]: each answer word must be one known token, the one the model would generate."""
    ids = []
    for word, flag in ((no_word, "--no_token"), (yes_word, "--yes_token")):
        pieces = tokenizer.encode(word, add_special_tokens=False)
        if len(pieces) != 1 or pieces[0] == tokenizer.unk_token_id:
            raise UserError(f"the answer word {word!r} is not one known token in this tokenizer (it is "
                            f"{tokenizer.convert_ids_to_tokens(pieces)}); pass a single-token word with {flag}")
        ids.append(pieces[0])
    if ids[0] == ids[1]:
        raise UserError(f"--no_token {no_word!r} and --yes_token {yes_word!r} are the same token; pass two different words")
    return ids


def answer_logits(model, inputs: dict, answer_ids: list[int]) -> torch.Tensor:
    """(batch, 2) logits of [No, Yes] at the answer position, the last real token of each row.

    Only that position goes through the vocabulary projection (`logits_to_keep`). The position is
    gathered from the attention mask, so it stays exact however many image tokens each picture became,
    and position ids count real tokens only (a model with image positions of its own, Qwen2-VL's,
    builds them from the mask itself), so left and right padding give the same answer.
    """
    mask = inputs["attention_mask"]
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
    positions = {} if builds_own_positions(model) else {"position_ids": (mask.long().cumsum(1) - 1).clamp_min(0)}
    out = model(**inputs, **positions, logits_to_keep=last[:, None], use_cache=False)
    return out.logits[:, 0, answer_ids]


def trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------
# Loss: cross-entropy over [No, Yes], optional class weights, placeholders of bad images ignored
# ----------------------------------------------------------------------------------------------


def detector_loss(logits, labels, valid, class_weights: torch.Tensor | None) -> torch.Tensor:
    per_sample = F.cross_entropy(logits.float(), labels, weight=class_weights, reduction="none")
    weights = valid * (class_weights[labels] if class_weights is not None else 1.0)
    return (per_sample * valid).sum() / weights.sum().clamp_min(1e-8)  # a weighted mean over valid samples


# ----------------------------------------------------------------------------------------------
# Training state and the loop
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything the loop needs to continue after a restart, beyond model/optimizer/RNG."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batches_done: int = 0  # micro-batches consumed in the current epoch
    best_score: float = -math.inf
    best_step: int = -1
    train_samples: int = 0  # over finished epochs, this process: for the throughput in results.json
    train_seconds: float = 0.0
    best_weights: dict = field(default_factory=dict)  # LoRA weights (EMA if on) at the best validation

    def state_dict(self):
        return dataclasses.asdict(self)

    def load_state_dict(self, state):
        for key, value in state.items():
            setattr(self, key, value)


def train(cfg, accelerator, model, optimizer, train_loader, val_loader, val_samples, answer_ids, class_weights,
          ema, guard, state, log, output_dir, bad_seen, preemption):
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_ratio * total_steps)
    checkpointed = {"train_state": state, "guard": guard} | ({"ema": ema} if ema else {})
    if total_steps == 0:
        warn("--epochs 0: nothing is trained; the adapter is saved as initialised (LoRA B = 0: the base model's answers)")
    elif total_steps < steps_per_epoch:
        warn(f"--max_steps {cfg.max_steps} ends training before the first epoch ({steps_per_epoch} steps) finishes: "
             f"no validation picks a best checkpoint, and the last weights are saved")

    def finished():  # also true for a resumed run that had already finished training
        return state.epoch >= cfg.epochs or (cfg.max_steps > 0 and state.step >= cfg.max_steps)

    def current_lr():  # the update that makes step+1: never a zero LR on the first update
        return cfg.lr * guard.lr_scale * warmup_cosine(state.step + 1, warmup_steps, total_steps,
                                                       final_factor=cfg.min_lr_factor)

    def validate():
        with ema.swapped_in() if ema else contextlib.nullcontext():
            val = evaluate(model, val_loader, val_samples, accelerator, answer_ids, cfg, bad_seen)
            score = val[cfg.best_metric]
            if score is None:  # one class left once unreadable images were skipped (both were checked up front)
                warn(f"validation at step {state.step}: {cfg.best_metric} is undefined on the {val['num_samples']} "
                     f"readable images (one class only); the best checkpoint is not updated")
            improved = score is not None and score > state.best_score
            if improved:
                state.best_score, state.best_step = score, state.step
                state.best_weights = trainable_state(model)
        log.log({f"val/{k}": val[k] for k in ("accuracy", "auroc", "f1", "precision", "recall")
                 if val[k] is not None}, state.step)
        accelerator.print(f"step {state.step:5d} | val {summary(val)} | best {cfg.best_metric} {state.best_score:.3f} "
                          f"@ step {state.best_step}")
        return improved

    set_lr(optimizer, current_lr())
    bar = tqdm(total=total_steps, initial=state.step, desc="train", disable=None if accelerator.is_local_main_process else True)
    running, running_batches, done, preempted = torch.zeros((), device=accelerator.device), 0, False, False
    grad_norm = torch.zeros(())
    while not done and not finished():
        epoch_start, samples = time.perf_counter(), 0
        train_loader.set_epoch(state.epoch)
        batches = accelerator.skip_first_batches(train_loader, state.batches_done) if state.batches_done else train_loader
        model.train()
        for batch in batches:
            check_bad_images(batch, cfg.skip_bad_images, bad_seen)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    logits = answer_logits(model, batch["inputs"], answer_ids)
                loss = detector_loss(logits, batch["labels"], batch["valid"], class_weights)
                accelerator.backward(loss)
                guard.record_loss(loss)
                if accelerator.sync_gradients:  # clip only full updates: on other micro-batches the norm is partial
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    guard.mask_nonfinite_update(grad_norm)  # a NaN/Inf update becomes a no-op, on the device
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_done += 1
            samples += len(batch["labels"])
            running += loss.detach()
            running_batches += 1
            if not accelerator.sync_gradients:
                continue

            state.step += 1
            if ema:
                ema.update()
            bar.update(1)
            if state.step % cfg.log_every == 0:
                mean = (accelerator.reduce(running, "mean") / running_batches).item()  # the only per-interval sync
                running.zero_()
                running_batches = 0
                if guard.poll(state.step):
                    accelerator.print(f"step {state.step}: non-finite loss/gradients; continuing in fp32 with "
                                      f"the base LR x{guard.lr_scale:g}")
                log.log({"train/loss": mean, "train/grad_norm": grad_norm.item(),
                         "train/lr": optimizer.param_groups[0]["lr"]}, state.step)
                bar.set_postfix(loss=f"{mean:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            set_lr(optimizer, current_lr())
            preempted = preemption.should_stop(accelerator, at_sync_point=state.step % cfg.log_every == 0)
            done = preempted or (bool(cfg.max_steps) and state.step >= cfg.max_steps)
            stops_mid_epoch = done and state.batches_done < len(train_loader)  # no epoch-end checkpoint follows
            if stops_mid_epoch or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0):
                save_checkpoint(accelerator, output_dir, state.step, checkpointed, cfg.keep_checkpoints, config=cfg)
            if done:
                break
        if done and state.batches_done < len(train_loader):
            break  # stopped mid-epoch by --max_steps: no end-of-epoch evaluation

        guard.poll(state.step)
        seconds = time.perf_counter() - epoch_start
        state.train_samples += samples
        state.train_seconds += seconds
        state.epoch += 1
        state.batches_done = 0
        improved = validate()
        log.log({"epoch": state.epoch, "train/samples_per_second": samples * accelerator.num_processes / seconds,
                 "peak_memory_mb": peak_memory_mb(accelerator.device)}, state.step)
        accelerator.print(f"epoch {state.epoch} | {samples * accelerator.num_processes / seconds:.1f} samples/s | "
                          f"lr {optimizer.param_groups[0]['lr']:.2e} | {peak_memory_mb(accelerator.device):,.0f} MB")
        save_checkpoint(accelerator, output_dir, state.step, checkpointed, cfg.keep_checkpoints, best=improved,
                        config=cfg)
    bar.close()
    return preempted


# ----------------------------------------------------------------------------------------------
# Evaluation: P(Yes) gathered from every process, then threshold and ranking metrics
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def score_images(model, loader, accelerator, answer_ids, skip_bad: bool, bad_seen: set) -> dict:
    """P(Yes), label, valid flag and sample index of every image, each counted once across processes."""
    model.eval()
    parts = []
    for batch in loader:
        check_bad_images(batch, skip_bad, bad_seen)
        with accelerator.autocast():
            logits = answer_logits(model, batch["inputs"], answer_ids)
        p_yes = logits.float().softmax(-1)[:, 1]
        parts.append(accelerator.gather_for_metrics((p_yes, batch["labels"], batch["valid"], batch["index"])))
    model.train()
    return {k: torch.cat([p[i] for p in parts]).cpu().numpy() for i, k in enumerate(["p_yes", "label", "valid", "index"])}


def roc_curve(scores: np.ndarray, labels: np.ndarray):
    """(fpr, tpr) at every distinct threshold, from the strictest down."""
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_each = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    tps = np.cumsum(labels)[last_of_each]
    fps = last_of_each + 1 - tps
    return np.r_[0, fps] / max(1, len(labels) - labels.sum()), np.r_[0, tps] / max(1, labels.sum())


def classification_metrics(p_yes, labels, subsets: list[str], target_fpr: float,
                           classes: tuple[str, str] = DEFAULT_CLASSES) -> dict:
    """Threshold metrics at P(Yes) >= 0.5 and ranking metrics; None where a metric is undefined (one class, no images).
    Per subset: the count and TPR of the positive class, the count and FPR of the negative one, keyed by their names."""
    if len(labels) == 0:  # every image of the split was unreadable and skipped
        return {"num_samples": 0, "accuracy": None, "precision": None, "recall": None, "f1": None, "auroc": None,
                f"tpr_at_fpr_{target_fpr:g}": None, "confusion_matrix": {}, "per_subset": {}, "roc": ([0.0], [0.0])}
    pred = (p_yes >= 0.5).astype(np.int64)
    tp, fp = int(((pred == 1) & (labels == 1)).sum()), int(((pred == 1) & (labels == 0)).sum())
    tn, fn = int(((pred == 0) & (labels == 0)).sum()), int(((pred == 0) & (labels == 1)).sum())
    precision, recall = tp / max(1, tp + fp), tp / max(1, tp + fn)
    both_classes = 0 < labels.sum() < len(labels)
    fpr, tpr = roc_curve(p_yes, labels)
    per_subset = {}
    for name in sorted(set(subsets)):
        rows = np.array([s == name for s in subsets])
        pos, neg = rows & (labels == 1), rows & (labels == 0)
        per_subset[name or "-"] = ({classes[1]: int(pos.sum()), "tpr": float(pred[pos].mean())} if pos.any() else {}) | \
                                  ({classes[0]: int(neg.sum()), "fpr": float(pred[neg].mean())} if neg.any() else {})
    return {
        "num_samples": len(labels),
        "accuracy": float((pred == labels).mean()),
        "precision": precision,
        "recall": recall if labels.any() else None,
        "f1": 2 * precision * recall / max(1e-12, precision + recall) if labels.any() else None,
        "auroc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) if both_classes else None,  # trapezoids
        f"tpr_at_fpr_{target_fpr:g}": float(tpr[fpr <= target_fpr].max()) if both_classes else None,
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "per_subset": per_subset,
        "roc": (fpr.tolist(), tpr.tolist()),
    }


def summary(m: dict) -> str:
    def show(value):
        return "n/a" if value is None else f"{value:.3f}"

    return f"acc {show(m['accuracy'])} AUROC {show(m['auroc'])} F1 {show(m['f1'])}"


def evaluate(model, loader, samples, accelerator, answer_ids, cfg, bad_seen) -> dict:
    scored = score_images(model, loader, accelerator, answer_ids, cfg.skip_bad_images, bad_seen)
    if not np.isfinite(scored["p_yes"]).all():  # weights that overflowed: no result is better than a meaningless one
        raise NonFiniteTrainingError("the model's answers are not finite (the LoRA weights diverged); lower --lr, "
                                     "then resume from a checkpoint before the divergence or start again")
    keep = scored["valid"] > 0  # placeholders of unreadable images do not count
    subsets = [samples[i].subset for i in scored["index"][keep]]
    metrics = classification_metrics(scored["p_yes"][keep], scored["label"][keep], subsets, cfg.target_fpr, cfg.classes)
    return metrics | {"scored": scored}


# ----------------------------------------------------------------------------------------------
# Outputs: adapter, predictions, ROC plot, merged weights
# ----------------------------------------------------------------------------------------------


def write_predictions(path: Path, samples: list[Sample], scored: dict) -> None:
    with path.open("w") as f:
        for i, p, valid in zip(scored["index"], scored["p_yes"], scored["valid"]):
            s = samples[i]
            record = {"path": str(s.path), "p_yes": float(p) if valid else None, "subset": s.subset}
            f.write(json.dumps(record | ({"label": s.label} if s.label >= 0 else {})) + "\n")


def save_roc_plot(path: Path, curves: dict, classes: tuple[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, m in curves.items():
        ax.plot(*m["roc"], label=f"{name} (AUROC {'n/a' if m['auroc'] is None else format(m['auroc'], '.3f')})")
    ax.plot([0, 1], [0, 1], "k:", linewidth=1)
    ax.set(xlabel=f"false-positive rate ({classes[0]} flagged)", ylabel=f"true-positive rate ({classes[1]} caught)",
           title="ROC")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def read_detector(adapter_dir: Path) -> dict:
    """adapter/detector.json: the question, answer tokens, resizing, class names and base the adapter was trained with."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} holds no LoRA adapter (no adapter_config.json); pass the --output_dir "
                        f"of a finished training run")
    try:
        detector = json.loads((adapter_dir / "detector.json").read_text())
        ok = {"question", "resize", "answer_ids", "base_model"} <= set(detector)
    except (OSError, ValueError, TypeError):
        ok = False
    if not ok:
        raise UserError(f"{adapter_dir / 'detector.json'} is missing or garbled (training writes it beside the adapter); "
                        f"rerun the training run with --resume_from latest to write the adapter again")
    return detector


BASE_SIZES = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "image_size", "patch_size")


def base_identity(model_config) -> dict:
    """What identifies a base model wherever its files lie: the model type and sizes of it and of its text and vision
    parts (config.json). A moved or re-downloaded copy has the same; a checkpoint of another family or size does not."""
    parts = {"": model_config, **{f"{name}.": getattr(model_config, name, None) for name in ("text_config", "vision_config")}}
    return {prefix + key: getattr(part, key) for prefix, part in parts.items() for key in BASE_SIZES
            if getattr(part, key, None) is not None}


def base_difference(detector: dict, model_id: str) -> str | None:
    """How the checkpoint `model_id` differs from the base the adapter was trained on; None if it is that base."""
    trained = detector.get("base_identity")
    if trained is None:  # an adapter saved before detector.json held the base's sizes: only the path can tell
        return None if model_id == detector["base_model"] else "path differs"
    given = base_identity(check_pretrained(model_id))
    return next((f"{key} is {given[key]!r}, not {value!r}" for key, value in trained.items()
                 if key in given and given[key] != value), None)


def load_trained(model_id: str, adapter_dir: Path, dtype: torch.dtype):
    """Base model + saved adapter, as a user would load them: PeftModel.from_pretrained."""
    from peft import PeftModel

    detector = read_detector(adapter_dir)
    check_pretrained(model_id)
    processor = load_processor(str(adapter_dir))
    base = load_base(model_id, processor, dtype)
    try:
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
    except Exception as err:
        raise UserError(f"cannot load the adapter in {adapter_dir} onto {model_id} ({first_line(err)}); load it onto "
                        f"the base it was trained on ({detector['base_model']}): drop --model") from None
    return model, processor, detector


def predict(cfg: Config) -> dict:
    """Write {"path", "p_yes", "subset", "label"?} per image, from base + saved adapter."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision)
    use_fsdp_on_cpu(accelerator)  # fsdp.yaml on CPU processes: Accelerate's real FSDP2 path, not DDP
    refuse_silent_fallbacks(accelerator)
    adapter_dir = Path(cfg.output_dir) / "adapter"
    detector = read_detector(adapter_dir)
    if cfg.model is None:
        accelerator.print(f"base model {detector['base_model']}, from {adapter_dir / 'detector.json'} (--model to "
                          f"load a copy from elsewhere)")
    base = cfg.model or detector["base_model"]
    if (difference := base_difference(detector, base)) and not cfg.allow_other_base:
        raise UserError(f"{base} is not the base model the adapter in {adapter_dir} was trained on "
                        f"({detector['base_model']}): its {difference}; drop --model to use the trained base, or pass "
                        f"--allow_other_base true to use this one anyway")
    if difference:
        warn(f"--allow_other_base: the adapter goes onto {base}, not the base it was trained on (its {difference})")
    cfg = dataclasses.replace(cfg, model=base, **{key: detector.get(key, getattr(cfg, key))  # as trained
                                                  for key in ("question", "resize", "positive_label", "negative_label")})
    output = check_output_file(cfg.predict_output or Path(cfg.output_dir) / "predictions.jsonl", cfg.overwrite,
                               inputs=[cfg.predict_data], flag="--predict_output")
    samples, skipped = load_samples(cfg.predict_data, cfg.skip_bad_images, need_labels=False, classes=cfg.classes)
    for entry in skipped:
        warn(f"skipping {entry}")
    model, processor, detector = load_trained(cfg.model, adapter_dir, base_dtype(cfg))
    loader = make_loader(samples, processor, build_prompt(processor, cfg.question), cfg, cfg.eval_batch_size, False)
    model, loader = accelerator.prepare(model, loader)
    scored = score_images(model, loader, accelerator, detector["answer_ids"], cfg.skip_bad_images, set())
    if accelerator.is_main_process:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.tmp")
        write_predictions(tmp, samples, scored)
        os.replace(tmp, output)
        print(f"P(Yes) for {len(scored['index'])} images written to {output}")
    return scored


# ----------------------------------------------------------------------------------------------
# main: check every input, then train, restore the best adapter, save it, score val and test once
# ----------------------------------------------------------------------------------------------


def prepare_demo_inputs(cfg: Config, accelerator) -> None:
    """Build the tiny model and the synthetic screenshots when asked to and absent: only into new or empty folders."""
    model_dir, manifest = Path(cfg.model), Path(cfg.train_data)
    build_model = cfg.build_tiny_model and (not model_dir.exists() or (model_dir.is_dir() and not any(model_dir.iterdir())))
    make_data = cfg.make_synthetic_data and not manifest.exists()
    if make_data and (manifest.name != "train.jsonl" or (manifest.parent.exists() and any(manifest.parent.iterdir()))):
        raise UserError(f"--train_data {manifest} does not exist, and --make_synthetic_data writes train.jsonl, val.jsonl "
                        f"and test.jsonl only into a new or empty folder; check the path, or name <new folder>/train.jsonl")
    if accelerator.is_main_process and build_model:
        from tools.make_tiny_llava import build_tiny_llava

        print(f"building a tiny random LLaVA in {build_tiny_llava(model_dir)}")
    if accelerator.is_main_process and make_data:
        from tools.make_synthetic_screenshots import make_dataset

        print(f"writing synthetic screenshots to {make_dataset(manifest.parent)}")
    accelerator.wait_for_everyone()


def check_validation_classes(samples: list[Sample], best_metric: str, classes: tuple[str, str]) -> None:
    """AUROC needs both classes, F1 a positive: without them the best checkpoint could never be chosen."""
    needed = {"auroc": {0, 1}, "f1": {1}, "accuracy": set()}[best_metric]
    if missing := needed - {s.label for s in samples}:
        kind = class_words(classes)[min(missing)].replace(" ", "-")  # an adjective: "prompt-injection images"
        raise UserError(f"the validation set has no {kind} images, so its {best_metric} is undefined and could never "
                        f"choose the best checkpoint; add some to --val_data, or pass --best_metric accuracy")


def save_adapter(accelerator, model, processor, cfg: Config, answer_ids: list[int], output_dir: Path) -> Path:
    """The adapter (save_pretrained, for PeftModel.from_pretrained), the processor and detector.json beside it."""
    adapter_dir, tmp = output_dir / "adapter", output_dir / ".adapter.tmp"
    state_dict = gathered_trainable_state(accelerator, model)  # a collective call under FSDP: every process
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
        processor.save_pretrained(tmp)
        detector = {"question": cfg.question, "yes_token": cfg.yes_token, "no_token": cfg.no_token,
                    "answer_ids": answer_ids, "resize": cfg.resize, "positive_label": cfg.positive_label,
                    "negative_label": cfg.negative_label, "base_model": cfg.model,
                    "base_identity": base_identity(accelerator.unwrap_model(model).get_base_model().config)}
        (tmp / "detector.json").write_text(json.dumps(detector, indent=2) + "\n")
        replace_folder(tmp, adapter_dir)
    accelerator.wait_for_everyone()
    return adapter_dir


def weight_dtypes(model) -> dict:
    """The dtypes the LoRA weights and the frozen base are held in (e.g. float32 over bfloat16)."""
    def names(trainable):
        return ",".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                                if p.requires_grad == trainable}))

    return {"lora_dtype": names(True), "base_dtype": names(False)}


RUN_OUTPUTS = ["config.yaml", "results.json", "metrics.jsonl", "val_predictions.jsonl", "roc_curve.png", "adapter",
               "merged", "checkpoints", "llava_injection"]  # what a run writes ("llava_injection": tensorboard)


def main(argv=None):
    cfg = parse_config(Config, argv, description=__doc__.split("\n")[0])  # every setting checked against its domain
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if not sys.stderr.isatty():  # transformers' bars (loading, writing weights) like our own: on a terminal, not in logs
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()
    if cfg.mode == "predict":
        return predict(cfg)
    wall_start = time.perf_counter()
    try:
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # lets `accelerate launch --multi_gpu` run gloo processes on CPU
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.grad_accum_steps,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_dir=cfg.output_dir,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
    except ValueError as err:
        raise UserError(f"{err}; choose another --mixed_precision (bf16 works on CPU)") from None
    use_fsdp_on_cpu(accelerator)  # fsdp.yaml on CPU processes: Accelerate's real FSDP2 path, not DDP
    refuse_silent_fallbacks(accelerator)

    # Check everything that bad input can fail before the first write: the output folder, the checkpoint to
    # resume, the data (every image's header), the model, tokenizer and LoRA targets (before the weights load,
    # so that an error is the first thing printed). The demo's generators write only into new or empty folders.
    output_dir = check_output_dir(cfg.output_dir, resuming=cfg.resume_from is not None, overwrite=cfg.overwrite)
    resume_path = resolve_resume(output_dir, cfg.resume_from)
    check_one_view_of_output_dir(output_dir, resume_path)  # several machines: one filesystem
    prepare_demo_inputs(cfg, accelerator)
    data, skipped = {}, []
    for split, spec in (("train", cfg.train_data), ("val", cfg.val_data), ("test", cfg.test_data)):
        if spec is not None:
            data[split], bad = load_samples(spec, cfg.skip_bad_images, classes=cfg.classes)
            skipped += bad
    check_validation_classes(data["val"], cfg.best_metric, cfg.classes)
    for entry in skipped:
        warn(f"skipping {entry}")
    accelerator.print(", ".join(f"{len(s)} {split} images ({sum(x.label == 0 for x in s)} {cfg.negative_label}, "
                                f"{sum(x.label == 1 for x in s)} {cfg.positive_label})" for split, s in data.items()))
    model_config = check_pretrained(cfg.model)
    if model_config.model_type not in TESTED_FAMILIES:
        warn(f"{cfg.model} is a {model_config.model_type!r} model, a family not tested with this script "
             f"({', '.join(TESTED_FAMILIES)}); see docs/vlm_families.md")
    processor = load_processor(cfg.model)
    answer_ids = answer_token_ids(processor.tokenizer, cfg.no_token, cfg.yes_token)
    prompt = build_prompt(processor, cfg.question)
    skeleton = empty_model(model_config)
    check_lora_targets(skeleton, lora_config(cfg, skeleton), lora_targets(cfg), cfg.model)

    set_seed(cfg.seed)  # here, after the demo's generators: the LoRA initialisation and batch order depend on it alone
    base = load_base(cfg.model, processor, base_dtype(cfg))
    model = add_lora(cfg, base)
    accelerator.print(f"{cfg.model} ({base_dtype(cfg)}): {sum(p.numel() for p in model.parameters() if p.requires_grad):,}"
                      f" LoRA parameters | answer ids {cfg.no_token}={answer_ids[0]}, {cfg.yes_token}={answer_ids[1]}")
    loaders = {"train": make_loader(data["train"], processor, prompt, cfg, cfg.batch_size, shuffle=True)}
    for split in ("val", "test"):
        if split in data:
            loaders[split] = make_loader(data[split], processor, prompt, cfg, cfg.eval_batch_size, shuffle=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, fused=True)
    checkpoint_trainable_only(model)  # checkpoints: the LoRA weights, not the frozen base
    fit_fsdp_wrapping(accelerator, model)  # FSDP2: one unit per transformer block the model has
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *loaders.values())
    loaders = dict(zip(loaders, prepared))
    class_weights = torch.tensor(cfg.class_weights, device=accelerator.device) if cfg.class_weights else None
    ema = EMA(model.parameters(), decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    guard = NonFiniteGuard(accelerator, model, optimizer, cfg.nan_lr_backoff, cfg.max_nonfinite_in_a_row)
    state = TrainState()
    if resume_path is not None:  # refused if it does not fit these settings, before anything is written
        load_checkpoint(accelerator, resume_path, {"train_state": state, "guard": guard} | ({"ema": ema} if ema else {}),
                        config=cfg)
        accelerator.print(f"resumed from {resume_path} at step {state.step}, epoch {state.epoch}")

    # Every check has passed: from here on the run writes (an --overwrite'n run's outputs go now, not before).
    start_run(accelerator, output_dir, cfg, RUN_OUTPUTS, fresh=resume_path is None)
    if cfg.report_to != "none":
        accelerator.init_trackers("llava_injection", config={k: str(v) if isinstance(v, list) else v
                                                            for k, v in dataclasses.asdict(cfg).items()})
    log = MetricsLog(accelerator, output_dir, step_offset=state.step if resume_path else None)
    bad_seen: set[str] = set()
    # SIGTERM/SIGINT: during training, finish the step, checkpoint and exit 75; after it, finish the final
    # phase (save, score, write) and exit 0. A second signal stops at once.
    preemption = Preemption().install()
    if train(cfg, accelerator, model, optimizer, loaders["train"], loaders["val"], data["val"], answer_ids,
             class_weights, ema, guard, state, log, output_dir, bad_seen, preemption):
        accelerator.end_training()
        accelerator.print(f"stopped by a signal at step {state.step} with a checkpoint saved; "
                          f"continue with --resume_from latest (exit code {EXIT_PREEMPTED})", flush=True)
        sys.exit(EXIT_PREEMPTED)

    # The best adapter, chosen on validation, is saved first (a bad test image cannot cost the training),
    # then the validation and test sets are scored once.
    if state.best_weights:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in state.best_weights:
                    p.copy_(state.best_weights[name])
    elif ema:
        ema.copy_to()  # no validation ran (e.g. a tiny --max_steps): use the current EMA weights
    adapter_dir = save_adapter(accelerator, model, processor, cfg, answer_ids, output_dir)
    final = {}
    for split in [split for split in ("val", "test") if split in loaders]:  # the same order on every process
        try:
            final[split] = evaluate(model, loaders[split], data[split], accelerator, answer_ids, cfg, bad_seen)
        except UserError as err:
            raise UserError(f"{err} (the trained adapter is saved in {adapter_dir}; once fixed, --resume_from latest "
                            f"scores the {split} set without training again)") from None
    bad_images = set().union(*gather_object([sorted(bad_seen)]))  # unreadable files seen by any process
    results = {f"{split}_{k}": v for split, m in final.items() for k, v in m.items() if k not in ("roc", "scored")}
    results |= {"best_step": state.best_step, "best_metric": cfg.best_metric, "epochs_run": state.epoch,
                "optimizer_steps": state.step, "skipped_bad_images": len(skipped) + len(bad_images),
                "wall_seconds": time.perf_counter() - wall_start, "peak_memory_mb": peak_memory_mb(accelerator.device),
                "train_samples_per_second": (state.train_samples * accelerator.num_processes / state.train_seconds
                                             if state.train_seconds else None),
                "num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type.value),
                "mixed_precision": accelerator.mixed_precision, "fell_back_to_fp32_at_step": guard.fallback_step,
                "seed": cfg.seed} | weight_dtypes(model)
    if accelerator.is_main_process:
        write_predictions(output_dir / "val_predictions.jsonl", data["val"], final["val"]["scored"])
        write_json(output_dir / "results.json", results)
        save_roc_plot(output_dir / "roc_curve.png", final, cfg.classes)
        if cfg.merge:  # reload in one process, so it works whatever the training setup was
            merged, merged_processor, _ = load_trained(cfg.model, adapter_dir, base_dtype(cfg))
            merged.merge_and_unload().save_pretrained(output_dir / ".merged.tmp")
            merged_processor.save_pretrained(output_dir / ".merged.tmp")
            replace_folder(output_dir / ".merged.tmp", output_dir / "merged")
        print(" | ".join(f"{split} {summary(m)}" for split, m in final.items()) +
              f" | {results['wall_seconds']:.0f} s | adapter in {adapter_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    preemption.uninstall()
    if preemption.requested:
        accelerator.print("the signal came after training: the adapter, scores and outputs were finished (exit code 0)")
    return results


if __name__ == "__main__":
    exit_on_user_error(main)
