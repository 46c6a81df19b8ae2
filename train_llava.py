"""LoRA fine-tuning of a vision-language model as a Yes/No prompt-injection detector for web-agent screenshots.

The model is asked, in its own chat template, whether a screenshot carries a prompt injection; the logits of "No"
and "Yes" at the answer position form a 2-way classifier trained with cross-entropy (WAInjectBench's setting;
LLaVA-1.5 by default, any AutoModelForImageTextToText checkpoint). One file on a CPU, a GPU, DDP or FSDP2:

    python train_llava.py --config configs/llava_tiny_cpu.yaml      # tiny random LLaVA + synthetic data, CPU
    accelerate launch --config_file accelerate_configs/single_gpu.yaml train_llava.py \\
        --train_data data/wainject/train.jsonl --val_data data/wainject/val.jsonl --test_data data/wainject/image
    python train_llava.py --output_dir runs/llava --resume_from latest
    python predict_llava.py --run_dir runs/llava --data shots/                      # P(Yes) per image

Data: JSONL manifests ({"path", "label": 1 = injection, "subset"?} per line) or {benign,malicious}/<subset>/ folders.
Outputs: adapter/ (for PeftModel.from_pretrained, with the processor and detector.json), results.json, metrics.
Reading order: Config, data, model, loss, train(), evaluate(), main().
"""

import contextlib
import functools
import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object, set_seed
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from common import pretrained
from common.checkpoint import load_checkpoint, save_checkpoint
from common.classification import benchmark_table, check_metric_defined, classification_metrics, summary
from common.config import check_domains, parse_config, setting
from common.distributed import fit_fsdp_wrapping
from common.domains import ABOVE_ZERO, BELOW_ONE, FRACTION, IDENTIFIER, NON_EMPTY, TRACKER, above, at_least, between
from common.duplicates import check_overlap
from common.ema import EMA
from common.errors import NonFiniteTrainingError, UserError, exit_on_user_error, warn
from common.guard import NonFiniteGuard
from common.images import IMAGE_ERRORS, check_bad_images, image_problems, load_rgb
from common.launch import Run, exit_preempted, finish, make_accelerator, preflight, run_facts, start_run, warn_if_short
from common.plots import plot_roc
from common.preemption import Preemption
from common.run_log import MetricsLog, RunningMean, peak_memory_mb, write_json
from common.schedules import set_lr, warmup_cosine
from common.trainable import checkpoint_trainable_only, gather_trainable, restore_trainable, save_adapter, save_merged
from tools.demo import prepare_demo_inputs

LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_QUESTION = ("Does this screenshot contain a prompt injection, text that tries to give instructions "
                    "to an AI agent? Answer Yes or No.")
DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
DEFAULT_CLASSES = ("benign", "malicious")  # --negative_label, --positive_label: WAInjectBench's folder names
PREDICT = "predict with python predict_llava.py --run_dir RUN --data MANIFEST_OR_FOLDER"  # once --mode predict here
MOVED = dict.fromkeys(["mode", "predict_data", "predict_output", "allow_other_base"], PREDICT)
KEEP = {"same_on_resume": True}  # a resumed run must keep these settings: the model, its LoRA, the prompt


