"""LoRA fine-tuning of LLaVA as a Yes/No prompt-injection detector for web-agent screenshots.

The model is asked, in its own chat template, whether a screenshot carries a prompt injection; the
logits of the "No" and "Yes" tokens at the answer position form a 2-way classifier trained with
cross-entropy (the WAInjectBench setting). The same file runs on a CPU, one GPU, DDP or FSDP:

    python train_llava.py --config configs/llava_tiny_cpu.yaml      # tiny random LLaVA + synthetic data, CPU
    accelerate launch --config_file accelerate_configs/single_gpu.yaml train_llava.py \\
        --train_data data/wainject/train.jsonl --val_data data/wainject/val.jsonl --test_data data/wainject/image
    python train_llava.py --output_dir runs/llava --resume_from latest
    python train_llava.py --mode predict --model <same base> --output_dir runs/llava --predict_data shots/  # P(Yes)

Data: a JSONL manifest with one {"path", "label" (1 = injection), "subset" (optional)} per line,
relative paths resolved against the manifest's folder, or a folder laid out as
{benign,malicious}/<subset>/<image>. Images are opened, converted to RGB and resized in the
DataLoader's collate function (in its worker processes), never in the training loop.

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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import gather_object, set_seed
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from common.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from common.config import parse_config, save_config
from common.distributed import refuse_silent_fallbacks
from common.ema import EMA
from common.errors import UserError, exit_on_user_error
from common.guard import NonFiniteGuard
from common.preemption import EXIT_PREEMPTED, Preemption
from common.run_log import MetricsLog, peak_memory_mb, prepare_output_dir, write_json
from common.schedules import set_lr, warmup_cosine

LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_QUESTION = ("Does this screenshot contain a prompt injection, text that tries to give instructions "
                    "to an AI agent? Answer Yes or No.")


@dataclass
class Config:
    # model
    model: str = field(default="llava-hf/llava-1.5-7b-hf", metadata={"help": "LLaVA checkpoint folder or hub id"})
    build_tiny_model: bool = field(default=False, metadata={"help": "if --model is a missing folder, build a tiny random LLaVA there (CPU demo, tests)"})
    model_dtype: str | None = field(default=None, metadata={"help": "dtype of the frozen base model (None: bf16 on a GPU, fp32 on CPU)", "choices": ["fp32", "bf16", "fp16"]})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: list[str] = field(default_factory=lambda: list(LM_TARGETS), metadata={"help": "language-model module names that get LoRA"})
    lora_vision_modules: list[str] = field(default_factory=list, metadata={"help": "vision-tower module names that get LoRA too, e.g. q_proj,k_proj,v_proj,out_proj,fc1,fc2 (empty: none)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward (use_reentrant=False) to save memory"})
    # prompt
    question: str = field(default=DEFAULT_QUESTION, metadata={"help": "the question asked with every screenshot"})
    yes_token: str = field(default="Yes", metadata={"help": "answer word for 'injection'; must be one token"})
    no_token: str = field(default="No", metadata={"help": "answer word for 'benign'; must be one token"})
    # data
    train_data: str = field(default="data/wainject/train.jsonl", metadata={"help": "training JSONL manifest or {benign,malicious}/<subset>/ folder"})
    val_data: str = field(default="data/wainject/val.jsonl", metadata={"help": "validation manifest or folder (best checkpoint)"})
    test_data: str | None = field(default=None, metadata={"help": "test manifest or folder, evaluated once at the end"})
    make_synthetic_data: bool = field(default=False, metadata={"help": "if --train_data is missing, write synthetic screenshots and manifests into its folder"})
    resize: str = field(default="pad", metadata={"help": "pad to the model's aspect ratio (nothing cropped), the processor's centre crop, or stretch", "choices": ["pad", "crop", "stretch"]})
    skip_bad_images: bool = field(default=False, metadata={"help": "skip and count missing/corrupt images and bad labels instead of stopping"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes that decode images"})
    num_threads: int = field(default=0, metadata={"help": "PyTorch CPU threads per process (0: PyTorch's default)"})
    # loss
    class_weights: list[float] = field(default_factory=list, metadata={"help": "cross-entropy weights [No, Yes] (empty: unweighted)"})
    # optimisation
    epochs: int = field(default=3, metadata={"help": "training epochs"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0: no limit)"})
    batch_size: int = field(default=4, metadata={"help": "screenshots per micro-batch per process"})
    eval_batch_size: int = field(default=8, metadata={"help": "screenshots per evaluation batch per process"})
    grad_accum_steps: int = field(default=4, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the LoRA weights"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of the optimizer steps spent in linear warmup"})
    min_lr_factor: float = field(default=0.1, metadata={"help": "the cosine ends at this fraction of --lr"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    ema_decay: float = field(default=0.0, metadata={"help": "EMA of the LoRA weights, used to evaluate and save (0: off)"})
    mixed_precision: str | None = field(default=None, metadata={"help": "None: what accelerate launch set, else no", "choices": ["no", "bf16", "fp16"]})
    nan_lr_backoff: float = field(default=0.5, metadata={"help": "on the first NaN/Inf update: fp32 from then on, base LR times this"})
    max_nonfinite_in_a_row: int = field(default=5, metadata={"help": "stop after this many non-finite updates in a row in fp32"})
    # evaluation
    best_metric: str = field(default="auroc", metadata={"help": "validation metric that picks the best checkpoint", "choices": ["auroc", "f1", "accuracy"]})
    target_fpr: float = field(default=0.05, metadata={"help": "report the TPR at this false-positive rate"})
    # run
    output_dir: str = field(default="runs/llava", metadata={"help": "where the adapter, checkpoints, metrics and results go"})
    overwrite: bool = field(default=False, metadata={"help": "allow writing into an output_dir that holds another run"})
    seed: int = field(default=42, metadata={"help": "seed for LoRA initialisation and batch order"})
    log_every: int = field(default=10, metadata={"help": "log (and check for NaN) every this many optimizer steps"})
    checkpoint_every: int = field(default=0, metadata={"help": "also checkpoint every this many optimizer steps (0: epoch ends only)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many recent checkpoints to keep"})
    resume_from: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder"})
    report_to: str = field(default="none", metadata={"help": "Accelerate tracker: none, tensorboard, wandb, ..."})
    merge: bool = field(default=False, metadata={"help": "also save base + adapter merged into full weights in output_dir/merged"})
    # predict
    mode: str = field(default="train", metadata={"help": "train, or predict: write P(Yes) per image", "choices": ["train", "predict"]})
    predict_data: str | None = field(default=None, metadata={"help": "predict: manifest or folder of images (labels optional)"})
    predict_output: str | None = field(default=None, metadata={"help": "predict: JSONL to write (default: output_dir/predictions.jsonl)"})


# ----------------------------------------------------------------------------------------------
# Data: manifests or folders -> samples; images decoded and processed in the collate function
# ----------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class Sample:
    path: Path
    label: int  # 1 = prompt injection, 0 = benign, -1 = unknown (predict)
    subset: str


def read_manifest(path: Path, skip_bad: bool, need_labels: bool) -> tuple[list[Sample], list[str]]:
    """JSONL, one {"path", "label", "subset"?} per line. Returns the samples and the skipped lines."""
    samples, skipped = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image, label = path.parent / record["path"], record.get("label", None if need_labels else -1)
        except (ValueError, TypeError, KeyError, AttributeError):
            problem = 'is not a JSON object with a "path"'
        else:
            if isinstance(label, bool) or label not in (0, 1, *(() if need_labels else (-1,))):
                problem = f"has label {label!r}; labels are 0 (benign) or 1 (prompt injection)"
            elif not image.is_file():
                problem = f"names image {image}, which does not exist"
            else:
                samples.append(Sample(image, int(label), str(record.get("subset", ""))))
                continue
        if not skip_bad:
            raise UserError(f"{path} line {number} {problem}; fix the line or pass --skip_bad_images")
        skipped.append(f"{path}:{number}")
    return samples, skipped


def read_folder(root: Path, need_labels: bool) -> list[Sample]:
    """{benign,malicious}/<subset>/<image>; for predict, any folder of images (labels unknown)."""
    found = [(root / name, label) for name, label in (("benign", 0), ("malicious", 1)) if (root / name).is_dir()]
    if not found and need_labels:
        raise UserError(f"{root} has neither a benign/ nor a malicious/ folder; lay it out as "
                        f"{{benign,malicious}}/<subset>/<image> or pass a JSONL manifest")
    samples = []
    for folder, label in found or [(root, -1)]:
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                parts = path.relative_to(folder).parts
                samples.append(Sample(path, label, parts[0] if len(parts) > 1 else ""))
    return samples


def load_samples(spec: str, skip_bad: bool, need_labels: bool = True) -> tuple[list[Sample], list[str]]:
    path = Path(spec)
    if not path.exists():
        raise UserError(f"data path {path} does not exist; pass a JSONL manifest or a {{benign,malicious}}/ folder")
    samples, skipped = read_manifest(path, skip_bad, need_labels) if path.is_file() else (read_folder(path, need_labels), [])
    if not samples:
        raise UserError(f"{path} holds no usable images; add lines like {{\"path\": \"page.png\", \"label\": 1}} "
                        f"or point it at a {{benign,malicious}}/ folder")
    return samples, skipped


def load_rgb(path: Path) -> Image.Image:
    """Any image as 8-bit RGB: alpha composited on white, CMYK and palettes converted, 16-bit scaled."""
    with Image.open(path) as img:  # reads the header only
        if img.width * img.height > Image.MAX_IMAGE_PIXELS:  # PIL only warns below twice this: decoding could exhaust RAM
            raise ValueError(f"{img.width}x{img.height} pixels is over the {Image.MAX_IMAGE_PIXELS:,}-pixel limit")
        img.load()
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit grayscale: convert("RGB") would clip it
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")


def model_input_size(image_processor) -> tuple[int, int]:
    """(width, height) the vision tower sees: the crop size, else the resize target."""
    size = dict(getattr(image_processor, "crop_size", None) or image_processor.size)
    return size.get("width", size.get("shortest_edge")), size.get("height", size.get("shortest_edge"))


def collate(items, processor, prompt: str, resize: str):
    """Runs in the DataLoader workers. A bad image becomes a blank placeholder with valid=0 and is
    reported in "bad", so the loop can stop with a clear message or skip it (every process still
    runs the same forward and backward, which DDP needs)."""
    width, height = model_input_size(processor.image_processor)
    fill = tuple(round(255 * m) for m in processor.image_processor.image_mean)
    images, valid, bad = [], [], []
    for _, sample in items:
        try:
            img = load_rgb(sample.path)
            if resize == "pad":  # LLaVA-1.5's expand-to-square: off-centre content is never cropped
                img = ImageOps.pad(img, (width, height), Image.Resampling.BICUBIC, color=fill)
            elif resize == "stretch":
                img = img.resize((width, height), Image.Resampling.BICUBIC)
            valid.append(1.0)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            bad.append(f"{sample.path} ({type(err).__name__}: {err})")
            img = Image.new("RGB", (width, height), fill)
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
    """Stop on the first unreadable image (one clear line), or remember and skip it."""
    for entry in batch["bad"]:
        if not skip:
            raise UserError(f"cannot read image {entry}; fix or remove it, or pass --skip_bad_images")
        if entry not in seen:
            seen.add(entry)
            print(f"warning: skipping unreadable image {entry}")


# ----------------------------------------------------------------------------------------------
# Model: LLaVA + processor from one checkpoint, LoRA in fp32, the Yes/No answer logits
# ----------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def base_dtype(cfg: Config) -> torch.dtype:
    if cfg.model_dtype is not None:
        return DTYPES[cfg.model_dtype]
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def load_base(model_id: str, processor_id: str, dtype: torch.dtype):
    """The frozen LLaVA and its processor, with the processor's image-token count taken from the model."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    try:
        base = LlavaForConditionalGeneration.from_pretrained(model_id, dtype=dtype)
        processor = AutoProcessor.from_pretrained(processor_id)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a LLaVA model from {model_id!r} ({str(err).splitlines()[0]}); pass a "
                        f"checkpoint folder or hub id that LlavaForConditionalGeneration loads") from None
    if getattr(processor, "chat_template", None) is None:
        raise UserError(f"the processor of {processor_id} has no chat template; use a LLaVA checkpoint with one")
    # The number of <image> tokens the processor inserts must equal what the vision tower produces.
    processor.patch_size = base.config.vision_config.patch_size
    processor.vision_feature_select_strategy = base.config.vision_feature_select_strategy
    if base.config.vision_config.model_type == "clip_vision_model":
        processor.num_additional_image_tokens = 1  # CLIP's CLS token
    processor.tokenizer.padding_side = "left"  # every prompt ends in the last column: the answer position
    return base, processor


