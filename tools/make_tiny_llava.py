"""Build a tiny random vision-language model of one family, with its processor, for tests and CPU demos.

Nothing is downloaded. The result is saved with `save_pretrained`, so train_llava.py loads it through the
same `AutoModelForImageTextToText` / `AutoProcessor` calls as a real checkpoint of that family:

    python tools/make_tiny_llava.py --output_dir runs/tiny_llava                            # LLaVA-1.5
    python tools/make_tiny_llava.py --family llava_next --output_dir runs/tiny_llava_next   # LLaVA-NeXT
    python tools/make_tiny_llava.py --family idefics3 --output_dir runs/tiny_idefics3       # Idefics3

Per family:

- llava, like llava-hf/llava-1.5-7b-hf. Vision tower: CLIP, 64 px, CLS token dropped. Image tokens per picture:
  64, always. Chat template: `USER: <image>\\n... ASSISTANT:`
- llava_next, like llava-hf/llava-v1.6-mistral-7b-hf. Vision tower: CLIP, 32 px tiles, anyres grid up to 64 px.
  Image tokens per picture: 34-88, by shape. Chat template: `[INST] <image>\\n... [/INST]`
- idefics3, like HuggingFaceM4/Idefics3-8B-Llama3. Vision tower: SigLIP-like, 32 px tiles, pixel shuffle 2 x 2.
  Image tokens per picture: 12 or 20, by shape. Chat template: `User:<image>...<end_of_utterance>\\nAssistant:`

The language model is always a 2-layer Llama of width 64. The tokenizer is a word-level vocabulary built with the
`tokenizers` library in which the family's special tokens, `Yes` and `No` are single tokens.
"""

import argparse
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast

FAMILIES = ("llava", "llava_next", "idefics3")
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
WORDS = (
    "USER ASSISTANT : Yes No Does Is Answer . , ? ! ' \" - a an the "
    "this that is are does do it its of to in on for and or "
    "screenshot image page web contain contains any text instruction instructions prompt injection attempt "
    "trying tries try give gives agent AI assistant answer only ignore previous"
).split()
# Special tokens each family's processor and template use, beyond SPECIAL_TOKENS.
FAMILY_TOKENS = {
    "llava": [],
    "llava_next": ["[INST]", "[/INST]"],
    "idefics3": ["<|begin_of_text|>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>", "User",
                 "Assistant"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
}
# llava-1.5's template: the role in capitals, images first, then the text; the answer follows "ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CHAT_TEMPLATES = {
    "llava": CHAT_TEMPLATE,
    # llava-v1.6-mistral's: the user turn inside [INST] ... [/INST]; the answer follows "[/INST]".
    "llava_next": (
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
        "{% for item in message['content'] %}"
        "{% if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endif %}{% endfor %}"
        "{{ '[/INST]' }}{% endif %}{% endfor %}"
    ),
    # Idefics3's: "User:" directly followed by the image, each turn closed by <end_of_utterance>; the answer follows
    # "Assistant:".
    "idefics3": (
        "<|begin_of_text|>{% for message in messages %}{{ message['role'].capitalize() + ':' }}"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>' }}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    ),
}
DEFAULT_SIZES = {"llava": (64, 8), "llava_next": (32, 8), "idefics3": (32, 8)}  # (vision input side, patch size)


def build_tokenizer(family: str = "llava") -> PreTrainedTokenizerFast:
    special = SPECIAL_TOKENS + FAMILY_TOKENS[family]
    vocab = {token: i for i, token in enumerate(special + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
    # Matched whole, before the split into words (e.g. "[INST]", "<row_1_col_1>").
    backend.add_special_tokens(special[5:])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"}, chat_template=CHAT_TEMPLATES[family],
    )
    return tokenizer


def build_tiny_llava(output_dir: str | Path, image_size: int | None = None, patch_size: int | None = None,
                     seed: int = 0, family: str = "llava", text_model: str = "llama") -> Path:
    """Write a tiny random model of `family` and its processor to `output_dir`; returns the folder. Its language
    model is a Llama, or with `text_model` a Mistral or a Qwen2 of the same size (other decoder blocks)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):  # never overwrite a real model
        raise FileExistsError(f"{output_dir} is not an empty folder; "
                              "the tiny model is built only into a new or empty one")
    image_size, patch_size = image_size or DEFAULT_SIZES[family][0], patch_size or DEFAULT_SIZES[family][1]
    tokenizer = build_tokenizer(family)
    model_class, config, processor = {"llava": tiny_llava, "llava_next": tiny_llava_next,
                                      "idefics3": tiny_idefics3}[family](tokenizer, image_size, patch_size)
    if text_model != "llama":  # the same sizes in another decoder family
        from transformers import MistralConfig, Qwen2Config

        text_class = {"mistral": MistralConfig, "qwen2": Qwen2Config}[text_model]
        config.text_config = text_class(**{k: v for k, v in tiny_llama(tokenizer).to_dict().items()
                                           if k not in ("model_type", "architectures")})
    with torch.random.fork_rng():  # random weights from `seed`, without touching the caller's random state
        torch.manual_seed(seed)
        model = model_class(config).eval()
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def tiny_llama(tokenizer) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)


def tiny_clip(image_size: int, patch_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=image_size, patch_size=patch_size, projection_dim=32)


# The image processors are the PIL ones (<Family>ImageProcessorPil): the default names need torchvision, which this
# project does not install (its wheel brings a CUDA PyTorch); without it transformers would substitute the PIL class
# anyway, with a warning. A real checkpoint loaded through AutoProcessor gets the PIL class the same way, silently.
def tiny_llava(tokenizer, image_size: int, patch_size: int):
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    num_patches = (image_size // patch_size) ** 2
    config = LlavaConfig(vision_config=tiny_clip(image_size, patch_size), text_config=tiny_llama(tokenizer),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=num_patches,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    # num_additional_image_tokens=1: CLIP adds a CLS token, which the "default" strategy then drops.
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATES["llava"])
    return LlavaForConditionalGeneration, config, processor


def tiny_llava_next(tokenizer, image_size: int, patch_size: int):
    """anyres: the picture, resized to the grid of tiles that fits its aspect ratio best, plus the whole picture as
    one more tile; each tile's row of patches ends in a learned newline token, and the padding is cut off again."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    config = LlavaNextConfig(vision_config=tiny_clip(image_size, patch_size), text_config=tiny_llama(tokenizer),
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=pinpoints,
                             vision_feature_layer=-2, vision_feature_select_strategy="default")
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                                 crop_size={"height": image_size, "width": image_size},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATES["llava_next"])
    return LlavaNextForConditionalGeneration, config, processor