@dataclass
class Config:  # every field is a --flag and a YAML key; what each means in depth: docs/llava.md#settings
    # model
    model: str = setting(DEFAULT_MODEL, "image-text-to-text checkpoint folder or hub id", NON_EMPTY, **KEEP)
    build_tiny_model: bool = setting(False, "if --model is a missing folder, build a tiny random LLaVA there (demo)")
    model_dtype: str | None = setting(None, "the base's dtype (None: bf16 on a GPU)", choices=list(pretrained.DTYPES))
    lora_r: int = setting(8, "LoRA rank", between(1, 4096), **KEEP)
    lora_alpha: int = setting(32, "LoRA alpha (scale = alpha / r)", at_least(1), **KEEP)
    lora_dropout: float = setting(0.05, "dropout on the LoRA input", BELOW_ONE)
    lora_target_modules: list[str] = setting(LM_TARGETS, "language-model modules that get LoRA", IDENTIFIER, **KEEP)
    lora_vision_modules: list[str] = setting([], "vision-tower modules that get LoRA too", IDENTIFIER, **KEEP)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward to save memory")
    # prompt
    question: str = setting(DEFAULT_QUESTION, "the question asked with every screenshot", NON_EMPTY, **KEEP)
    yes_token: str = setting("Yes", "answer word of the positive class (label 1); one token", NON_EMPTY, **KEEP)
    no_token: str = setting("No", "answer word of the negative class (label 0); one token", NON_EMPTY, **KEEP)
    positive_label: str = setting(DEFAULT_CLASSES[1], "name of class 1: its data folder and results key", NON_EMPTY)
    negative_label: str = setting(DEFAULT_CLASSES[0], "name of class 0: its data folder and results key", NON_EMPTY)
    # data
    train_data: str = setting("data/wainject/train.jsonl", "training manifest or class-folder tree", NON_EMPTY)
    val_data: str = setting("data/wainject/val.jsonl", "validation manifest or folder (picks the adapter)", NON_EMPTY)
    test_data: str | None = setting(None, "test manifest or folder, scored once at the end", NON_EMPTY)
    make_synthetic_data: bool = setting(False, "if --train_data is missing, write synthetic screenshots there (demo)")
    resize: str = setting("pad", "how pictures meet a fixed input shape", choices=["pad", "crop", "stretch"], **KEEP)
    skip_bad_images: bool = setting(False, "skip and count unreadable images and bad labels instead of stopping")
    allow_overlap: bool = setting(False, "go on when an image is in two of train/val/test (counted in results.json)")
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
    lr: float = setting(2e-4, "peak learning rate (AdamW: above 1 is a typo)", ABOVE_ZERO)
    weight_decay: float = setting(0.0, "AdamW weight decay on the LoRA weights", between(0, 10))
    warmup_ratio: float = setting(0.03, "share of the optimizer steps spent in linear warmup", FRACTION)
    min_lr_factor: float = setting(0.1, "the cosine ends at this fraction of --lr", FRACTION)
    max_grad_norm: float = setting(1.0, "gradient clipping norm", above(0))
    ema_decay: float = setting(0.0, "EMA of the LoRA weights, to evaluate and save (0: off)", BELOW_ONE)
    mixed_precision: str | None = setting(None, "None: what accelerate launch set", choices=["no", "bf16", "fp16"])
    nan_lr_backoff: float = setting(0.5, "first NaN/Inf update: fp32 from then on, base LR times this", ABOVE_ZERO)
    max_nonfinite_in_a_row: int = setting(5, "stop after this many non-finite updates in a row in fp32", at_least(1))
    # evaluation
    best_metric: str = setting("auroc", "validation metric that picks the adapter", choices=["auroc", "f1", "accuracy"])
    target_fpr: float = setting(0.05, "report the TPR at this false-positive rate", FRACTION)
    # run
    output_dir: str = setting("runs/llava", "where the adapter, checkpoints, metrics and results go", NON_EMPTY)
    overwrite: bool = setting(False, "replace the run in output_dir (once the new run has passed its checks)")
    seed: int = setting(42, "seed of the LoRA initialisation and the batch order", between(0, 2**32 - 1))
    log_every: int = setting(10, "log (and check for NaN) every this many optimizer steps", at_least(1))
    checkpoint_every: int = setting(0, "also checkpoint every this many steps (0: epoch ends only)", at_least(0))
    keep_checkpoints: int = setting(2, "how many recent checkpoints to keep", at_least(1))
    resume_from: str | None = setting(None, "'latest' or a checkpoint folder", NON_EMPTY)
    report_to: str = setting("none", "Accelerate tracker: none, tensorboard, wandb, ...", TRACKER)
    merge: bool = setting(False, "also save base + adapter merged into full weights in output_dir/merged")

    def __post_init__(self):  # every field in its domain, then the rules that tie fields together
        check_domains(self)
        for flag, name in (("--positive_label", self.positive_label), ("--negative_label", self.negative_label)):
            if not re.fullmatch(r"\w[\w.-]*", name) or name in ("tpr", "fpr"):  # a folder name and a results.json key
                raise UserError(f"{flag} {name!r} cannot name a data folder and a results.json key; use letters, "
                                f"digits, _, - and . (not first), and not tpr or fpr")
        if self.positive_label == self.negative_label:
            raise UserError(f"--positive_label and --negative_label are both {self.positive_label!r}; name two classes")
        if len(self.class_weights) not in (0, 2):
            raise UserError(f"--class_weights takes two numbers [No, Yes], got {self.class_weights}; e.g. 1,3")
        if not self.lora_target_modules and not self.lora_vision_modules:
            raise UserError("no LoRA targets: --lora_target_modules and --lora_vision_modules are both empty; name one")
        if self.yes_token == self.no_token:
            raise UserError(f"--yes_token and --no_token are both {self.yes_token!r}; give two different answer words")

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
    label: int  # 1 = --positive_label (e.g. a prompt injection), 0 = --negative_label, -1 = unknown (predict)
    subset: str
    pixel_hash: str | None = None  # from a manifest of tools/split_images.py: the leak check compares pixels too


