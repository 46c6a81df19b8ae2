"""A user's image-text-to-text checkpoint, for train_llava.py and predict_llava.py: checked before its weights load,
and what differs between vision-language families read from the model, never from a list of names.

What a wrong `--model` can break is checked from small files: the folder is a checkpoint (config.json),
`AutoModelForImageTextToText` loads its model type and it is decoder-only, every safetensors file is whole
(its header covers the file), the processor has a tokenizer, an image processor and a chat template, and the
LoRA targets exist (tried with peft on an empty copy of the model: meta tensors, no memory, no weights).
Between families (LLaVA-1.5, LLaVA-NeXT, Idefics3, ...): where the language model and the vision tower sit
(`model_parts`, transformers' own `get_decoder` / `get_encoder`), how many image tokens the processor writes
(`match_processor_to_model`), the picture size it works at (`fixed_input_size`) and the vision layers that
feed the language model (`used_vision_layers`).
"""

import sys
import weakref
from pathlib import Path

import torch

from common.errors import UserError, first_line, warn


def check_pretrained(model_id: str, tested: tuple[str, ...] = ()):
    """The checkpoint's config, once its folder, model type and weight files have passed; reads no weights. A
    model type outside `tested` (the families a script's tests cover) gets a warning line."""
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    path = Path(model_id)
    looks_like_a_path = model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1 or "\\" in model_id
    if looks_like_a_path and not path.exists():  # a hub id is "name" or "org/name"
        raise UserError(f"--model {model_id} does not exist; pass a checkpoint folder or a hub id (org/name)")
    if path.exists() and not (path / "config.json").is_file():
        raise UserError(f"--model {path} is not a model folder (it has no config.json); pass a checkpoint folder or "
                        f"hub id")
    for weights in sorted(path.glob("*.safetensors")) if path.exists() else []:
        try:
            with safe_open(weights, "pt"):  # reads the header and checks that the file covers it
                pass
        except Exception as err:
            raise UserError(f"weights file {weights} is damaged ({first_line(err)}); copy or download the checkpoint "
                            f"again") from None
    try:
        config = AutoConfig.from_pretrained(model_id)
    except Exception as err:
        raise UserError(f"cannot read a model config from {model_id!r} ({first_line(err)}); pass a checkpoint "
                        f"folder or hub id") from None
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise UserError(f"--model {model_id} is a {config.model_type!r} model, which AutoModelForImageTextToText "
                        f"does not load; pass an image-text-to-text checkpoint (LLaVA, LLaVA-NeXT, Idefics3, ...)")
    if config.is_encoder_decoder:  # the answer is read where a decoder-only model writes its next token
        raise UserError(f"--model {model_id} is an encoder-decoder {config.model_type!r} model; the Yes/No answer is "
                        f"read where a decoder-only model would write its next token: pass a decoder-only checkpoint")
    if tested and config.model_type not in tested:
        warn(f"{model_id} is a {config.model_type!r} model, a family not tested with this script "
             f"({', '.join(tested)}); see docs/llava.md")
    return config


def load_processor(source: str):
    """Tokenizer, image processor and chat template, checked; left padding: every prompt ends in the last column."""
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


