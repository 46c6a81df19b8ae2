"""A user's Hugging Face checkpoint, checked before its weights load: a clear line, not minutes of loading first.

What a wrong `--model` can break is checked from small files: the folder is a checkpoint (config.json),
its model type is one the script handles, every safetensors file is whole (its header covers the
file), the processor has a tokenizer, an image processor and a chat template, and the LoRA target
modules exist (tried with peft on an empty copy of the model: meta tensors, no memory, no weights).
Whatever breaks while reading a user's checkpoint is reported as a problem with that checkpoint.
"""

from pathlib import Path

import torch

from common.errors import UserError, first_line


def check_pretrained(model_id: str, model_types: tuple[str, ...]):
    """The checkpoint's config, once its folder, model type and weight files have passed. Reads no weights."""
    from safetensors import safe_open
    from transformers import AutoConfig

    path = Path(model_id)
    looks_like_a_path = model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1 or "\\" in model_id
    if looks_like_a_path and not path.exists():  # a hub id is "name" or "org/name"
        raise UserError(f"--model {model_id} does not exist; pass a checkpoint folder or a hub id (org/name)")
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"--model {path} is not a model folder (it has no config.json); pass a checkpoint folder "
                            f"or hub id")
        for weights in sorted(path.glob("*.safetensors")):
            try:
                with safe_open(weights, "pt"):  # reads the header and checks that the file covers it
                    pass
            except Exception as err:
                raise UserError(f"weights file {weights} is damaged ({first_line(err)}); copy or download the "
                                f"checkpoint again") from None
    try:
        config = AutoConfig.from_pretrained(model_id)
    except Exception as err:
        raise UserError(f"cannot read a model config from {model_id!r} ({first_line(err)}); pass a checkpoint "
                        f"folder or hub id") from None
    if config.model_type not in model_types:
        raise UserError(f"--model {model_id} is a {config.model_type!r} model; this script trains "
                        f"{', '.join(model_types)} checkpoints")
    return config


def load_processor(source: str):
    """Tokenizer, image processor and chat template, checked; left padding, so every prompt ends in the last column."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(source)
    except Exception as err:
        raise UserError(f"cannot load a processor from {source!r} ({first_line(err)}); pass a vision-language "
                        f"checkpoint folder or hub id") from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise UserError(f"{source} has no image processor and tokenizer; pass a vision-language checkpoint")
    if getattr(processor, "chat_template", None) is None:
        raise UserError(f"the processor of {source} has no chat template; use a checkpoint with one")
    processor.tokenizer.padding_side = "left"
    return processor


def check_lora_targets(model_class, config, lora_config, targets: dict[str, tuple[str, list[str]]], model_id: str):
    """Each name in `targets` ({flag: (part of the model, module names)}) is a linear layer of that part, and
    peft accepts `lora_config`: both tried on an empty copy of the model."""
    from accelerate import init_empty_weights
    from peft import get_peft_model

    with init_empty_weights():
        skeleton = model_class(config)
    linear = [name for name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear)]
    for flag, (part, names) in targets.items():
        known = sorted({name.rsplit(".", 1)[-1] for name in linear if f".{part}." in name})
        for wanted in names:
            if wanted not in known:
                raise UserError(f"{flag} names {wanted!r}, which is not a linear layer of the {part} of {model_id}; "
                                f"its linear layers are {', '.join(known)}")
    try:
        get_peft_model(skeleton, lora_config)
    except ValueError as err:
        raise UserError(f"LoRA cannot adapt {model_id} this way ({first_line(err)}); check "
                        f"{' and '.join(targets)}") from None


def load_pretrained(model_class, model_id: str, **kwargs):
    """`model_class.from_pretrained`, with a failure (a file cut short, out of memory) as one clear line."""
    try:
        return model_class.from_pretrained(model_id, **kwargs)
    except Exception as err:
        raise UserError(f"cannot load the weights of {model_id!r} ({type(err).__name__}: {first_line(err)}); "
                        f"copy or download the checkpoint again") from None