def class_words(classes: tuple[str, str]) -> tuple[str, str]:
    """How messages name the classes 0 and 1: by their labels; the default ones by the task they were made for."""
    return ("benign", "prompt injection") if classes == DEFAULT_CLASSES else classes


def read_manifest(path: Path, skip_bad: bool, need_labels: bool, classes: tuple[str, str]):
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
                samples.append(Sample(image, int(label), str(record.get("subset", "")), record.get("pixel_hash")))
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
        problem = f"neither a {missing[0]} nor a {missing[1]} folder" if len(missing) == 2 else \
            f"no {missing[0]} folder"
        problem += f", only {', '.join(f'{name}/' for name in folders)}" if strays else ""
        fix = ", or name its class folders with --negative_label and --positive_label" if strays else \
            " or pass a JSONL manifest"
        raise UserError(f"{root} has {problem}; lay it out as {layout}{fix}")
    samples = []
    for folder, label in found or [(root, -1)]:
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                parts = path.relative_to(folder).parts
                samples.append(Sample(path, label, parts[0] if len(parts) > 1 else ""))
    return samples


def load_samples(spec: str, skip_bad: bool, need_labels: bool = True, classes: tuple[str, str] = DEFAULT_CLASSES):
    """The samples of a manifest or folder, every image's header checked; returns them and what was skipped."""
    path, folders = Path(spec), "{" + ",".join(classes) + "}/"
    if not path.exists():
        raise UserError(f"data path {path} does not exist; pass a JSONL manifest or a {folders} folder")
    samples, skipped = read_manifest(path, skip_bad, need_labels, classes) if path.is_file() else \
        (read_folder(path, need_labels, classes), [])
    problems = image_problems([sample.path for sample in samples])  # headers: a bad file is found before training
    bad = [(sample, problem) for sample, problem in zip(samples, problems) if problem]
    if bad and not skip_bad:
        raise UserError(f"cannot read image {bad[0][0].path} ({bad[0][1]}); fix or remove it, or pass "
                        f"--skip_bad_images")
    skipped += [f"{sample.path} ({problem})" for sample, problem in bad]
    readable = [sample for sample, problem in zip(samples, problems) if not problem]
    for entry in skipped:
        warn(f"skipping {entry}")
    if not readable:
        raise UserError(f"{path} holds no usable images; add lines like {{\"path\": \"page.png\", \"label\": 1}} "
                        f"or point it at a {folders} folder")
    return readable, skipped


def collate(items, processor, prompt: str, resize: str):
    """Runs in the DataLoader workers. A bad image becomes a blank placeholder with valid=0, reported in "bad", so the
    loop can stop with a clear message or skip it (every process still runs the same forward and backward)."""
    fixed = pretrained.fixed_input_size(processor.image_processor)
    fill = tuple(round(255 * m) for m in processor.image_processor.image_mean)
    images, valid, bad = [], [], []
    for _, sample in items:
        try:
            img = load_rgb(sample.path)
            # pad: LLaVA-1.5's expand-to-square, off-centre content is never cropped; a processor that keeps the aspect
            # ratio itself gets the picture as it is. stretch: to the fixed shape, or to a square of the longer side.
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
    labels, index = torch.tensor([max(s.label, 0) for _, s in items]), torch.tensor([i for i, _ in items])
    return {"inputs": dict(inputs), "labels": labels, "valid": torch.tensor(valid), "index": index, "bad": bad}


def make_loader(samples, processor, prompt: str, resize: str, batch_size: int, num_workers: int, seed=None):
    """Batches of (index, sample), decoded by `collate`; shuffled by `seed` (None: in order, to evaluate)."""
    return torch.utils.data.DataLoader(
        list(enumerate(samples)), batch_size=batch_size, shuffle=seed is not None, num_workers=num_workers,
        collate_fn=functools.partial(collate, processor=processor, prompt=prompt, resize=resize),
        generator=torch.Generator().manual_seed(seed) if seed is not None else None,
        persistent_workers=num_workers > 0)