def tiny_idefics3(tokenizer, image_size: int, patch_size: int):
    """A picture is resized to at most 2 x 2 tiles of `image_size` px plus the whole picture as one more tile; each
    tile's patches are merged 2 x 2 (pixel shuffle), so a tile becomes (image_size / patch_size / 2)^2 tokens."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=patch_size)
    config = Idefics3Config(vision_config=vision, text_config=tiny_llama(tokenizer).to_dict(), scale_factor=2,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            pad_token_id=tokenizer.pad_token_id)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 2 * image_size},
                                                max_image_size={"longest_edge": image_size}, do_image_splitting=True)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=(image_size // patch_size // 2) ** 2,
                                  chat_template=CHAT_TEMPLATES["idefics3"])
    return Idefics3ForConditionalGeneration, config, processor


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="llava", choices=FAMILIES, help="which architecture and processor")
    parser.add_argument("--output_dir", default=None,
                        help="where to save the model and processor (default: runs/tiny_<family>)")
    parser.add_argument("--image_size", type=int, default=None,
                        help="input side of the vision tower (a tile's side for llava_next and idefics3; "
                        "default 64 for llava, 32 for the others)")
    parser.add_argument("--patch_size", type=int, default=None, help="vision patch size (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--text_model", default="llama", choices=["llama", "mistral", "qwen2"],
                        help="the language model's family")
    args = parser.parse_args()
    output_dir = args.output_dir or f"runs/tiny_{args.family}"
    try:
        built = build_tiny_llava(output_dir, args.image_size, args.patch_size, args.seed, family=args.family,
                                 text_model=args.text_model)
        print(f"tiny {args.family} saved to {built}")
    except FileExistsError as err:
        sys.exit(print(f"error: {err}; pick a new --output_dir", file=sys.stderr) or 2)
