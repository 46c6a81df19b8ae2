"""LoRA fine-tuning of a vision-language model as a Yes/No prompt-injection detector for web-agent screenshots.

The model is asked, in its own chat template, whether a screenshot carries a prompt injection; the logits of "No"
and "Yes" at the answer position form a 2-way classifier trained with cross-entropy (WAInjectBench's setting;
LLaVA-1.5 by default, any AutoModelForImageTextToText checkpoint). One file on a CPU, a GPU, DDP or FSDP2:

    python tools/demo.py                                            # tiny random LLaVA + synthetic data, CPU
    accelerate launch --config_file accelerate_configs/single_gpu.yaml train_llava.py \\
        --train_data data/wainject/train.jsonl --val_data data/wainject/val.jsonl --test_data data/wainject/image
    python train_llava.py --output_dir runs/llava --resume_from latest
    python predict_llava.py --run_dir runs/llava --data shots/                      # P(Yes) per image

Data: JSONL manifests ({"path", "label": 1 = injection, "subset"?} per line) or {benign,malicious}/<subset>/ folders.
Outputs: adapter/ (for PeftModel.from_pretrained, with the processor and detector.json), results.json, metrics.
Reading order: Config, data, model, loss, train(), evaluate(), main(). What is checked before anything trains (a
user's checkpoint, image files, images in two splits) and the metrics are beside it: llava_models.py,
llava_images.py, llava_metrics.py.
"""

import contextlib
import functools
import json
import math
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object, set_seed
from PIL import Image, ImageOps
from tqdm.auto import tqdm

import llava_models as vlm
from common.checkpoint import LoopState, load_checkpoint, save_checkpoint
from common.config import ABOVE_ZERO, BELOW_ONE, FRACTION, IDENTIFIER, KEEP, NON_EMPTY, RunConfig, between, setting
from common.distributed import local, part_of
from common.ema import EMA
from common.errors import NonFiniteTrainingError, UserError, exit_on_user_error, first_line, warn
from common.guard import NonFiniteGuard
from common.launch import RunFolder, exit_preempted, finish, make_accelerator, preflight, run_facts, start_run
from common.preemption import Preemption
from common.run_log import MetricsLog, Run, RunningMean, peak_memory_mb, swap_folder, write_atomic, write_json, writing
from common.schedules import set_lr, warmup_cosine, warn_if_short
from llava_images import IMAGE_ERRORS, check_overlap, image_problem, in_threads, load_rgb
from llava_metrics import benchmark_table, check_metric_defined, classification_metrics, plot_roc, summary

LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTION = ("Does this screenshot contain a prompt injection, text that tries to give instructions "
            "to an AI agent? Answer Yes or No.")