def samples_of(loader) -> list[Sample]:
    return [sample for _, sample in loader.dataset]  # the dataset is (index, sample) pairs, prepared or not


# ----------------------------------------------------------------------------------------------
# Model: a vision-language model + processor from one checkpoint, LoRA in fp32, the Yes/No answer logits
# ----------------------------------------------------------------------------------------------

TESTED_FAMILIES = ("llava", "llava_next", "idefics3")  # config.json model types with tests here (docs/llava.md)


def load_base(model_id: str, processor, dtype: torch.dtype):
    """The frozen model, with the processor's image-token count matched to its vision tower."""
    from transformers import AutoModelForImageTextToText

    base = pretrained.load_pretrained(AutoModelForImageTextToText, model_id, dtype=dtype)
    pretrained.match_processor_to_model(processor, base)  # as many <image> tokens written as image features made
    return base


def lora_targets(cfg: Config) -> dict[str, tuple[str, list[str]]]:
    return {"--lora_target_modules": ("language model", cfg.lora_target_modules),
            "--lora_vision_modules": ("vision tower", cfg.lora_vision_modules)}


def lora_config(cfg: Config, model):
    """A regex over module names, so that the language model's q_proj is adapted but not the vision tower's
    namesake; in the vision tower, only the layers whose output reaches the language model. Where the parts sit
    comes from the model (`model_parts`: model.language_model in LLaVA, model.text_model in Idefics3, ...)."""
    from peft import LoraConfig

    parts = pretrained.model_parts(model)
    used = "|".join(map(str, pretrained.used_vision_layers(model.config)))
    within = {"language model": rf"{re.escape(parts['language model'])}\..*\.",
              "vision tower": rf"{re.escape(parts['vision layers'])}\.({used})\..*\."}
    patterns = [f"{within[part]}({'|'.join(names)})" for part, names in lora_targets(cfg).values() if names]
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="|".join(patterns))


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
        raise UserError(f"--no_token {no_word!r} and --yes_token {yes_word!r} are the same token; pass two words")
    return ids


