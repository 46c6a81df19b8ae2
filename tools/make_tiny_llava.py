"""Build a tiny random LLaVA (CLIP vision tower, projector, Llama language model) with its processor.

For tests and the CPU demo: nothing is downloaded. The result is saved with `save_pretrained`, so
train_llava.py loads it through the same `from_pretrained` calls as `llava-hf/llava-1.5-7b-hf`:

    python tools/make_tiny_llava.py --output_dir runs/tiny_llava

The tokenizer is a word-level vocabulary built with the `tokenizers` library in which `<image>`,
`Yes` and `No` are single tokens; the chat template follows llava-1.5's "USER: <image>\\n... ASSISTANT:".
"""

import argparse
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
WORDS = (
    "USER ASSISTANT : Yes No Does Is Answer . , ? ! ' \" - a an the this that is are does do it its of to in on for and or "
    "screenshot image page web contain contains any text instruction instructions prompt injection attempt "
    "trying tries try give gives agent AI assistant answer only ignore previous"
).split()
# llava-1.5's template: the role in capitals, images first, then the text; the answer follows "ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"}, chat_template=CHAT_TEMPLATE,
    )
    return tokenizer


def build_tiny_llava(output_dir: str | Path, image_size: int = 64, patch_size: int = 8, seed: int = 0) -> Path:
    """Write a tiny random LLaVA and its processor to `output_dir`; returns the folder."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):  # never overwrite a real model
        raise FileExistsError(f"{output_dir} is not an empty folder; the tiny model is built only into a new or empty one")
    tokenizer = build_tokenizer()
    with torch.random.fork_rng():  # random weights from `seed`, without touching the caller's random state
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(tiny_llava_config(tokenizer, image_size, patch_size)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    # num_additional_image_tokens=1: CLIP adds a CLS token, which the "default" strategy then drops.
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def tiny_llava_config(tokenizer, image_size: int, patch_size: int) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    num_patches = (image_size // patch_size) ** 2
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                       image_seq_length=num_patches, vision_feature_layer=-2, vision_feature_select_strategy="default")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="runs/tiny_llava", help="where to save the model and processor")
    parser.add_argument("--image_size", type=int, default=64, help="input resolution of the vision tower")
    parser.add_argument("--patch_size", type=int, default=8, help="vision patch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    try:
        print(f"tiny LLaVA saved to {build_tiny_llava(args.output_dir, args.image_size, args.patch_size, args.seed)}")
    except FileExistsError as err:
        sys.exit(print(f"error: {err}; pick a new --output_dir", file=sys.stderr) or 2)