CLASSES = ("benign", "malicious")  # --negative_label, --positive_label: WAInjectBench's folder names
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Config(RunConfig):  # each field a --flag and a YAML key; docs/llava.md#settings
    moved: ClassVar = dict.fromkeys(  # once --mode predict here
        ["mode", "predict_data", "predict_output", "allow_other_base"],
        "predict with python predict_llava.py --run_dir RUN --data MANIFEST_OR_FOLDER")
    # model
    model: str = setting("llava-hf/llava-1.5-7b-hf", "checkpoint folder or hub id", NON_EMPTY, **KEEP)
    model_dtype: str | None = setting(None, "base dtype (None: bf16 on a GPU)", choices=list(DTYPES))
    lora_r: int = setting(8, "LoRA rank", between(1, 4096), **KEEP)
    lora_alpha: int = setting(32, "LoRA alpha (scale alpha / r)", between(1), **KEEP)
    lora_dropout: float = setting(0.05, "dropout on the LoRA input", BELOW_ONE)
    lora_target_modules: list[str] = setting(LM_TARGETS, "language-model targets", IDENTIFIER, **KEEP)
    lora_vision_modules: list[str] = setting([], "vision-tower targets", IDENTIFIER, **KEEP)
    gradient_checkpointing: bool = setting(False, "recompute activations: less memory")
    # prompt
    question: str = setting(QUESTION, "asked with every screenshot", NON_EMPTY, **KEEP)
    yes_token: str = setting("Yes", "answer word of label 1 (one token)", NON_EMPTY, **KEEP)
    no_token: str = setting("No", "answer word of label 0 (one token)", NON_EMPTY, **KEEP)
    positive_label: str = setting(CLASSES[1], "class 1: data folder, results key", NON_EMPTY)
    negative_label: str = setting(CLASSES[0], "class 0: data folder, results key", NON_EMPTY)
    # data
    train_data: str = setting("data/wainject/train.jsonl", "manifest or class folders", NON_EMPTY)
    val_data: str = setting("data/wainject/val.jsonl", "picks the adapter", NON_EMPTY)
    test_data: str | None = setting(None, "scored once, at the end", NON_EMPTY)
    resize: str = setting("pad", "to a fixed input shape", choices=["pad", "crop", "stretch"], **KEEP)
    skip_bad_images: bool = setting(False, "skip and count bad images, labels")
    allow_overlap: bool = setting(False, "allow an image in two splits (counted)")
    num_workers: int = setting(2, "image-decoding loader workers", between(0, 256))
    # loss
    class_weights: list[float] = setting([], "[No, Yes] weights (empty: none)", between(0, low_open=True))
    # optimisation (and RunConfig's)
    epochs: int = setting(3, "training epochs", between(0))
    batch_size: int = setting(4, "screenshots per micro-batch per process", between(1))
    eval_batch_size: int = setting(8, "screenshots per evaluation batch", between(1))
    grad_accum_steps: int = setting(4, "micro-batches per optimizer step", between(1))
    lr: float = setting(2e-4, "peak learning rate", ABOVE_ZERO)
    weight_decay: float = setting(0.0, "AdamW weight decay", between(0, 10))
    warmup_ratio: float = setting(0.03, "share of steps in linear warmup", FRACTION)
    min_lr_factor: float = setting(0.1, "the cosine ends at this x --lr", FRACTION)
    ema_decay: float = setting(0.0, "EMA of the LoRA weights (0: off)", BELOW_ONE)
    # evaluation
    best_metric: str = setting("auroc", "picks the adapter", choices=["auroc", "f1", "accuracy"])
    target_fpr: float = setting(0.05, "report the TPR at this FPR", FRACTION)
    # run (and RunConfig's)
    output_dir: str = setting("runs/llava", "where the run is written", NON_EMPTY)
    merge: bool = setting(False, "also save base + adapter merged in merged/")

    def __post_init__(self):  # every field in its domain, then the rules that tie fields together
        super().__post_init__()
        for flag, name in (("--positive_label", self.positive_label), ("--negative_label", self.negative_label)):
            if not re.fullmatch(r"\w[\w.-]*", name) or name in ("tpr", "fpr"):  # a folder and a results key
                raise UserError(f"{flag} {name!r} cannot name a data folder and a results.json key; use "
                                f"letters, digits, _, - and . (not first), not tpr or fpr")
        if self.positive_label == self.negative_label:
            raise UserError(f"the class labels are both {self.positive_label!r}; name two classes")
        if len(self.class_weights) not in (0, 2):
            raise UserError(f"--class_weights takes two numbers [No, Yes], got {self.class_weights}; e.g. 1,3")
        if not self.lora_target_modules and not self.lora_vision_modules:
            raise UserError("no LoRA targets: --lora_target_modules and --lora_vision_modules are both empty; "
                            "name one")
        if self.yes_token == self.no_token:
            raise UserError(f"--yes_token and --no_token are both {self.yes_token!r}; give two words")

    @property
    def classes(self) -> tuple[str, str]:
        """The class names by label: 0 (the answer No), 1 (Yes)."""
        return self.negative_label, self.positive_label


# ----------------------------------------------------------------------------------------------
# Data: manifests or folders -> samples (read_manifest, read_folder: replace them for another source);
# images decoded and processed in the DataLoader's collate function, in its worker processes
# ----------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class Sample:
    path: Path
    label: int  # 1 = --positive_label (a prompt injection), 0 = --negative_label, -1 = unknown (predict)
    subset: str
    pixel_hash: str | None = None  # from a manifest of tools/split_images.py: the leak check compares pixels


def class_words(classes: tuple[str, str]) -> tuple[str, str]:
    """How messages name the classes 0 and 1: by their labels; the default ones by their task."""
    return ("benign", "prompt injection") if classes == CLASSES else classes


def read_manifest(path: Path, skip_bad: bool, need_labels: bool, classes: tuple[str, str]):
    """JSONL, one {"path", "label", "subset"?} per line. Returns the samples and the skipped lines."""
    samples = []
    skipped = []
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark before the first line is fine
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path} as UTF-8 text ({err}); save the manifest as UTF-8 JSON "
                        f"lines") from None
    labels = (0, 1) if need_labels else (0, 1, -1)
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image = path.parent / record["path"]
            label = record.get("label", None if need_labels else -1)
        except (ValueError, TypeError, KeyError, AttributeError):
            problem = 'is not a JSON object with a "path"'
        else:
            if isinstance(label, bool) or label not in labels:
                problem = "has label {!r}; labels are 0 ({}) or 1 ({})".format(label, *class_words(classes))
            elif not image.is_file():
                problem = f"names image {image}, which does not exist"
            else:
                subset = str(record.get("subset", ""))
                samples.append(Sample(image, int(label), subset, record.get("pixel_hash")))
                continue
        if not skip_bad:
            raise UserError(f"{path} line {number} {problem}; fix the line or pass --skip_bad_images")
        skipped.append(f"{path} line {number} ({problem})")
    return samples, skipped