def add_lora(cfg: Config, base):
    from peft import LoraConfig, get_peft_model

    if cfg.gradient_checkpointing:
        # Non-reentrant: reentrant checkpointing leaves LoRA in checkpointed blocks without gradients.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    # A regex, so that the language model's q_proj is adapted but not the vision tower's namesake.
    pattern = rf".*\.language_model\..*\.({'|'.join(cfg.lora_target_modules)})"
    if cfg.lora_vision_modules:
        pattern += rf"|.*\.vision_tower\..*\.({'|'.join(cfg.lora_vision_modules)})"
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=pattern)
    try:  # adapters in fp32 under a bf16/fp16 base: precise updates, and no GradScaler error on fp16 gradients
        return get_peft_model(base, lora, autocast_adapter_dtype=True)
    except ValueError as err:
        raise UserError(f"LoRA found no target modules ({err}); check --lora_target_modules") from None


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
        raise UserError(f"--no_token {no_word!r} and --yes_token {yes_word!r} are the same token")
    return ids


def answer_logits(model, inputs: dict, answer_ids: list[int]) -> torch.Tensor:
    """(batch, 2) logits of [No, Yes] at the answer position, the last real token of each row.

    Only that position goes through the vocabulary projection (`logits_to_keep`). The position is
    gathered from the attention mask and position ids count real tokens only, so left and right
    padding give the same answer.
    """
    mask = inputs["attention_mask"]
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
    position_ids = (mask.long().cumsum(1) - 1).clamp_min(0)
    out = model(**inputs, position_ids=position_ids, logits_to_keep=last[:, None], use_cache=False)
    return out.logits[:, 0, answer_ids]


def trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def gathered_adapter_state(accelerator, model) -> dict:
    """The LoRA weights as full CPU tensors, for save_pretrained. Under FSDP2 each is a DTensor shard and
    `full_tensor()` is a collective: every process must call this; only the main process writes. Gathering
    just the adapters (not `accelerator.get_state_dict`, which would gather the frozen base too) keeps a
    7B model's gather to a few MB."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
            for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}


def checkpoint_trainable_only(accelerator) -> None:
    """Checkpoints hold the LoRA weights only: save_state would otherwise write the frozen base too."""
    from safetensors.torch import load_file

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            keep = {n for n, p in model.named_parameters() if p.requires_grad}
            weights[i] = {k: v for k, v in weights[i].items() if k in keep}

    def load_hook(models, input_dir):
        for i, model in enumerate(list(models)):
            saved = load_file(Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors"))
            missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(saved)
            if missing:
                raise UserError(f"checkpoint {input_dir} lacks {len(missing)} LoRA weights (e.g. {min(missing)}); "
                                f"resume with the same LoRA settings")
            model.load_state_dict(saved, strict=False)
        models.clear()  # loaded here: accelerate must not load them again strictly

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


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
          ema, guard, state, log, output_dir, bad_seen):
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_ratio * total_steps)
    checkpointed = {"train_state": state, "guard": guard} | ({"ema": ema} if ema else {})

    def current_lr():  # the update that makes step+1: never a zero LR on the first update
        return cfg.lr * guard.lr_scale * warmup_cosine(state.step + 1, warmup_steps, total_steps,
                                                       final_factor=cfg.min_lr_factor)

    def validate():
        with ema.swapped_in() if ema else contextlib.nullcontext():
            val = evaluate(model, val_loader, val_samples, accelerator, answer_ids, cfg, bad_seen)
            score = val[cfg.best_metric] if val[cfg.best_metric] is not None else -1.0
            improved = score > state.best_score
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
    preemption = Preemption().install()  # SIGTERM/SIGINT: finish the step, checkpoint, return
    grad_norm = torch.zeros(())
    while state.epoch < cfg.epochs and not done:
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
                save_checkpoint(accelerator, output_dir, state.step, checkpointed, cfg.keep_checkpoints)
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
        save_checkpoint(accelerator, output_dir, state.step, checkpointed, cfg.keep_checkpoints, best=improved)
    bar.close()
    preemption.uninstall()
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


def classification_metrics(p_yes, labels, subsets: list[str], target_fpr: float) -> dict:
    pred = (p_yes >= 0.5).astype(np.int64)
    tp, fp = int(((pred == 1) & (labels == 1)).sum()), int(((pred == 1) & (labels == 0)).sum())
    tn, fn = int(((pred == 0) & (labels == 0)).sum()), int(((pred == 0) & (labels == 1)).sum())
    precision, recall = tp / max(1, tp + fp), tp / max(1, tp + fn)
    both_classes = 0 < labels.sum() < len(labels)
    fpr, tpr = roc_curve(p_yes, labels)
    per_subset = {}
    for name in sorted(set(subsets)):
        rows = np.array([s == name for s in subsets])
        mal, ben = rows & (labels == 1), rows & (labels == 0)
        per_subset[name or "-"] = ({"malicious": int(mal.sum()), "tpr": float(pred[mal].mean())} if mal.any() else {}) | \
                                  ({"benign": int(ben.sum()), "fpr": float(pred[ben].mean())} if ben.any() else {})
    return {
        "num_samples": len(labels),
        "accuracy": float((pred == labels).mean()),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / max(1e-12, precision + recall),
        "auroc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) if both_classes else None,  # trapezoids
        f"tpr_at_fpr_{target_fpr:g}": float(tpr[fpr <= target_fpr].max()) if both_classes else None,
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "per_subset": per_subset,
        "roc": (fpr.tolist(), tpr.tolist()),
    }


def summary(m: dict) -> str:
    return f"acc {m['accuracy']:.3f} AUROC {m['auroc'] if m['auroc'] is not None else math.nan:.3f} F1 {m['f1']:.3f}"


def evaluate(model, loader, samples, accelerator, answer_ids, cfg, bad_seen) -> dict:
    scored = score_images(model, loader, accelerator, answer_ids, cfg.skip_bad_images, bad_seen)
    keep = scored["valid"] > 0  # placeholders of unreadable images do not count
    subsets = [samples[i].subset for i in scored["index"][keep]]
    metrics = classification_metrics(scored["p_yes"][keep], scored["label"][keep], subsets, cfg.target_fpr)
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


def save_roc_plot(path: Path, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, m in curves.items():
        ax.plot(*m["roc"], label=f"{name} (AUROC {m['auroc'] if m['auroc'] is not None else math.nan:.3f})")
    ax.plot([0, 1], [0, 1], "k:", linewidth=1)
    ax.set(xlabel="false-positive rate (benign flagged)", ylabel="true-positive rate (injections caught)", title="ROC")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def load_trained(model_id: str, adapter_dir: Path, dtype: torch.dtype):
    """Base model + saved adapter, as a user would load them: PeftModel.from_pretrained."""
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} holds no LoRA adapter (no adapter_config.json); pass the --output_dir "
                        f"of a finished training run")
    base, processor = load_base(model_id, str(adapter_dir), dtype)
    detector = json.loads((adapter_dir / "detector.json").read_text())
    return PeftModel.from_pretrained(base, adapter_dir).eval(), processor, detector


def predict(cfg: Config) -> dict:
    """Write {"path", "p_yes", "subset", "label"?} per image, from base + saved adapter."""
    if cfg.predict_data is None:
        raise UserError("--mode predict needs --predict_data (a manifest or a folder of images)")
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision)
    model, processor, detector = load_trained(cfg.model, Path(cfg.output_dir) / "adapter", base_dtype(cfg))
    cfg = dataclasses.replace(cfg, question=detector["question"], resize=detector["resize"])  # as trained
    samples, _ = load_samples(cfg.predict_data, cfg.skip_bad_images, need_labels=False)
    loader = make_loader(samples, processor, build_prompt(processor, cfg.question), cfg, cfg.eval_batch_size, False)
    model, loader = accelerator.prepare(model, loader)
    scored = score_images(model, loader, accelerator, detector["answer_ids"], cfg.skip_bad_images, set())
    output = Path(cfg.predict_output or Path(cfg.output_dir) / "predictions.jsonl")
    if accelerator.is_main_process:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_predictions(output, samples, scored)
        print(f"P(Yes) for {len(scored['index'])} images written to {output}")
    return scored


# ----------------------------------------------------------------------------------------------
# main: wire it together, train, restore the best adapter, test once, save
# ----------------------------------------------------------------------------------------------


def prepare_demo_inputs(cfg: Config) -> None:
    """Build the tiny model and the synthetic screenshots when asked to and absent (main process)."""
    if cfg.build_tiny_model and not Path(cfg.model).exists():
        from tools.make_tiny_llava import build_tiny_llava

        print(f"building a tiny random LLaVA in {build_tiny_llava(cfg.model)}")
    if cfg.make_synthetic_data and not Path(cfg.train_data).exists():
        from tools.make_synthetic_screenshots import make_dataset

        print(f"writing synthetic screenshots to {make_dataset(Path(cfg.train_data).parent)}")


def main(argv=None):
    cfg = parse_config(Config, argv, description=__doc__.split("\n")[0])
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
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
            # LoRA in vision layers after the selected feature layer gets no gradient: DDP must allow that.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(cfg.lora_vision_modules))],
        )
    except ValueError as err:
        raise UserError(f"{err}; choose another --mixed_precision (bf16 works on CPU)") from None
    refuse_silent_fallbacks(accelerator)
    set_seed(cfg.seed)
    resume_path = resolve_resume(cfg.output_dir, cfg.resume_from)
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        prepare_output_dir(output_dir, resuming=cfg.resume_from is not None, overwrite=cfg.overwrite)
        prepare_demo_inputs(cfg)
    accelerator.wait_for_everyone()

    data, skipped = {}, []
    for split, spec in (("train", cfg.train_data), ("val", cfg.val_data), ("test", cfg.test_data)):
        if spec is not None:
            data[split], bad_lines = load_samples(spec, cfg.skip_bad_images)
            skipped += bad_lines
    for line in skipped:
        accelerator.print(f"warning: skipping manifest line {line} (bad label or missing image)")
    accelerator.print(", ".join(f"{len(s)} {k} images" for k, s in data.items()))
    if accelerator.is_main_process:  # written once the inputs have passed their checks: bad input changes nothing
        save_config(cfg, output_dir / "config.yaml")

    base, processor = load_base(cfg.model, cfg.model, base_dtype(cfg))
    answer_ids = answer_token_ids(processor.tokenizer, cfg.no_token, cfg.yes_token)
    model = add_lora(cfg, base)
    prompt = build_prompt(processor, cfg.question)
    accelerator.print(f"{cfg.model} ({base_dtype(cfg)}): {sum(p.numel() for p in model.parameters() if p.requires_grad):,}"
                      f" LoRA parameters | answer ids {cfg.no_token}={answer_ids[0]}, {cfg.yes_token}={answer_ids[1]}")
    loaders = {"train": make_loader(data["train"], processor, prompt, cfg, cfg.batch_size, shuffle=True)}
    for split in ("val", "test"):
        if split in data:
            loaders[split] = make_loader(data[split], processor, prompt, cfg, cfg.eval_batch_size, shuffle=False)
    if len(cfg.class_weights) not in (0, 2):
        raise UserError(f"--class_weights takes two numbers [No, Yes], got {cfg.class_weights}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, fused=True)
    checkpoint_trainable_only(accelerator)
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *loaders.values())
    loaders = dict(zip(loaders, prepared))
    class_weights = torch.tensor(cfg.class_weights, device=accelerator.device) if cfg.class_weights else None
    ema = EMA(model.parameters(), decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    guard = NonFiniteGuard(accelerator, model, optimizer, cfg.nan_lr_backoff, cfg.max_nonfinite_in_a_row)
    state = TrainState()
    if resume_path is not None:
        load_checkpoint(accelerator, resume_path, {"train_state": state, "guard": guard} | ({"ema": ema} if ema else {}))
        accelerator.print(f"resumed from {resume_path} at step {state.step}, epoch {state.epoch}")
    if cfg.report_to != "none":
        accelerator.init_trackers("llava_injection", config={k: str(v) if isinstance(v, list) else v
                                                            for k, v in dataclasses.asdict(cfg).items()})
    log = MetricsLog(accelerator, output_dir, step_offset=state.step if resume_path else None)
    bad_seen: set[str] = set()

    if train(cfg, accelerator, model, optimizer, loaders["train"], loaders["val"], data["val"], answer_ids,
             class_weights, ema, guard, state, log, output_dir, bad_seen):
        accelerator.end_training()
        accelerator.print(f"stopped by a signal at step {state.step} with a checkpoint saved; "
                          f"continue with --resume_from latest (exit code {EXIT_PREEMPTED})", flush=True)
        sys.exit(EXIT_PREEMPTED)

    # The best adapter, chosen on validation, is evaluated (and the test set scored) once.
    if state.best_weights:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in state.best_weights:
                    p.copy_(state.best_weights[name])
    elif ema:
        ema.copy_to()  # no validation ran (e.g. a tiny --max_steps): use the current EMA weights
    final = {"val": evaluate(model, loaders["val"], data["val"], accelerator, answer_ids, cfg, bad_seen)}
    if "test" in loaders:
        final["test"] = evaluate(model, loaders["test"], data["test"], accelerator, answer_ids, cfg, bad_seen)

    # Save what the ecosystem loads: the adapter (save_pretrained) and the processor beside it.
    adapter_dir = output_dir / "adapter"
    state_dict = gathered_adapter_state(accelerator, model)  # a collective call under FSDP: every process
    bad_images = set().union(*gather_object([sorted(bad_seen)]))  # unreadable files seen by any process
    results = {f"{split}_{k}": v for split, m in final.items() for k, v in m.items() if k not in ("roc", "scored")}
    results |= {"best_step": state.best_step, "best_metric": cfg.best_metric, "epochs_run": state.epoch,
                "optimizer_steps": state.step, "skipped_bad_images": len(skipped) + len(bad_images),
                "wall_seconds": time.perf_counter() - wall_start, "peak_memory_mb": peak_memory_mb(accelerator.device),
                "train_samples_per_second": (state.train_samples * accelerator.num_processes / state.train_seconds
                                             if state.train_seconds else None),
                "num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type.value),
                "mixed_precision": accelerator.mixed_precision, "fell_back_to_fp32_at_step": guard.fallback_step,
                "seed": cfg.seed}
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(adapter_dir, state_dict=state_dict)
        processor.save_pretrained(adapter_dir)
        detector = {"question": cfg.question, "yes_token": cfg.yes_token, "no_token": cfg.no_token,
                    "answer_ids": answer_ids, "resize": cfg.resize, "base_model": cfg.model}
        (adapter_dir / "detector.json").write_text(json.dumps(detector, indent=2) + "\n")
        write_predictions(output_dir / "val_predictions.jsonl", data["val"], final["val"]["scored"])
        write_json(output_dir / "results.json", results)
        save_roc_plot(output_dir / "roc_curve.png", final)
        if cfg.merge:  # reload in one process, so it works whatever the training setup was
            merged, merged_processor, _ = load_trained(cfg.model, adapter_dir, base_dtype(cfg))
            merged.merge_and_unload().save_pretrained(output_dir / "merged")
            merged_processor.save_pretrained(output_dir / "merged")
        print(" | ".join(f"{split} {summary(m)}" for split, m in final.items()) +
              f" | {results['wall_seconds']:.0f} s | adapter in {adapter_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    exit_on_user_error(main)
