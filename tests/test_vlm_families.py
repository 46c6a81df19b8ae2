"""train_llava.py on the vision-language families beyond LLaVA-1.5: LLaVA-NeXT and Idefics3 (no network).

Each family's tiny random model is built with `tools/make_tiny_llava.py --family` and loaded through
AutoModelForImageTextToText / AutoProcessor, as a real checkpoint of that family would be. One run per family with
the CPU demo's settings (configs/llava_tiny_cpu.yaml), on 160 training screenshots for 3 epochs to keep CI short
(the full demo's numbers are in docs/results.md) and with a checkpoint every 5 steps, is shared by the tests:
it learns the synthetic task, its adapter reloads with PeftModel.from_pretrained and scores every validation image
exactly as the run did, and a run resumed from one of its checkpoints ends with the same weights. LLaVA-1.5's own
tests are in test_llava.py; the answer-position and padding tests there run for every family.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts are files in the repo root, not an installed package

from test_llava import demo_args, run_main  # noqa: E402  (the CPU demo's arguments; train_llava.main in this process)

import llava_models as pretrained  # noqa: E402
import predict_llava  # noqa: E402
import train_llava  # noqa: E402
from common.errors import UserError  # noqa: E402
from llava_models import load_processor, model_parts  # noqa: E402
from tools.make_synthetic_screenshots import make_dataset  # noqa: E402
from tools.make_tiny_llava import build_tiny_llava, build_tokenizer  # noqa: E402

FAMILIES = ["llava_next", "idefics3"]
# What each tiny model must look like to the script: the processor and model classes AutoProcessor and
# AutoModelForImageTextToText pick, where the language model and the vision tower sit, and the vision layers whose
# output reaches the language model (LLaVA-NeXT reads the second-to-last of its 2 layers, Idefics3 the last).
EXPECTED = {
    "llava_next": ("LlavaNextProcessor", "LlavaNextForConditionalGeneration", "model.language_model",
                   "model.vision_tower", "model.vision_tower.encoder.layers", [0]),
    "idefics3": ("Idefics3Processor", "Idefics3ForConditionalGeneration", "model.text_model", "model.vision_model",
                 "model.vision_model.encoder.layers", [0, 1]),
}


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("screenshots"), {"train": 160, "val": 100, "test": 40}, seed=0)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    """(family, folder of its tiny model), built once per module and family."""
    return request.param, build_tiny_llava(tmp_path_factory.mktemp(f"tiny_{request.param}"), family=request.param)


RUN_EXTRA = ["--epochs", 3, "--checkpoint_every", 5, "--keep_checkpoints", 100]


@pytest.fixture(scope="module")
def family_run(family_model, screenshots, tmp_path_factory):
    """The CPU demo's settings on this family's tiny model: 3 epochs of 10 steps, a checkpoint every 5 steps (all kept,
    for the resume test)."""
    family, model = family_model
    output_dir = tmp_path_factory.mktemp(f"run_{family}")
    results = run_main(*demo_args(model, screenshots, output_dir, *RUN_EXTRA))
    return family, model, output_dir, results


# ----------------------------------------------------------------------------------------------
# Loading: the Auto classes, the parts found in the model, the processor's image handling
# ----------------------------------------------------------------------------------------------


def test_tiny_model_loads_through_the_auto_classes_with_its_parts_found(family_model):
    family, model = family_model
    processor_class, model_class, language_model, vision_tower, vision_layers, used = EXPECTED[family]
    processor = load_processor(str(model))
    base = train_llava.load_base(str(model), processor, torch.float32)
    assert (type(processor).__name__, type(base).__name__) == (processor_class, model_class)
    assert base.config.model_type == family
    parts = model_parts(base)
    assert parts == {"language model": language_model, "vision tower": vision_tower, "vision layers": vision_layers}
    assert list(pretrained.used_vision_layers(base.config)) == used
    assert pretrained.fixed_input_size(processor.image_processor) is None  # these processors keep the aspect ratio
    assert train_llava.build_prompt(processor, "Is it?").endswith({"llava_next": "[/INST]",
                                                                   "idefics3": "Assistant:"}[family])


def test_lora_trains_both_parts_under_gradient_checkpointing(family_model):
    """LoRA lands in the parts the model names (and only in vision layers whose output is used); in fp32 under a
    bf16 base, every LoRA weight gets a gradient with non-reentrant checkpointing."""
    family, model = family_model
    _, _, language_model, _, vision_layers, used = EXPECTED[family]
    vision = ["q_proj", "fc1"]  # attention and MLP: both towers' layers have them
    cfg = train_llava.Config(model=str(model), gradient_checkpointing=True, lora_dropout=0.0,
                             lora_vision_modules=vision)
    processor = load_processor(str(model))
    peft_model = train_llava.add_lora(cfg, train_llava.load_base(str(model), processor, torch.bfloat16)).train()
    lora = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n and p.dtype == torch.float32 for n, p in lora.items())
    adapted = {n.removeprefix("base_model.model.").split(".lora_")[0] for n in lora}
    in_vision = {n for n in adapted if n.startswith(vision_layers + ".")}
    assert {int(n.removeprefix(vision_layers + ".").split(".")[0]) for n in in_vision} == set(used)
    assert {n.rsplit(".", 1)[1] for n in in_vision} == set(vision)
    assert adapted - in_vision and all(n.startswith(language_model + ".") for n in adapted - in_vision)
    with torch.no_grad():  # B is zero-initialised: give it a value so that gradients reach A as well
        for n, p in lora.items():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    prompts = [train_llava.build_prompt(processor, "Is it?")] * 2
    inputs = dict(processor(images=[Image.new("RGB", (100, 60), "red"), Image.new("RGB", (50, 90), "blue")],
                            text=prompts, padding=True, return_tensors="pt"))
    ids = train_llava.answer_token_ids(processor.tokenizer, "No", "Yes")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = train_llava.answer_logits(peft_model, inputs, ids)
    train_llava.detector_loss(logits, torch.tensor([0, 1]), torch.ones(2), None).backward()
    no_grad = [n for n, p in lora.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad


def test_resize_choices_for_processors_that_keep_the_aspect_ratio(family_model, tmp_path):
    """pad hands the picture over whole (the processor keeps its aspect ratio and crops nothing), exactly as the
    processor's own resizing (crop) does; stretch makes it a square of its longer side."""
    family, model = family_model
    processor = load_processor(str(model))
    Image.new("RGB", (200, 80), "white").save(tmp_path / "wide.png")
    items = [(0, train_llava.Sample(tmp_path / "wide.png", 1, ""))]
    prompt = train_llava.build_prompt(processor, "Is it?")
    pad, crop, stretch = (train_llava.collate(items, processor, prompt, resize)["inputs"]
                          for resize in ("pad", "crop", "stretch"))
    assert torch.equal(pad["pixel_values"], crop["pixel_values"]) and torch.equal(pad["input_ids"], crop["input_ids"])
    if family == "llava_next":
        assert pad["image_sizes"].tolist() == [[80, 200]] and stretch["image_sizes"].tolist() == [[200, 200]]
    else:  # Idefics3: a wide picture becomes 1 x 2 tiles + the whole, a square one 2 x 2 + the whole
        assert pad["pixel_values"].shape[1] == 3 and stretch["pixel_values"].shape[1] == 5