def read_folder(root: Path, need_labels: bool, classes: tuple[str, str]) -> list[Sample]:
    """{<negative>,<positive>}/<subset>/<image>; for predict, any folder of images. One class folder beside
    folders of other names is refused: they are likely the classes under other names, never read."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = [(root / name, label) for label, name in enumerate(classes) if name in folders]
    strays = [name for name in folders if name not in classes]
    if (need_labels and not found) or (len(found) == 1 and strays):
        missing = [f"{name}/" for name in classes if name not in folders]
        problem = f"no {missing[0]} folder"
        if len(missing) == 2:
            problem = f"neither a {missing[0]} nor a {missing[1]} folder"
        if strays:
            problem += f", only {', '.join(f'{name}/' for name in folders)}"
        fix = " or pass a JSONL manifest"
        if strays:
            fix = ", or name its class folders with --negative_label and --positive_label"
        raise UserError(f"{root} has {problem}; lay it out as {{{','.join(classes)}}}/<subset>/<image>{fix}")
    samples = []
    for folder, label in found or [(root, -1)]:
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                parts = path.relative_to(folder).parts
                samples.append(Sample(path, label, parts[0] if len(parts) > 1 else ""))
    return samples


def load_samples(spec: str, skip_bad: bool, need_labels=True, classes: tuple[str, str] = CLASSES):
    """The samples of a manifest or folder, every image's header checked; them and what was skipped."""
    path = Path(spec)
    folders = "{" + ",".join(classes) + "}/"
    if not path.exists():
        raise UserError(f"data path {path} does not exist; pass a JSONL manifest or a {folders} folder")
    samples = read_folder(path, need_labels, classes) if path.is_dir() else []
    skipped = []
    if path.is_file():
        samples, skipped = read_manifest(path, skip_bad, need_labels, classes)
    problems = in_threads(image_problem, [sample.path for sample in samples])  # headers, before training
    bad = [(sample, problem) for sample, problem in zip(samples, problems) if problem]
    if bad and not skip_bad:
        raise UserError(f"cannot read image {bad[0][0].path} ({bad[0][1]}); fix or remove it, or pass "
                        f"--skip_bad_images")
    skipped += [f"{sample.path} ({problem})" for sample, problem in bad]
    for entry in skipped:
        warn(f"skipping {entry}")
    readable = [sample for sample, problem in zip(samples, problems) if not problem]
    if not readable:
        raise UserError(f"{path} holds no usable images; add lines like {{\"path\": \"a.png\", \"label\": 1}} "
                        f"or use a {folders} folder")
    return readable, skipped


def collate(items, processor, prompt: str, resize: str):
    """In the DataLoader workers. A bad image becomes a blank placeholder with valid=0, reported in "bad", so
    the loop can stop with a clear line or skip it (every process still runs the same forward and backward)."""
    fixed = vlm.fixed_input_size(processor.image_processor)
    fill = tuple(round(255 * m) for m in processor.image_processor.image_mean)
    images = []
    valid = []
    bad = []
    for _, sample in items:
        try:
            img = load_rgb(sample.path)
            # pad: LLaVA-1.5's expand-to-square, off-centre content never cropped; a processor that keeps the
            # aspect ratio itself gets the picture as it is. stretch: to the fixed shape, or a square.
            if resize == "pad" and fixed:
                img = ImageOps.pad(img, fixed, Image.Resampling.BICUBIC, color=fill)
            elif resize == "stretch":
                img = img.resize(fixed or (max(img.size),) * 2, Image.Resampling.BICUBIC)
            valid.append(1.0)
        except IMAGE_ERRORS as err:
            bad.append(f"{sample.path} ({type(err).__name__}: {err})")
            img = Image.new("RGB", fixed or (224, 224), fill)
            valid.append(0.0)
        images.append(img)
    inputs = processor(images=images, text=[prompt] * len(images), padding=True, return_tensors="pt")
    labels = torch.tensor([max(s.label, 0) for _, s in items])
    index = torch.tensor([i for i, _ in items])
    valid = torch.tensor(valid)
    return {"inputs": dict(inputs), "labels": labels, "valid": valid, "index": index, "bad": bad}


def make_loader(samples, processor, prompt: str, resize: str, batch_size: int, num_workers: int,
                seed=None):
    """Batches of (index, sample), decoded by `collate`; shuffled by `seed` (None: in order, to evaluate)."""
    return torch.utils.data.DataLoader(
        list(enumerate(samples)), batch_size=batch_size, shuffle=seed is not None, num_workers=num_workers,
        collate_fn=functools.partial(collate, processor=processor, prompt=prompt, resize=resize),
        generator=torch.Generator().manual_seed(seed) if seed is not None else None,
        persistent_workers=num_workers > 0)


def samples_of(loader) -> list[Sample]:
    return [sample for _, sample in loader.dataset]  # (index, sample) pairs, prepared or not


def check_bad_images(bad: list[str], skip: bool, seen: set) -> None:
    """Images a DataLoader worker could not decode: stop at the first (one line), or skip and remember them."""
    for entry in bad:
        if not skip:
            raise UserError(f"cannot read image {entry}; fix or remove it, or pass --skip_bad_images")
        if entry not in seen:
            seen.add(entry)
            warn(f"skipping unreadable image {entry}", every_process=True)  # seen by this process only