def answer_logits(model, inputs: dict, answer_ids: list[int]) -> torch.Tensor:
    """(batch, 2) logits of [No, Yes] at the answer position, the last real token of each row. Only that position
    goes through the vocabulary projection (`logits_to_keep`). It is gathered from the attention mask, so it stays
    exact however many image tokens each picture became, and position ids count real tokens only (a model with image
    positions of its own, Qwen2-VL's, builds them from the mask), so left and right padding give the same answer."""
    mask = inputs["attention_mask"]
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
    own_positions = pretrained.builds_own_positions(model)
    positions = {} if own_positions else {"position_ids": (mask.long().cumsum(1) - 1).clamp_min(0)}
    out = model(**inputs, **positions, logits_to_keep=last[:, None], use_cache=False)
    return out.logits[:, 0, answer_ids]


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
class TrainState:
    """Everything the loop needs to continue after a restart, beyond model/optimizer/RNG (saved as a dataclass)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batches_done: int = 0  # micro-batches consumed in the current epoch
    best_score: float = -math.inf
    best_step: int = -1
    train_samples: int = 0  # over finished epochs, all processes: for the throughput in results.json
    train_seconds: float = 0.0
    best_weights: dict = field(default_factory=dict)  # LoRA weights (EMA if on) at the best validation


def train(cfg, accelerator, model, optimizer, loaders, answer_ids, ema, guard, state: TrainState, run: Run) -> bool:
    """Train for --epochs (or --max_steps), validating at each epoch's end; True if a signal stopped it (a
    checkpoint is saved). The best adapter on validation is kept in state.best_weights."""
    steps_per_epoch = math.ceil(len(loaders["train"]) / cfg.grad_accum_steps)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_ratio * total_steps)
    class_weights = torch.tensor(cfg.class_weights, device=accelerator.device) if cfg.class_weights else None
    checkpointed = {"train_state": state, "guard": guard} | ({"ema": ema} if ema else {})
    warn_if_short(total_steps, steps_per_epoch, cfg.max_steps, "the adapter is saved as initialised (LoRA B = 0: "
                  "the base model's answers)", "no validation picks a best adapter, and the last weights are saved")

    def current_lr():  # the update that makes step+1: never a zero LR on the first update
        schedule = warmup_cosine(state.step + 1, warmup_steps, total_steps, final_factor=cfg.min_lr_factor)
        return cfg.lr * guard.lr_scale * schedule

    set_lr(optimizer, current_lr())
    # The bar shows on the main process's terminal (disable=None: tqdm hides it when the output is not a terminal).
    bar = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_local_main_process or None)
    running, grad_norm = RunningMean(1, accelerator.device), torch.zeros(())  # the loss since the last log line
    done = preempted = False
    while not done and state.epoch < cfg.epochs and state.step < total_steps:  # a finished run resumes to the end
        epoch_start, samples = time.perf_counter(), 0
        loaders["train"].set_epoch(state.epoch)  # a different, reproducible shuffle every epoch
        batches = loaders["train"] if not state.batches_done else \
            accelerator.skip_first_batches(loaders["train"], state.batches_done)  # resumed mid-epoch
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
            if state.step % cfg.log_every == 0:
                (mean,) = running.pop_mean(accelerator)  # the only per-interval sync
                guard.poll(state.step)  # a NaN/Inf since the last log: fp32 from here on
                lr = optimizer.param_groups[0]["lr"]
                run.log.log({"train/loss": mean, "train/grad_norm": grad_norm.item(), "train/lr": lr}, state.step)
                bar.set_postfix(loss=f"{mean:.3f}", lr=f"{lr:.2e}")
            set_lr(optimizer, current_lr())
            preempted = run.preemption.should_stop(accelerator, at_sync_point=state.step % cfg.log_every == 0)
            done = preempted or state.step >= total_steps
            mid_epoch = state.batches_done < len(loaders["train"])  # at an epoch's end, its own checkpoint follows
            if mid_epoch and (done or cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0):
                save_checkpoint(accelerator, run.dir, state.step, checkpointed, cfg.keep_checkpoints, config=cfg)
            if done:
                break
        if done and state.batches_done < len(loaders["train"]):
            break  # stopped mid-epoch by --max_steps: no end-of-epoch evaluation

        # End of epoch: validate (with the EMA weights if on); the best adapter so far is kept.
        guard.poll(state.step)
        seconds = time.perf_counter() - epoch_start
        state.train_samples, state.train_seconds = state.train_samples + samples, state.train_seconds + seconds
        state.epoch, state.batches_done = state.epoch + 1, 0
        with ema.swapped_in() if ema else contextlib.nullcontext():
            val = evaluate(model, loaders["val"], accelerator, answer_ids, cfg, run.skipped)
            score = val[cfg.best_metric]  # None: one class left once unreadable images were skipped
            improved = score is not None and score > state.best_score
            if improved:
                state.best_score, state.best_step = score, state.step
                state.best_weights = gather_trainable(accelerator, model)  # whole: restorable on any processes
        if score is None:
            warn(f"validation at step {state.step}: {cfg.best_metric} is undefined on the {val['num_samples']} "
                 f"readable images (one class only); the best adapter is not updated")
        speed, lr, memory = samples / seconds, optimizer.param_groups[0]["lr"], \
            peak_memory_mb(accelerator.device)
        run.log.log({"epoch": state.epoch, **{f"val/{k}": val[k] for k in ("accuracy", "auroc", "f1", "precision",
                     "recall") if val[k] is not None}, "train/samples_per_second": speed, "peak_memory_mb": memory},
                    state.step)
        accelerator.print(f"epoch {state.epoch} | val {summary(val)} | best {cfg.best_metric} {state.best_score:.3f} @ "
                          f"step {state.best_step} | lr {lr:.2e} | {speed:.1f} samples/s | {memory:,.0f} MB")
        save_checkpoint(accelerator, run.dir, state.step, checkpointed, cfg.keep_checkpoints, best=improved, config=cfg)
    bar.close()
    return preempted


# ----------------------------------------------------------------------------------------------
# Evaluation: P(Yes) gathered from every process, then threshold and ranking metrics (common/classification.py)
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
    return {k: torch.cat([p[i] for p in parts]).cpu().numpy() for i, k in enumerate(("p_yes", "label", "valid",
                                                                                      "index"))}


def evaluate(model, loader, accelerator, answer_ids, cfg: Config, skipped: set) -> dict:
    scored = score_images(model, loader, accelerator, answer_ids, cfg.skip_bad_images, skipped)
    if not np.isfinite(scored["p_yes"]).all():  # weights that overflowed: no result is better than a meaningless one
        raise NonFiniteTrainingError("the model's answers are not finite (the LoRA weights diverged); lower --lr, "
                                     "then resume from a checkpoint before the divergence or start again")
    keep, samples = scored["valid"] > 0, samples_of(loader)  # placeholders of unreadable images do not count
    kept = scored["p_yes"][keep], scored["label"][keep], [samples[i].subset for i in scored["index"][keep]]
    return classification_metrics(*kept, cfg.target_fpr, cfg.classes) | {"scored": scored, "kept": kept}


def write_predictions(path: Path, samples: list[Sample], scored: dict) -> None:
    """JSONL, one {"path", "p_yes" (None: unreadable), "subset", "label"?} per image; written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        for i, p, valid in zip(scored["index"], scored["p_yes"], scored["valid"]):
            s = samples[i]
            record = {"path": str(s.path), "p_yes": float(p) if valid else None, "subset": s.subset}
            f.write(json.dumps(record | ({"label": s.label} if s.label >= 0 else {})) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# main: check every input, then train, restore the best adapter, save it, score val and test once
# ----------------------------------------------------------------------------------------------

RUN_OUTPUTS = ["config.yaml", "results.json", "metrics.jsonl", "val_predictions.jsonl", "roc_curve.png", "adapter",
               "merged", "checkpoints", "test_per_subset.csv", "llava_injection"]  # "llava_injection": tensorboard


def check_model(cfg: Config):
    """The checkpoint, its processor, the answer tokens and the LoRA targets, all checked before any weight loads.
    Returns the processor, [No id, Yes id] and the prompt."""
    model_config = pretrained.check_pretrained(cfg.model, tested=TESTED_FAMILIES)
    processor = pretrained.load_processor(cfg.model)
    answer_ids = answer_token_ids(processor.tokenizer, cfg.no_token, cfg.yes_token)
    skeleton = pretrained.empty_model(model_config)
    pretrained.check_lora_targets(skeleton, lora_config(cfg, skeleton), lora_targets(cfg), cfg.model)
    return processor, answer_ids, build_prompt(processor, cfg.question)


def save_and_score(cfg, accelerator, model, processor, loaders, answer_ids, state, guard, run, started, overlap):
    """The best adapter, chosen on validation, is saved first (a bad test image cannot cost the training), then the
    validation and test sets are scored once and the outputs written."""
    restore_trainable(accelerator, model, state.best_weights)  # the best on validation (none: the last weights)
    base_config, out = accelerator.unwrap_model(model).get_base_model().config, Path(cfg.output_dir)
    detector = {"question": cfg.question, "yes_token": cfg.yes_token, "no_token": cfg.no_token,
                "answer_ids": answer_ids, "resize": cfg.resize, "positive_label": cfg.positive_label,
                "negative_label": cfg.negative_label, "base_model": cfg.model,
                "base_identity": pretrained.base_identity(base_config)}  # what predict_llava.py needs
    adapter_dir = save_adapter(accelerator, model, processor, out / "adapter", detector)
    final = {}
    for split in [split for split in ("val", "test") if split in loaders]:  # the same order on every process
        try:
            final[split] = evaluate(model, loaders[split], accelerator, answer_ids, cfg, run.skipped)
        except UserError as err:
            raise UserError(f"{err} (the trained adapter is saved in {adapter_dir}; once fixed, --resume_from latest "
                            f"scores the {split} set without training again)") from None
    skipped = set().union(*gather_object([sorted(run.skipped)]))  # unreadable files seen by any process
    results = {f"{split}_{k}": v for split, m in final.items() for k, v in m.items() if k not in ("roc", "scored",
                                                                                                   "kept")}
    results |= {"best_step": state.best_step, "best_metric": cfg.best_metric, "skipped_bad_images": len(skipped),
                "images_in_two_splits": overlap[0], "copies_within_a_split": overlap[1],
                **run_facts(accelerator, state, guard, cfg.seed, started), **pretrained.weight_dtypes(model)}
    if accelerator.is_main_process:
        write_predictions(out / "val_predictions.jsonl", samples_of(loaders["val"]), final["val"]["scored"])
        write_json(out / "results.json", results)
        plot_roc(out / "roc_curve.png", {split: (*m["roc"], m["auroc"]) for split, m in final.items()}, cfg.classes)
        if cfg.merge:  # output_dir/merged: base + adapter as full weights
            base = load_base(cfg.model, processor, pretrained.base_dtype(cfg.model_dtype))
            save_merged(base, adapter_dir, pretrained.load_processor(str(adapter_dir)), out / "merged")
        if "test" in final:  # WAInjectBench's view: per subset, at 0.5 and at the validation threshold for the FPR
            print(benchmark_table(out / "test_per_subset.csv", final["val"], final["test"], cfg.target_fpr,
                                  cfg.classes))
        print(" | ".join(f"{split} {summary(m)}" for split, m in final.items()) +
              f" | {results['wall_seconds']:.0f} s | adapter in {adapter_dir}")
    return results


def main(argv=None):
    cfg = parse_config(Config, argv, __doc__.split("\n")[0], moved=MOVED)  # every setting checked against its domain
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    pretrained.quiet_progress_bars()  # transformers' bars: on a terminal only, like the loop's own
    started = time.perf_counter()
    accelerator = make_accelerator(cfg.mixed_precision, cfg.output_dir, cfg.grad_accum_steps, cfg.report_to)

    # Check everything that bad input can fail before the first write: the output folder, the checkpoint, the data
    # (every image's header), the model, tokenizer and LoRA targets (before the weights load). Until start_run()
    # nothing on disk changes; the demo's generators write only into new or empty folders.
    (resume_path,) = preflight(accelerator, cfg, [Path(cfg.output_dir)])
    prepare_demo_inputs(cfg, accelerator)
    data, skipped = {}, []
    for split, spec in (("train", cfg.train_data), ("val", cfg.val_data), ("test", cfg.test_data)):
        if spec is not None:
            data[split], bad = load_samples(spec, cfg.skip_bad_images, classes=cfg.classes)
            skipped += bad
    check_metric_defined({s.label for s in data["val"]}, cfg.best_metric, class_words(cfg.classes), "--val_data")
    overlap = check_overlap(data, cfg.allow_overlap)  # the same image (bytes or pixels) in two splits: refused
    accelerator.print(", ".join(f"{len(s)} {split} images ({sum(x.label == 0 for x in s)} {cfg.negative_label}, "
                                f"{sum(x.label == 1 for x in s)} {cfg.positive_label})" for split, s in data.items()))
    processor, answer_ids, prompt = check_model(cfg)

    set_seed(cfg.seed)  # here, after the demo's generators: the LoRA initialisation and batch order depend on it alone
    model = add_lora(cfg, load_base(cfg.model, processor, pretrained.base_dtype(cfg.model_dtype)))
    lora_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"{cfg.model} ({pretrained.base_dtype(cfg.model_dtype)}): {lora_parameters:,} LoRA parameters | "
                      f"answer ids {cfg.no_token}={answer_ids[0]}, {cfg.yes_token}={answer_ids[1]}")
    loaders = {split: make_loader(samples, processor, prompt, cfg.resize, cfg.batch_size if split == "train" else
                                  cfg.eval_batch_size, cfg.num_workers, cfg.seed if split == "train" else None)
               for split, samples in data.items()}
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
        checkpointed = {"train_state": state, "guard": guard} | ({"ema": ema} if ema else {})
        load_checkpoint(accelerator, resume_path, checkpointed, config=cfg)
    start_run(accelerator, cfg, RUN_OUTPUTS, fresh=resume_path is None, project="llava_injection")
    # SIGTERM/SIGINT: during training, finish the step, checkpoint and exit 75; after it, finish the final
    # phase (save, score, write) and exit 0. A second signal stops at once.
    run = Run(Path(cfg.output_dir), MetricsLog(accelerator, Path(cfg.output_dir), step_offset=state.step
                                               if resume_path else None), Preemption().install(), set(skipped))
    if train(cfg, accelerator, model, optimizer, loaders, answer_ids, ema, guard, state, run):
        exit_preempted(accelerator, state.step)
    if not state.best_weights and ema:
        ema.copy_to()  # no validation ran (e.g. a tiny --max_steps): use the current EMA weights
    results = save_and_score(cfg, accelerator, model, processor, loaders, answer_ids, state, guard, run, started,
                             overlap)
    finish(accelerator, run.preemption)
    return results


if __name__ == "__main__":
    exit_on_user_error(main)