def empty_model(config):
    """The model `config` describes, without memory or weights (meta tensors): for checks before loading."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    with init_empty_weights():
        return AutoModelForImageTextToText.from_config(config)


def model_parts(model) -> dict[str, str]:
    """Where the language model and the vision tower sit in `model` (model.language_model and model.vision_tower in
    LLaVA, model.text_model and model.vision_model in Idefics3, model.visual in Qwen2-VL), found with
    transformers' own lookups, and the vision tower's list of blocks ("vision layers")."""
    names = {id(module): name for name, module in model.named_modules()}
    tower = model.get_encoder(modality="image")
    # The tower's blocks: its ModuleList as long as the vision config's layer count (CLIP's encoder.layers,
    # Qwen2-VL's blocks); the whole tower if it has none.
    depth = getattr(model.config.vision_config, "num_hidden_layers", None)
    blocks = next((m for m in tower.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == depth), tower)
    return {"language model": names[id(model.get_decoder())], "vision tower": names[id(tower)],
            "vision layers": names[id(blocks)]}


def check_lora_targets(skeleton, lora_config, targets: dict[str, tuple[str, list[str]]], model_id: str):
    """Each name in `targets` ({flag: (part of the model, module names)}) is a linear layer of that part, and peft
    accepts `lora_config`: both tried on `skeleton`, an empty copy of the model (`empty_model`)."""
    from peft import get_peft_model

    parts = model_parts(skeleton)
    linear = [name for name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear)]
    for flag, (part, names) in targets.items():
        known = sorted({name.rsplit(".", 1)[-1] for name in linear if name.startswith(parts[part] + ".")})
        for wanted in [name for name in names if name not in known]:
            raise UserError(f"{flag} names {wanted!r}, which is not a linear layer of the {part} ({parts[part]}) of "
                            f"{model_id}; its linear layers are {', '.join(known)}")
    try:
        get_peft_model(skeleton, lora_config)
    except ValueError as err:
        raise UserError(f"LoRA cannot adapt {model_id} this way ({first_line(err)}); check "
                        f"{' and '.join(targets)}") from None


def match_processor_to_model(processor, model) -> None:
    """A processor that counts a picture's image tokens from the patch grid (LLaVA, LLaVA-NeXT) must count what the
    vision tower makes: patch size, whether the tower's CLS token is dropped, and how many extra tokens, from the
    model (older checkpoints' processor configs lack them). Processors that count another way (Idefics3's
    image_seq_len, Qwen2-VL's image_grid_thw) have none of these attributes."""
    if hasattr(processor, "patch_size"):
        processor.patch_size = model.config.vision_config.patch_size
    if hasattr(processor, "vision_feature_select_strategy"):
        processor.vision_feature_select_strategy = model.config.vision_feature_select_strategy
    # Position embeddings beyond the patches are extra tokens: 1 for CLIP's CLS token, 0 for SigLIP.
    embeddings = next((m for m in model.get_encoder(modality="image").modules()
                       if hasattr(m, "num_positions") and hasattr(m, "num_patches")), None)
    if hasattr(processor, "num_additional_image_tokens") and embeddings is not None:
        processor.num_additional_image_tokens = embeddings.num_positions - embeddings.num_patches


_OWN_POSITIONS = weakref.WeakKeyDictionary()  # model -> answer; asked every step, found by one walk


def builds_own_positions(model) -> bool:
    """Whether the model gives image tokens positions of its own, from the attention mask (Qwen2-VL's multimodal
    rotary positions: `get_rope_index`), so that 1-D positions must not be passed to it."""
    if model not in _OWN_POSITIONS:
        _OWN_POSITIONS[model] = any(hasattr(module, "get_rope_index") for module in model.modules())
    return _OWN_POSITIONS[model]


def fixed_input_size(image_processor) -> tuple[int, int] | None:
    """(width, height) the processor brings every picture to (LLaVA-1.5: the crop size, else the resize target), or
    None for a processor that keeps the aspect ratio itself: tiles chosen to fit it (LLaVA-NeXT's
    image_grid_pinpoints) or a bound on the longest edge (Idefics3; Qwen2-VL's pixel budget)."""
    size = dict(image_processor.size)
    if getattr(image_processor, "image_grid_pinpoints", None) or "longest_edge" in size:
        return None
    size = dict(getattr(image_processor, "crop_size", None) or size)
    return size.get("width", size.get("shortest_edge")), size.get("height", size.get("shortest_edge"))


def used_vision_layers(model_config) -> range:
    """The vision layers whose output the language model sees. LLaVA takes its image features from hidden state
    `vision_feature_layer` (-2: the second-to-last layer's output); a LoRA weight in a later layer would never get
    a gradient: dead weight that DDP must be told about and FSDP2 cannot checkpoint. Without the setting
    (Idefics3): all of them."""
    num_layers = model_config.vision_config.num_hidden_layers
    feature = getattr(model_config, "vision_feature_layer", -1)
    hidden_states = [f if f >= 0 else num_layers + 1 + f for f in (feature if isinstance(feature, list) else [feature])]
    return range(max(hidden_states))  # hidden state k is the output of layer k - 1


BASE_SIZES = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "image_size", "patch_size")


def base_identity(model_config) -> dict:
    """What identifies a base model wherever its files lie: the type and sizes of it and of its text and vision
    parts. A moved or re-downloaded copy has the same; a checkpoint of another family or size does not."""
    parts = {"": model_config, "text_config.": getattr(model_config, "text_config", None),
             "vision_config.": getattr(model_config, "vision_config", None)}
    return {prefix + key: getattr(part, key) for prefix, part in parts.items() for key in BASE_SIZES
            if getattr(part, key, None) is not None}


def weight_dtypes(model) -> dict:
    """The dtypes the trainable (LoRA) weights and the frozen base are held in (e.g. float32 over bfloat16)."""
    def names(trainable):
        dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad == trainable}
        return ",".join(sorted(dtypes))

    return {"lora_dtype": names(True), "base_dtype": names(False)}


def quiet_progress_bars() -> None:
    """transformers' progress bars (loading and writing weights), like the scripts' own: on a terminal only."""
    if not sys.stderr.isatty():
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()