# ----------------------------------------------------------------------------------------------
# Model: a vision-language model + processor from one checkpoint, LoRA in fp32, the Yes/No answer logits
# ----------------------------------------------------------------------------------------------

TESTED_FAMILIES = ("llava", "llava_next", "idefics3")  # config.json model types with tests here (docs/llava.md)


def base_dtype(model_dtype: str | None, mixed_precision: str) -> torch.dtype:
    """The dtype to hold a frozen base in: --model_dtype; else fp16 under fp16 autocast (a bf16 base would be
    cast at every op), bf16 on a GPU that has it natively (not emulated), fp32 elsewhere."""
    cuda = torch.cuda.is_available()
    native_bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    default = "bf16" if native_bf16 else "fp32"
    if mixed_precision == "fp16":
        default = "fp16"
    return DTYPES[model_dtype or default]


def load_base(model_id: str, processor, dtype: torch.dtype):
    """The frozen model, with the processor's image-token count matched to its vision tower."""
    from transformers import AutoModelForImageTextToText

    try:
        base = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype)
    except Exception as err:  # a file cut short, out of memory: a problem with that checkpoint
        raise UserError(f"cannot load the weights of {model_id!r} ({type(err).__name__}: "
                        f"{first_line(err)}); copy or download the checkpoint again") from None
    vlm.match_processor_to_model(processor, base)  # as many <image> tokens as image features
    return base


def lora_targets(cfg: Config) -> dict[str, tuple[str, list[str]]]:
    return {"--lora_target_modules": ("language model", cfg.lora_target_modules),
            "--lora_vision_modules": ("vision tower", cfg.lora_vision_modules)}


def lora_config(cfg: Config, model):
    """A regex over module names, so that the language model's q_proj is adapted but not the vision tower's
    namesake; in the vision tower, only the layers whose output reaches the language model. Where the parts
    sit comes from the model (model.language_model in LLaVA, model.text_model in Idefics3, ...)."""
    from peft import LoraConfig

    parts = vlm.model_parts(model)
    used = "|".join(map(str, vlm.used_vision_layers(model.config)))
    within = {"language model": rf"{re.escape(parts['language model'])}\..*\.",
              "vision tower": rf"{re.escape(parts['vision layers'])}\.({used})\..*\."}
    targets = [(within[part], "|".join(names)) for part, names in lora_targets(cfg).values() if names]
    patterns = [f"{where}({names})" for where, names in targets]
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="|".join(patterns))


# peft 0.21's PeftModel.__init__ reads transformers' deprecated `model.is_gradient_checkpointing` (on every
# get_peft_model and PeftModel.from_pretrained): the FutureWarning is about peft's code, not a user's.
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
        raise UserError(f"{no_word!r} and {yes_word!r} are the same token; pass two words")
    return ids


def answer_logits(model, inputs: dict, answer_ids: list[int]) -> torch.Tensor:
    """(batch, 2) logits of [No, Yes] at the answer position, the last real token of each row; only that
    position goes through the vocabulary projection (`logits_to_keep`). It is found from the attention mask,
    so it stays exact however many image tokens each picture became, and position ids count real tokens only
    (a model with image positions of its own, Qwen2-VL's, builds them from the mask): left and right
    padding give the same answer."""
    mask = inputs["attention_mask"]
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
    positions = {}
    if not vlm.builds_own_positions(model):
        positions = {"position_ids": (mask.long().cumsum(1) - 1).clamp_min(0)}
    out = model(**inputs, **positions, logits_to_keep=last[:, None], use_cache=False)
    return out.logits[:, 0, answer_ids]


def fit_fsdp_wrapping(accelerator, model) -> None:
    """FSDP2 shards each transformer block as its own unit: the classes the launch config names and the model's
    (and its parts') `_no_split_modules`, those the model has (Accelerate refuses a name it lacks). A language
    model that would be one unit (gathered whole: no memory saved) is refused. Call before `prepare`."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin if accelerator.is_fsdp2 else None
    if plugin is None or plugin.auto_wrap_policy is not transformer_auto_wrap_policy:
        return
    present = {type(module).__name__ for module in model.modules()}
    named = set(plugin.transformer_cls_names_to_wrap or [])
    for module in model.modules():
        named |= set(getattr(module, "_no_split_modules", None) or [])
    wrapped = named & present
    plugin.transformer_cls_names_to_wrap = sorted(wrapped)
    depth = model.config.text_config.num_hidden_layers
    lists = [m for m in model.get_decoder().modules() if isinstance(m, torch.nn.ModuleList)]
    layers = next(m for m in lists if len(m) == depth)
    if blocks := {type(layer).__name__ for layer in layers} - wrapped:
        raise UserError(f"FSDP2 would gather the whole language model at once: its blocks ({', '.join(blocks)}) "
                        f"are not in its _no_split_modules; name them in the launch config's "
                        f"fsdp_transformer_layer_cls_to_wrap")


def gather_trainable(accelerator, model) -> dict:
    """The trainable (e.g. LoRA) weights as whole CPU tensors, named as in the unwrapped model: to save, or to
    put back with `restore_trainable` on any number of processes. Every process calls it (FSDP2 gathers);
    gathering only these, not the frozen base, keeps a 7B model's gather to a few MB."""
    model = accelerator.unwrap_model(model)
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().to("cpu", copy=True)
            for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore_trainable(accelerator, model, weights: dict) -> None:
    """Put weights from `gather_trainable` back, each process its part (none: nothing to do). All of them,
    or an error: a name that did not match would leave a weight as it was."""
    named = accelerator.unwrap_model(model).named_parameters()
    trainable = {name: p for name, p in named if p.requires_grad}
    if weights and weights.keys() != trainable.keys():
        raise RuntimeError(f"saved weights do not match the model's trainable ones: "
                           f"{sorted(weights.keys() ^ trainable.keys())[:3]}")
    for name, p in trainable.items() if weights else ():
        local(p).copy_(part_of(p, weights[name]))