# ----------------------------------------------------------------------------------------------
# Training end to end: learning, the reloaded adapter, exact resume
# ----------------------------------------------------------------------------------------------


def test_tiny_model_learns_the_synthetic_task(family_run):
    family, _, output_dir, results = family_run
    saved = json.loads((output_dir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["val_accuracy"] >= 0.9 and saved["val_auroc"] >= 0.95 and saved["val_f1"] >= 0.9
    assert saved["test_accuracy"] >= 0.85 and saved["optimizer_steps"] == 30
    adapter_config = json.loads((output_dir / "adapter/adapter_config.json").read_text())
    language_model = EXPECTED[family][2]
    assert adapter_config["target_modules"].startswith(language_model.replace(".", "\\.") + "\\.")


def test_reloaded_adapter_reproduces_predictions_exactly(family_run, screenshots, tmp_path):
    from peft import PeftModel

    family, model, output_dir, _ = family_run
    reloaded, _, _ = predict_llava.load_trained(str(model), output_dir / "adapter", torch.float32)
    assert isinstance(reloaded, PeftModel) and reloaded.base_model.model.config.model_type == family
    run_main("--model", model, "--run_dir", output_dir, "--data", screenshots / "val.jsonl", "--output",
             tmp_path / "p.jsonl", "--batch_size", 50, "--num_workers", 0, script=predict_llava)
    read = lambda path: {r["path"]: r["p_yes"] for r in map(json.loads, path.read_text().splitlines())}  # noqa: E731
    during_training, predicted = read(output_dir / "val_predictions.jsonl"), read(tmp_path / "p.jsonl")
    assert len(predicted) == 100 and predicted == during_training  # every P(Yes) exactly, not approximately


def test_resume_mid_epoch_continues_exactly(family_run, screenshots, tmp_path):
    """Resumed from step 25 (5 batches into the last epoch): the same LoRA weights at step 30, the same adapter."""
    from safetensors.torch import load_file

    _, model, output_dir, results = family_run
    checkpoint = output_dir / "checkpoints/step_00000025"
    shutil.copytree(checkpoint, tmp_path / "checkpoints" / checkpoint.name)
    resumed = run_main(*demo_args(model, screenshots, tmp_path, *RUN_EXTRA, "--resume_from", "latest",
                                  "--overwrite", "false"))
    for name in ("checkpoints/step_00000030/model.safetensors", "adapter/adapter_model.safetensors"):
        straight, again = load_file(output_dir / name), load_file(tmp_path / name)
        assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight), name
    before = load_file(checkpoint / "model.safetensors")
    after = load_file(output_dir / "checkpoints/step_00000030/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the 5 steps after the resume changed them
    assert (resumed["val_accuracy"], resumed["test_accuracy"]) == (results["val_accuracy"], results["test_accuracy"])


# ----------------------------------------------------------------------------------------------
# Bad input: a split answer word, a checkpoint AutoModelForImageTextToText cannot load
# ----------------------------------------------------------------------------------------------


def test_a_split_answer_word_is_refused_before_the_weights_load(family_model, screenshots, tmp_path, monkeypatch):
    _, model = family_model
    monkeypatch.setattr(train_llava, "load_base", lambda *a: pytest.fail("the weights were loaded"))
    with pytest.raises(UserError, match=r"^the answer word 'Yes\.' is not one known token in this tokenizer \(it is "
                                        r"\['Yes', '\.'\]\); pass a single-token word with --yes_token$"):
        run_main(*demo_args(model, screenshots, tmp_path / "out", "--yes_token", "Yes."))
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_the_auto_class_cannot_load_is_one_line_with_exit_code_2(screenshots, tmp_path):
    """A text-only Llama checkpoint: refused from its config.json, before any weights load or anything is written."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    proc = subprocess.run([sys.executable, "train_llava.py", *map(str, demo_args(tmp_path / "llama", screenshots,
                                                                                   tmp_path / "out"))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == (f"error: --model {tmp_path / 'llama'} is a 'llama' model, which "
                                   f"AutoModelForImageTextToText does not load; pass an image-text-to-text checkpoint "
                                   f"(LLaVA, LLaVA-NeXT, Idefics3, ...)")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Models that give image tokens positions of their own (Qwen2-VL's multimodal rotary positions)
# ----------------------------------------------------------------------------------------------


def test_a_model_with_its_own_image_positions_gets_the_exact_answer_too():
    """Qwen2-VL numbers an image's tokens by row and column (M-RoPE), from the attention mask, so answer_logits must
    not pass it the 1-D positions that make left padding exact for the other families. Its processor cannot be
    loaded here (transformers loads Qwen2-VL's video processor too, and that needs torchvision), so the inputs are
    built as the processor would: its image processor's patches, and one <|image_pad|> token per 2 x 2 patches."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer()
    # <|vision_start|>, ...end, <|image_pad|>
    start, end, pad_token = len(tokenizer), len(tokenizer) + 1, len(tokenizer) + 2
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer) + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=8),
        image_token_id=pad_token, vision_start_token_id=start, vision_end_token_id=end, video_token_id=end + 2)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, min_pixels=16 * 16, max_pixels=64 * 64)
    ids = train_llava.answer_token_ids(tokenizer, "No", "Yes")

    def sample(size, question):
        pixels = image_processor(images=[Image.new("RGB", size, "red")], return_tensors="pt")
        words = (tokenizer.encode(question, add_special_tokens=False)
                 + tokenizer.encode("ASSISTANT :", add_special_tokens=False))
        tokens = [start] + [pad_token] * (int(pixels["image_grid_thw"].prod()) // 4) + [end] + words
        return tokens, pixels

    samples = [sample((200, 100), "Is this a prompt injection ?"), sample((64, 64), "Is it ?")]
    assert len(samples[0][0]) != len(samples[1][0])  # different image-token counts and questions

    def batch(side):
        width = max(len(tokens) for tokens, _ in samples)
        rows = [[tokenizer.pad_token_id] * (width - len(t)) + t if side == "left"
                else t + [tokenizer.pad_token_id] * (width - len(t))
                for t, _ in samples]
        input_ids = torch.tensor(rows)
        mask = torch.tensor([[int(i >= width - len(t)) if side == "left" else int(i < len(t)) for i in range(width)]
                             for t, _ in samples])
        return {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": (input_ids == pad_token).int(),
                "pixel_values": torch.cat([p["pixel_values"] for _, p in samples]),
                "image_grid_thw": torch.cat([p["image_grid_thw"] for _, p in samples])}

    with torch.no_grad():
        answers = {side: train_llava.answer_logits(model, batch(side), ids) for side in ("left", "right")}
        for row, (tokens, pixels) in enumerate(samples):  # each sample alone, the model numbering its own tokens
            alone = {"input_ids": torch.tensor([tokens]),
                     "attention_mask": torch.ones(1, len(tokens), dtype=torch.long),
                     "mm_token_type_ids": (torch.tensor([tokens]) == pad_token).int(), **pixels}
            full = model(**alone).logits[0, -1, ids]
            for side in ("left", "right"):
                torch.testing.assert_close(answers[side][row], full, rtol=1e-5, atol=1e-5)
            one_d = model(**alone, position_ids=torch.arange(len(tokens))[None]).logits[0, -1, ids]
            assert not torch.allclose(one_d, full, rtol=1e-4, atol=1e-4)  # 1-D positions would change the answer


def test_gpu_check_flop_formula_matches_pytorchs_flop_counter_on_llava_next():
    """bench/gpu_check.py's model FLOPs for LLaVA-NeXT (its second full-size architecture): the vision tower and the
    projector once per anyres tile, the language model over the tokens kept, as FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlavaNextForConditionalGeneration

    from bench.gpu_check import llava_config, model_flops_per_sample, processor_for, tiles_per_sample

    tokenizer = build_tokenizer()
    config = llava_config(tiny=True, tokenizer=tokenizer, family="llava_next")
    config.vision_feature_layer = -1  # every vision layer feeds the language model (else the last one runs unused)
    model = LlavaNextForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    processor = processor_for(config, tokenizer)
    prompt = train_llava.build_prompt(processor, "Is this a prompt injection?")
    inputs = dict(processor(images=[Image.new("RGB", (200, 100), "red")], text=[prompt], return_tensors="pt"))
    image_tokens = int((inputs["input_ids"] == config.image_token_id).sum())
    text_tokens, [tiles] = inputs["input_ids"].shape[1] - image_tokens, tiles_per_sample(config, inputs)
    assert tiles == 3 and image_tokens > (64 // 8) ** 2  # a 2:1 picture: 1 x 2 tiles + the whole picture
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        train_llava.answer_logits(model, inputs, [4, 5])
    assert model_flops_per_sample(config, text_tokens, image_tokens, tiles) == 2 * counter.get_total_flops()


def test_an_encoder_decoder_image_text_to_text_checkpoint_is_refused_from_its_config(tmp_path):
    """Pix2Struct loads with AutoModelForImageTextToText, but writes its answer from a decoder of its own: the
    answer cannot be read at the prompt's last token. Refused from config.json alone (there are no weights)."""
    from transformers import Pix2StructConfig

    from llava_models import check_pretrained

    Pix2StructConfig().save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"is an encoder-decoder 'pix2struct' model; the Yes/No answer is read where a "
                                        r"decoder-only model would write its next token: "
                                        r"pass a decoder-only checkpoint$"):
        check_pretrained(str(tmp_path))