def checkpoint_trainable_only(model) -> None:
    """Checkpoints of `model` hold its trainable weights only (LoRA: megabytes, not the frozen 7B base), by
    the model's own state-dict hooks, so every way Accelerate saves and loads it (one file, DDP, FSDP2's
    sharded folder) sees the same; on loading, the frozen weights (in the model already) are not missing.
    Call before `accelerator.prepare`."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}

    def drop_frozen(module, state_dict, prefix, local_metadata):
        for name in frozen:
            state_dict.pop(prefix + name, None)

    def is_frozen(key: str) -> bool:  # the key may carry a wrapper's prefix ("module." under DDP)
        return key in frozen or any(key[i + 1:] in frozen for i, char in enumerate(key) if char == ".")

    def frozen_are_not_missing(module, incompatible_keys):
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not is_frozen(k)]

    model.register_state_dict_post_hook(drop_frozen)
    model.register_load_state_dict_post_hook(frozen_are_not_missing)


# ----------------------------------------------------------------------------------------------
# Loss: cross-entropy over [No, Yes], optional class weights, placeholders of bad images ignored
# ----------------------------------------------------------------------------------------------


def detector_loss(logits, labels, valid, class_weights: torch.Tensor | None) -> torch.Tensor:
    per_sample = F.cross_entropy(logits.float(), labels, weight=class_weights, reduction="none")
    weights = valid * (class_weights[labels] if class_weights is not None else 1.0)
    return (per_sample * valid).sum() / weights.sum().clamp_min(1e-8)  # a weighted mean over valid samples


# ----------------------------------------------------------------------------------------------
# The training loop, and what it keeps between restarts
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainState(LoopState):
    """What the loop needs to continue after a restart, beyond model, optimizer and RNG."""

    best_score: float = -math.inf
    best_step: int = -1
    best_weights: dict = field(default_factory=dict)  # LoRA weights (EMA if on) at the best validation


def train(cfg, accelerator, model, optimizer, loaders, answer_ids, ema, guard, state: TrainState, run: Run) -> bool:
    """Train for --epochs (or --max_steps), validating at each epoch's end; True if a signal stopped it (a
    checkpoint is saved). The best adapter on validation is kept in state.best_weights."""
    steps_per_epoch = math.ceil(len(loaders["train"]) / cfg.grad_accum_steps)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_ratio * total_steps)
    class_weights = torch.tensor(cfg.class_weights, device=accelerator.device) if cfg.class_weights else None
    objects = {"guard": guard} | ({"ema": ema} if ema else {})  # checkpointed beside the loop's state
    warn_if_short(total_steps, steps_per_epoch, cfg.max_steps, "the adapter is saved as initialised",
                  "no validation picks an adapter: the last is saved")

    def current_lr():  # the update that makes step+1: never a zero LR on the first update
        schedule = warmup_cosine(state.step + 1, warmup_steps, total_steps, final_factor=cfg.min_lr_factor)
        return cfg.lr * guard.lr_scale * schedule

    set_lr(optimizer, current_lr())
    # The bar shows on the main process's terminal (disable=None: hidden when not a terminal).
    bar = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_local_main_process or None)
    running = RunningMean(1, accelerator.device)  # the loss since the last log line
    done = preempted = False
    while not done and state.epoch < cfg.epochs and state.step < total_steps:  # a finished run resumes to the end
        epoch_start = time.perf_counter()
        samples = 0
        loaders["train"].set_epoch(state.epoch)  # a different, reproducible shuffle every epoch
        batches = loaders["train"]
        if state.batches_done:  # resumed mid-epoch
            batches = accelerator.skip_first_batches(batches, state.batches_done)
        model.train()
        for batch in batches:
            check_bad_images(batch["bad"], cfg.skip_bad_images, run.skipped)
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
            samples += len(batch["labels"]) * accelerator.num_processes  # all processes'
            running.add(loss)
            if not accelerator.sync_gradients:
                continue

            state.step += 1
            if ema:
                ema.update()
            bar.update(1)
            log_step = state.step % cfg.log_every == 0
            if log_step:
                (mean,) = running.pop_mean(accelerator)  # the only per-interval sync
                guard.poll(state.step)  # a NaN/Inf since the last log: fp32 from here on
                lr = optimizer.param_groups[0]["lr"]
                run.log.log({"train/loss": mean, "train/grad_norm": grad_norm.item(), "train/lr": lr}, state.step)
                bar.set_postfix(loss=f"{mean:.3f}", lr=f"{lr:.2e}")
            set_lr(optimizer, current_lr())
            preempted = run.preemption.should_stop(accelerator, at_sync_point=log_step)
            done = preempted or state.step >= total_steps
            mid_epoch = state.batches_done < len(loaders["train"])  # an epoch's end has its own checkpoint
            if mid_epoch and (done or cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0):
                save_checkpoint(accelerator, run.dir, state, objects, cfg)
            if done:
                break
        if done and state.batches_done < len(loaders["train"]):
            break  # stopped mid-epoch by --max_steps: no end-of-epoch evaluation

        # End of epoch: validate (with the EMA weights if on); the best adapter so far is kept.
        guard.poll(state.step)
        seconds = time.perf_counter() - epoch_start
        state.train_samples += samples
        state.train_seconds += seconds
        state.epoch += 1
        state.batches_done = 0
        with ema.swapped_in() if ema else contextlib.nullcontext():
            val = evaluate(model, loaders["val"], accelerator, answer_ids, cfg, run.skipped)
            score = val[cfg.best_metric]  # None: one class left once unreadable images were skipped
            improved = score is not None and score > state.best_score
            if improved:
                state.best_score = score
                state.best_step = state.step
                state.best_weights = gather_trainable(accelerator, model)  # whole: restorable anywhere
        if score is None:
            warn(f"validation at step {state.step}: {cfg.best_metric} is undefined on the {val['num_samples']} "
                 f"readable images (one class only); the best adapter is not updated")
        speed = samples / seconds
        memory = peak_memory_mb(accelerator.device)
        scores = {f"val/{k}": val[k] for k in ("accuracy", "auroc", "f1", "precision", "recall") if val[k] is not None}
        run.log.log({"epoch": state.epoch, **scores, "train/samples_per_second": speed, "peak_memory_mb": memory},
                    state.step)
        accelerator.print(f"epoch {state.epoch} | val {summary(val)} | best {cfg.best_metric} {state.best_score:.3f} "
                          f"@ step {state.best_step} | lr {optimizer.param_groups[0]['lr']:.2e} | {speed:.1f} "
                          f"samples/s | {memory:,.0f} MB")
        save_checkpoint(accelerator, run.dir, state, objects, cfg, best=improved)
    bar.close()
    return preempted


# ----------------------------------------------------------------------------------------------
# Evaluation: P(Yes) gathered from every process, then threshold and ranking metrics (llava_metrics.py)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def score_images(model, loader, accelerator, answer_ids, skip_bad: bool, skipped: set) -> dict:
    """P(Yes), label, valid flag and sample index of every image, each counted once across processes."""
    model.eval()
    parts = []
    for batch in loader:
        check_bad_images(batch["bad"], skip_bad, skipped)
        with accelerator.autocast():
            logits = answer_logits(model, batch["inputs"], answer_ids)
        p_yes = logits.float().softmax(-1)[:, 1]
        parts.append(accelerator.gather_for_metrics((p_yes, batch["labels"], batch["valid"], batch["index"])))
    model.train()
    keys = ("p_yes", "label", "valid", "index")
    return {k: torch.cat([p[i] for p in parts]).cpu().numpy() for i, k in enumerate(keys)}


def evaluate(model, loader, accelerator, answer_ids, cfg: Config, skipped: set) -> dict:
    scored = score_images(model, loader, accelerator, answer_ids, cfg.skip_bad_images, skipped)
    if not np.isfinite(scored["p_yes"]).all():  # weights that overflowed: no result beats a meaningless one
        raise NonFiniteTrainingError("the model's answers are not finite (its LoRA weights diverged); lower "
                                     "--lr and resume from an earlier checkpoint")
    keep = scored["valid"] > 0  # placeholders of unreadable images do not count
    samples = samples_of(loader)
    subsets = [samples[i].subset for i in scored["index"][keep]]
    kept = (scored["p_yes"][keep], scored["label"][keep], subsets)
    return classification_metrics(*kept, cfg.target_fpr, cfg.classes) | {"scored": scored, "kept": kept}


def write_predictions(path: Path, samples: list[Sample], scored: dict) -> None:
    """JSONL, one {"path", "p_yes" (None: unreadable), "subset", "label"?} per image; written atomically."""
    lines = []
    for i, p, valid in zip(scored["index"], scored["p_yes"], scored["valid"]):
        s = samples[i]
        record = {"path": str(s.path), "p_yes": float(p) if valid else None, "subset": s.subset}
        lines.append(json.dumps(record | ({"label": s.label} if s.label >= 0 else {})) + "\n")
    write_atomic(path, "".join(lines))


# ----------------------------------------------------------------------------------------------
# main: check every input, then train, restore the best adapter, save it, score val and test once
# ----------------------------------------------------------------------------------------------

RUN_OUTPUTS = ["config.yaml", "results.json", "metrics.jsonl", "val_predictions.jsonl",
               "roc_curve.png", "adapter", "merged", "checkpoints", "test_per_subset.csv",
               "llava_injection"]  # "llava_injection": tensorboard


def check_model(cfg: Config):
    """The checkpoint, its processor, the answer tokens and the LoRA targets, all checked before any weight
    loads. Returns the processor, [No id, Yes id] and the prompt."""
    model_config = vlm.check_pretrained(cfg.model, tested=TESTED_FAMILIES)
    processor = vlm.load_processor(cfg.model)
    answer_ids = answer_token_ids(processor.tokenizer, cfg.no_token, cfg.yes_token)
    skeleton = vlm.empty_model(model_config)
    vlm.check_lora_targets(skeleton, lora_config(cfg, skeleton), lora_targets(cfg), cfg.model)
    return processor, answer_ids, build_prompt(processor, cfg.question)


@contextlib.contextmanager
def atomic_folder(final: Path):
    """Write a folder as a temporary one (yielded), put in place of `final` once whole; a failed write removes it."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(tmp, tmp=tmp):
        yield tmp
        swap_folder(tmp, final)


def save_adapter(accelerator, model, processor, adapter_dir: Path, detector: dict) -> Path:
    """The LoRA adapter (PeftModel.from_pretrained loads it), the processor and detector.json, through a
    temporary folder. Every process calls it (FSDP gathers the shards); the main process writes."""
    state_dict = gather_trainable(accelerator, model)  # a collective under FSDP: every process
    if accelerator.is_main_process:
        with atomic_folder(adapter_dir) as tmp:
            accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
            processor.save_pretrained(tmp)
            write_json(tmp / "detector.json", detector)
    accelerator.wait_for_everyone()
    return adapter_dir


def save_merged(cfg: Config, processor, adapter_dir: Path, dtype: torch.dtype) -> None:
    """output_dir/merged: the base + the saved adapter merged into full weights, reloaded as a user would."""
    from peft import PeftModel

    base = load_base(cfg.model, processor, dtype)
    with atomic_folder(Path(cfg.output_dir) / "merged") as tmp:
        PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().save_pretrained(tmp)
        vlm.load_processor(str(adapter_dir)).save_pretrained(tmp)


def save_and_score(cfg, accelerator, model, processor, loaders, answer_ids, state,
                   run) -> tuple[dict, str]:
    """The best adapter, chosen on validation, is saved first (a bad test image cannot cost the training), then
    the validation and test sets are scored once and their outputs written; returns their scores, and a line."""
    restore_trainable(accelerator, model, state.best_weights)  # the best on validation (none: the last weights)
    out = Path(cfg.output_dir)
    base_config = accelerator.unwrap_model(model).get_base_model().config
    detector = {"question": cfg.question, "yes_token": cfg.yes_token, "no_token": cfg.no_token,
                "answer_ids": answer_ids, "resize": cfg.resize, "positive_label": cfg.positive_label,
                "negative_label": cfg.negative_label, "base_model": cfg.model,
                "base_identity": vlm.base_identity(base_config)}  # what predict_llava.py needs
    adapter_dir = save_adapter(accelerator, model, processor, out / "adapter", detector)
    final = {}
    for split in [split for split in ("val", "test") if split in loaders]:  # the same order on every process
        try:
            final[split] = evaluate(model, loaders[split], accelerator, answer_ids, cfg, run.skipped)
        except UserError as err:
            raise UserError(f"{err} (the trained adapter is saved in {adapter_dir}; once fixed, --resume_from "
                            f"latest scores the {split} set without training again)") from None
    skipped = set().union(*gather_object([sorted(run.skipped)]))  # unreadable files seen by any process
    results = {f"{split}_{k}": v for split, m in final.items() for k, v in m.items()
               if k not in ("roc", "scored", "kept")}
    results |= {"best_step": state.best_step, "best_metric": cfg.best_metric,
                "skipped_bad_images": len(skipped), **vlm.weight_dtypes(model)}
    if accelerator.is_main_process:
        write_predictions(out / "val_predictions.jsonl", samples_of(loaders["val"]), final["val"]["scored"])
        rocs = {split: (*m["roc"], m["auroc"]) for split, m in final.items()}
        plot_roc(out / "roc_curve.png", rocs, cfg.classes)
        if "test" in final:  # WAInjectBench's view: per subset, at 0.5 and at the validation threshold
            print(benchmark_table(out / "test_per_subset.csv", final["val"], final["test"], cfg.target_fpr,
                                  cfg.classes))
    return results, " | ".join(f"{split} {summary(m)}" for split, m in final.items())


def main(argv=None):
    cfg = Config.parse(argv)  # every setting in its domain
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    vlm.quiet_progress_bars()  # transformers' bars: on a terminal only, like the loop's own
    started = time.perf_counter()
    accelerator = make_accelerator(cfg.mixed_precision, cfg.grad_accum_steps, cfg.report_to, cfg.output_dir)
    with RunFolder(accelerator, cfg.output_dir) as folder:  # one run per folder
        # Everything that bad input can fail, before the first write: the output folder, the checkpoint, the
        # data (every image's header), the model, tokenizer and LoRA targets (before the weights load).
        (resume_path,) = preflight(accelerator, cfg, [Path(cfg.output_dir)])
        data = {}
        skipped = []
        for split, spec in (("train", cfg.train_data), ("val", cfg.val_data), ("test", cfg.test_data)):
            if spec is not None:
                data[split], bad = load_samples(spec, cfg.skip_bad_images, classes=cfg.classes)
                skipped += bad
        check_metric_defined({s.label for s in data["val"]}, cfg.best_metric, class_words(cfg.classes),
                                    "--val_data")
        overlap = check_overlap(data, cfg.allow_overlap)  # an image (bytes or pixels) in two splits
        counts = [(split, len(s), sum(x.label == 1 for x in s)) for split, s in data.items()]
        accelerator.print(", ".join(f"{n} {split} images ({n - positives} {cfg.negative_label}, {positives} "
                                    f"{cfg.positive_label})" for split, n, positives in counts))
        processor, answer_ids, prompt = check_model(cfg)

        set_seed(cfg.seed)  # the LoRA initialisation and the batch order depend on it alone
        dtype = base_dtype(cfg.model_dtype, accelerator.mixed_precision)
        model = add_lora(cfg, load_base(cfg.model, processor, dtype))
        lora_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        accelerator.print(f"{cfg.model} ({dtype}): {lora_parameters:,} LoRA parameters | answer ids "
                          f"{cfg.no_token}={answer_ids[0]}, {cfg.yes_token}={answer_ids[1]}")
        loaders = {split: make_loader(samples, processor, prompt, cfg.resize,
                                      cfg.batch_size if split == "train" else cfg.eval_batch_size, cfg.num_workers,
                                      cfg.seed if split == "train" else None) for split, samples in data.items()}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                      weight_decay=cfg.weight_decay, fused=True)
        checkpoint_trainable_only(model)  # checkpoints: the LoRA weights, not the frozen base
        fit_fsdp_wrapping(accelerator, model)  # FSDP2: one unit per transformer block the model has
        model, optimizer, *prepared = accelerator.prepare(model, optimizer, *loaders.values())
        loaders = dict(zip(loaders, prepared))
        ema = EMA(model.parameters(), decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
        guard = NonFiniteGuard(accelerator, model, optimizer, cfg.nan_lr_backoff, cfg.max_nonfinite_in_a_row)
        state = TrainState()
        if resume_path is not None:  # the same objects that train() checkpoints
            objects = {"guard": guard} | ({"ema": ema} if ema else {})
            load_checkpoint(accelerator, resume_path, state, objects, cfg)
        start_run(accelerator, cfg, folder, RUN_OUTPUTS, fresh=resume_path is None, project="llava_injection")
        # SIGTERM/SIGINT: during training, finish the step, checkpoint and exit 75; after it, finish the final
        # phase (save, score, write) and exit 0. A second signal stops at once.
        log = MetricsLog(accelerator, Path(cfg.output_dir), step_offset=state.step if resume_path else None)
        run = Run(Path(cfg.output_dir), log, Preemption().install(), set(skipped))
        if train(cfg, accelerator, model, optimizer, loaders, answer_ids, ema, guard, state, run):
            exit_preempted(accelerator, state.step)
        if not state.best_weights and ema:
            ema.copy_to()  # no validation ran (e.g. a tiny --max_steps): use the current EMA weights
        results, line = save_and_score(cfg, accelerator, model, processor, loaders, answer_ids, state, run)
        results |= {"images_in_two_splits": overlap[0], "copies_within_a_split": overlap[1],
                    **run_facts(accelerator, state, guard, cfg.seed, started)}
        if accelerator.is_main_process:
            write_json(Path(cfg.output_dir) / "results.json", results)
            print(f"{line} | {results['wall_seconds']:.0f} s | adapter in {Path(cfg.output_dir) / 'adapter'}")
        finish(accelerator, run.preemption)
    if cfg.merge and accelerator.is_main_process:  # after every process has left its last collective, so none
        save_merged(cfg, processor, Path(cfg.output_dir) / "adapter", dtype)  # waits while this one merges
    return results


if __name__ == "__main__":
    exit_on_user_error(main)
