"""One command that checks, on a GPU, what this project promises there, and measures LLaVA LoRA training.

    python bench/gpu_check.py              # any CUDA machine (the 7B bf16 weights alone are 13.2 GiB)
    python bench/gpu_check.py --families llava_next    # part 2 on one family only
    python bench/gpu_check.py --tiny       # everything a CPU can run, with tiny models, in about a minute (tested)
    python bench/gpu_check.py --skip_throughput    # only the training checks (any GPU, a few GB)

Part 1, the scripts' own main() under `accelerate launch --config_file ...` (one launch per config,
its runs one after another; tiny settings), each run with one forced non-finite loss at update 3:
  - accelerate_configs/single_gpu.yaml in bf16 and in fp16, both scripts: the table shows the update
    the guard fell back at, the dtype the model's last trainable layer computed in before and after it, the LR
    before and after (the schedule is held constant, so the ratio is the backoff) and that the run
    finished (main() returned, results.json written, a finite test score);
  - accelerate_configs/fsdp.yaml with 1 process, both scripts, the same columns; the LLaVA adapter is
    then reloaded with `predict_llava.py` (PeftModel.from_pretrained) and must reproduce
    the run's own validation P(Yes).
Part 2, LoRA training throughput on LLaVA-1.5-7B's architecture with random weights (CLIP ViT-L/14 at
336 px: 576 image tokens; a Llama-2-7B-sized language model; built locally, nothing is downloaded:
speed and memory do not depend on the weights' values), then on LLaVA-NeXT-7B's (llava-v1.6-vicuna-7b:
the same towers, but each screenshot is cut into up to 4 tiles of 336 px chosen to fit its aspect ratio,
plus the whole picture, so that its image-token count depends on the picture's shape). Batch 8, gradient
checkpointing, bf16 base, fp32 LoRA (r 8 on the language model's attention and MLP projections), fused
AdamW. Two arms per architecture, run one after the other in this process:
  - this project: train_llava.py's own pieces: images decoded and processed in DataLoader workers,
    the answer logits computed only at the answer position (logits_to_keep), non-reentrant checkpointing;
  - a baseline built the way the public WAInjectBench loop does it: images opened and processed inside
    the loop, full-vocabulary logits at every position (the answer read from the last one), reentrant
    checkpointing. Everything else (model, LoRA, loss, optimizer, batch) is the same.
  MFU = model FLOPs per second / the GPU's peak dense bf16 FLOP/s. Model FLOPs per sample = 2 x F, F =
  the forward's matmul FLOPs: 2 x (weights of every linear layer) x (tokens through it) + the attention
  products 4 x layers x tokens^2 x width, for the vision layers whose output the language model uses
  (once per tile for LLaVA-NeXT), the projector and the language model, and the vocabulary projection at
  one position (what the task needs), summed over the measured samples, each with its own token count.
  The backward of a frozen weight costs one more F (the input gradient; no weight gradient);
  recomputation is not counted (as in PaLM's definition), nor are LoRA's own FLOPs (under 1%).
  Targets on an H100: >= 1.3x the baseline's samples/s, <= 0.7x its peak memory, MFU >= 40%.

With --tiny, part 2 runs the same two arms on a tiny LLaVA and a tiny LLaVA-NeXT on the CPU (samples/s
only: no GPU memory, no peak FLOP/s). fp16 rows need CUDA (Accelerate refuses fp16 autocast on a CPU): --tiny
lists them as skipped. The exit code is 0 when every check passed, 1 otherwise.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

INJECT_AT = 3  # the update whose loss is made NaN
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16"}
LR = 1e-3

# Peak dense bf16 tensor-core FLOP/s (vendor datasheets, without sparsity), matched on the device name.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
                    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0)]


# ----------------------------------------------------------------------------------------------
# Part 1: the training scripts under accelerate launch, with a forced non-finite update
# ----------------------------------------------------------------------------------------------


def run_child(plan_file: str) -> None:
    """Runs inside `accelerate launch`: each planned run is the script's own main(), one after another (Accelerate's
    state reset in between, as the test suite does: one launch per accelerate config, not one per run, keeps --tiny
    near a minute). The training loss is made NaN once, and the dtype of the last trainable linear layer before
    each training loss is recorded (the LLaVA adapter's last LoRA layer, the dual-task heads; a frozen bf16 base
    stays bf16 after the fallback); Accelerate converts the model's outputs to fp32, so look inside."""
    import importlib

    from accelerate.state import AcceleratorState, GradientState

    from common.errors import first_line

    last_linear, forward_dtypes = {}, []

    def remember_dtype(layer, inputs, output):  # trainable layers only: a frozen bf16 base stays bf16 after it
        if isinstance(layer, torch.nn.Linear) and layer.training and layer.weight.requires_grad \
                and isinstance(output, torch.Tensor):
            last_linear["dtype"] = str(output.dtype).replace("torch.", "")

    def nan_once(loss):
        forward_dtypes.append(last_linear.pop("dtype", None))
        return loss * float("nan") if len(forward_dtypes) == INJECT_AT else loss

    torch.nn.modules.module.register_module_forward_hook(remember_dtype)
    for run in json.loads(Path(plan_file).read_text()):
        module = importlib.import_module({"dual": "train_dual_task", "llava": "train_llava",
                                          "llava_predict": "predict_llava"}[run["script"]])
        if run["script"] == "dual":  # AMNLLoss is called once per training micro-batch, and nowhere else
            real_call = module.AMNLLoss.__call__
            module.AMNLLoss.__call__ = lambda self, *a, real=real_call: (
                lambda total, parts: (nan_once(total), parts))(*real(self, *a))
        elif run["script"] == "llava":  # detector_loss: likewise, training only
            real_loss = module.detector_loss
            module.detector_loss = lambda *a, real=real_loss: nan_once(real(*a))
        forward_dtypes.clear()
        start = time.perf_counter()
        try:
            module.main(run["args"])
            error = None
        except (Exception, SystemExit) as err:  # recorded, and the next run goes on
            error = f"{type(err).__name__}: {first_line(err)}"
        finally:
            if run["script"] == "dual":
                module.AMNLLoss.__call__ = real_call
            elif run["script"] == "llava":
                module.detector_loss = real_loss
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        if int(os.environ.get("RANK", "0")) == 0:
            Path(run["record"]).write_text(json.dumps({"forward_dtypes": forward_dtypes, "error": error,
                                                     "seconds": time.perf_counter() - start}))


def launch(config: str, *args, num_processes: int | None = None) -> list[str]:
    extra = ["--num_processes", str(num_processes)] if num_processes else []
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"accelerate_configs/{config}.yaml",
            *extra, *map(str, args)]


def tiny_inputs(workdir: Path) -> dict:
    """A tiny LLaVA stored in bf16 (so that an fp32 reload holds the very weights a bf16 run trained on) and
    a few synthetic screenshots."""
    from transformers import LlavaForConditionalGeneration

    from tools.make_synthetic_screenshots import make_dataset
    from tools.make_tiny_llava import build_tiny_llava

    fp32 = build_tiny_llava(workdir / "tiny_llava_fp32")
    model = LlavaForConditionalGeneration.from_pretrained(fp32, dtype=torch.bfloat16)
    model.save_pretrained(workdir / "tiny_llava")
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "chat_template.json"):
        if (fp32 / name).exists():
            shutil.copy(fp32 / name, workdir / "tiny_llava" / name)
    data = make_dataset(workdir / "screenshots", {"train": 32, "val": 16, "test": 16}, seed=0)
    return {"model": workdir / "tiny_llava", "data": data}


def script_args(script: str, precision: str, inputs: dict, output_dir: Path) -> list[str]:
    """Tiny settings, a constant LR (warmup 0, cosine floor 1x), a log line every update."""
    if script == "dual":
        return ["train_dual_task.py", "--conv_channels", 16, "--hidden_size", 16, "--gru_layers", 1, "--epochs", 1,
                "--max_steps", 8, "--batch_size", 64, "--warmup_epochs", 0, "--min_lr_factor", 1, "--lr", LR,
                "--log_every", 1, "--mixed_precision", precision, "--output_dir", output_dir]
    data = inputs["data"]
    return ["train_llava.py", "--model", inputs["model"], "--model_dtype", precision, "--mixed_precision", precision,
            "--train_data", data / "train.jsonl", "--val_data", data / "val.jsonl", "--test_data", data / "test.jsonl",
            "--batch_size", 8, "--grad_accum_steps", 1, "--epochs", 1, "--warmup_ratio", 0, "--min_lr_factor", 1,
            "--lr", LR, "--log_every", 1, "--num_workers", 1, "--gradient_checkpointing", "true", "--output_dir",
            output_dir]


def run_all(config: str, names: list[tuple[str, str, str]], inputs: dict, workdir: Path,
            num_processes: int | None = None, then: list[dict] = ()) -> list[dict]:
    """One `accelerate launch` with this config for the runs `names` = [(name, script, precision)], a row each;
    then the runs planned in `then`."""
    plan = [{"script": script, "record": str(workdir / f"{name}.json"),
             "args": [str(a) for a in script_args(script, precision, inputs, workdir / name)[1:]]}
            for name, script, precision in names] + list(then)
    (workdir / f"{config}_plan.json").write_text(json.dumps(plan))
    proc = subprocess.run(launch(config, __file__, "--child", workdir / f"{config}_plan.json",
                                 num_processes=num_processes),
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    return [check_run(name, config + (f" x{num_processes}" if num_processes else ""), precision, workdir, proc)
            for name, _, precision in names]


def check_run(name: str, launched: str, precision: str, workdir: Path, proc) -> dict:
    output_dir, record = workdir / name, workdir / f"{name}.json"
    recorded = json.loads(record.read_text()) if record.exists() else {"error": None, "seconds": 0.0}
    row = {"run": name, "launch": launched, "precision": precision, "seconds": recorded["seconds"]}
    if recorded["error"] or not (output_dir / "results.json").exists():
        problem = recorded["error"] or (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return row | {"ok": False, "problem": problem}
    results = json.loads((output_dir / "results.json").read_text())
    dtypes = recorded["forward_dtypes"]
    lrs = {r["step"]: r["train/lr"] for r in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())
           if "train/lr" in r}
    score = results.get("test_rmse", results.get("test_auroc"))
    row |= {"distributed_type": results["distributed_type"], "fell_back_at": results["fell_back_to_fp32_at_step"],
            "dtype_before": dtypes[INJECT_AT - 1],
            "dtype_after": dtypes[INJECT_AT] if len(dtypes) > INJECT_AT else None,
            "lr_ratio": lrs[INJECT_AT + 1] / lrs[INJECT_AT], "test_score": score, "output_dir": str(output_dir),
            "weight_dtypes": {k: v for k, v in results.items() if k.endswith("_dtype")}}
    row["ok"] = (row["fell_back_at"] == INJECT_AT and row["dtype_before"] == DTYPE_NAMES[precision]
                 and row["dtype_after"] == "float32" and math.isclose(row["lr_ratio"], 0.5)
                 and score is not None and math.isfinite(score))
    return row


def reload_run(inputs: dict, workdir: Path) -> dict:
    """The fsdp.yaml run's saved adapter, loaded onto the base with PeftModel.from_pretrained (predict_llava.py)
    in another launch. After the fallback the run evaluated its bf16 base and fp32 LoRA without autocast: so
    does the reload."""
    return {"script": "llava_predict", "record": str(workdir / "reload.json"),
            "args": [str(a) for a in ["--model", inputs["model"], "--model_dtype", "bf16", "--mixed_precision", "no",
                                      "--run_dir", workdir / "llava_fsdp", "--data", inputs["data"] / "val.jsonl",
                                      "--output", workdir / "reload_predictions.jsonl", "--num_workers", 1]]}


def check_adapter_reload(workdir: Path) -> dict:
    """It must give the validation P(Yes) the run computed at its end."""
    record, output = workdir / "reload.json", workdir / "reload_predictions.jsonl"
    error = json.loads(record.read_text())["error"] if record.exists() else "did not run"
    if error or not output.exists():
        return {"ok": False, "problem": error or "no predictions written"}
    read = lambda path: {r["path"]: r["p_yes"] for r in map(json.loads, path.read_text().splitlines())}  # noqa: E731
    trained, reloaded = read(workdir / "llava_fsdp" / "val_predictions.jsonl"), read(output)
    difference = max(abs(trained[p] - reloaded[p]) for p in trained) if trained.keys() == reloaded.keys() else math.inf
    return {"ok": difference < 1e-4, "max_p_yes_difference": difference, "images": len(reloaded)}


def training_checks(workdir: Path) -> tuple[list[dict], dict]:
    inputs = tiny_inputs(workdir)
    fsdp = run_all("fsdp", [(f"{script}_fsdp", script, "bf16") for script in ("dual", "llava")], inputs, workdir,
                   num_processes=1)
    precisions = ["bf16", "fp16"] if torch.cuda.is_available() else ["bf16"]
    single = run_all("single_gpu", [(f"{script}_{p}", script, p) for p in precisions for script in ("dual", "llava")],
                     inputs, workdir, then=[reload_run(inputs, workdir)])
    if not torch.cuda.is_available():
        single += [{"run": f"{script}_fp16", "launch": "single_gpu", "precision": "fp16", "ok": None,
                    "problem": "fp16 autocast needs CUDA"} for script in ("dual", "llava")]
    return single + fsdp, check_adapter_reload(workdir)


def print_training_table(rows: list[dict], reload: dict) -> None:
    print("\n| run | launch | distributed | precision | fell back at | last trainable layer before -> after | "
          "LR after/before | test score | s | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "fell_back_at" not in r:
            print(f"| {r['run']} | {r['launch']} | | {r['precision']} | | | | | "
                  f"{r.get('seconds', 0):.0f} | {'skipped' if r['ok'] is None else 'FAIL'}: {r['problem']} |")
            continue
        print(f"| {r['run']} | {r['launch']} | {r['distributed_type']} | {r['precision']} | "
              f"update {r['fell_back_at']} | "
              f"{r['dtype_before']} -> {r['dtype_after']} | {r['lr_ratio']:.2f} | {r['test_score']:.4g} | "
              f"{r['seconds']:.0f} | {'yes' if r['ok'] else 'FAIL'} |")
    detail = (f"max |P(Yes) difference| {reload['max_p_yes_difference']:.2e} over {reload['images']} validation images"
              if "max_p_yes_difference" in reload else reload["problem"])
    print(f"\nLLaVA adapter from the fsdp.yaml run, reloaded with --mode predict (PeftModel.from_pretrained): {detail} "
          f"-> {'ok' if reload['ok'] else 'FAIL'}")
    print("(test score: RMSE in cycles for the dual-task model, AUROC for LLaVA; tiny models, a few updates: a "
          "number that proves the run finished, not a result)")


# ----------------------------------------------------------------------------------------------
# Part 2: LoRA training throughput, this project's loop vs a WAInjectBench-style loop
# ----------------------------------------------------------------------------------------------


def llava_config(tiny: bool, tokenizer, family: str = "llava"):
    """LLaVA-1.5-7B's architecture (llava-hf/llava-1.5-7b-hf's config.json), LLaVA-NeXT-7B's
    (llava-hf/llava-v1.6-vicuna-7b-hf's: the same towers and projector, plus the anyres tile grid), or tiny ones."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    if tiny:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=64,
                      patch_size=8)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    else:
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=336, patch_size=14)
        text = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    size = vision["image_size"]
    anyres = {"image_grid_pinpoints": [[size, 2 * size], [2 * size, size], [2 * size, 2 * size], [3 * size, size],
                                       [size, 3 * size]]} if family == "llava_next" else {}
    return (LlavaNextConfig if family == "llava_next" else LlavaConfig)(
        vision_config=CLIPVisionConfig(**vision, projection_dim=768),
        text_config=LlamaConfig(**text, num_key_value_heads=text["num_attention_heads"],
                                vocab_size=len(tokenizer) if tiny else 32064,
                                max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=image_tokens,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu", **anyres,
    )


def processor_for(config, tokenizer):
    """The family's processor around the tiny model's word-level tokenizer (about one token per word, as Llama's)."""
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor

    from tools.make_tiny_llava import CHAT_TEMPLATE

    tokenizer.padding_side = "left"  # as train_llava's load_processor: the baseline reads the answer at the last column
    size = config.vision_config.image_size
    sizes = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    if config.model_type == "llava_next":
        image_processor = LlavaNextImageProcessor(**sizes, image_grid_pinpoints=config.image_grid_pinpoints)
        processor_class = LlavaNextProcessor
    else:
        image_processor, processor_class = CLIPImageProcessor(**sizes), LlavaProcessor
    return processor_class(image_processor=image_processor, tokenizer=tokenizer,
                           patch_size=config.vision_config.patch_size,
                           vision_feature_select_strategy="default", num_additional_image_tokens=1,
                           chat_template=CHAT_TEMPLATE)


def tiles_per_sample(config, inputs) -> list[int]:
    """How many tiles of each screenshot the vision tower sees: 1 for LLaVA-1.5; for LLaVA-NeXT the anyres grid that
    fits the picture's shape, plus the whole picture (the batch's padding tiles are dropped before the tower)."""
    if config.model_type != "llava_next":
        return [1] * len(inputs["input_ids"])
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            for size in inputs["image_sizes"].tolist()]


def model_flops_per_sample(config, text_tokens: int, image_tokens: int | None = None, tiles: int = 1) -> float:
    """2 x forward matmul FLOPs (see the module docstring), from the config and the sample's token counts: LLaVA-1.5
    turns a picture into one tile's patches; LLaVA-NeXT runs the vision tower and the projector on every tile
    (`tiles`), then keeps `image_tokens` of their features (the padding cut off, a newline per row added)."""
    from llava_models import used_vision_layers

    v, t = config.vision_config, config.text_config
    vision_tokens = (v.image_size // v.patch_size) ** 2 + 1  # + CLS
    vision_layers = len(used_vision_layers(config))
    vision_per_layer = 2 * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) * vision_tokens \
        + 4 * vision_tokens**2 * v.hidden_size
    patch_embed = 2 * 3 * v.patch_size**2 * v.hidden_size * (vision_tokens - 1)
    projector = 2 * (v.hidden_size * t.hidden_size + t.hidden_size**2) * (vision_tokens - 1)
    lm_tokens = (vision_tokens - 1 if image_tokens is None else image_tokens) + text_tokens
    head_dim = t.hidden_size // t.num_attention_heads
    attention_weights = t.hidden_size * head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
    lm_per_layer = 2 * (attention_weights + 3 * t.hidden_size * t.intermediate_size) * lm_tokens \
        + 4 * lm_tokens**2 * t.hidden_size
    vocabulary = 2 * t.hidden_size * t.vocab_size  # one position
    forward = tiles * (patch_embed + vision_layers * vision_per_layer + projector) \
        + t.num_hidden_layers * lm_per_layer + vocabulary
    return 2.0 * forward


def peak_tflops(name: str, given: float | None) -> float | None:
    if given:
        return given
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def build_lora_model(arm: str, config, cfg, device):
    """The same random bf16 weights for both arms (seed 0) and the same LoRA; the project arm through
    train_llava.add_lora itself (non-reentrant checkpointing), the baseline with reentrant checkpointing."""
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText

    import train_llava

    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    if arm == "project":
        return train_llava.add_lora(cfg, base)
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    base.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    return get_peft_model(base, train_llava.lora_config(cfg, base), autocast_adapter_dtype=True)


def throughput_arm(arm: str, accelerator, config, processor, samples, batch_size: int, steps: int, warmup: int,
                   num_workers: int) -> dict:
    import train_llava

    cfg = train_llava.Config(lora_dropout=0.0, gradient_checkpointing=True, num_workers=num_workers)
    model = build_lora_model(arm, config, cfg, accelerator.device)
    model.train()
    prompt = train_llava.build_prompt(processor, cfg.question)
    answer_ids = train_llava.answer_token_ids(processor.tokenizer, cfg.no_token, cfg.yes_token)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    if arm == "project":  # images decoded and processed in worker processes, ahead of the GPU
        loader = train_llava.make_loader(samples, processor, prompt, cfg.resize, batch_size, num_workers, seed=cfg.seed)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    else:  # the baseline opens and processes each batch's images in the training loop
        model, optimizer = accelerator.prepare(model, optimizer)
        loader = [list(enumerate(samples))[i:i + batch_size]
                  for i in range(0, len(samples) - batch_size + 1, batch_size)]

    def batches(loader):
        while True:
            yield from loader

    sequence_length, measured = None, []  # the timed batches' token ids, masks and image sizes
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    for step, batch in enumerate(batches(loader)):
        if step == warmup:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            start = time.perf_counter()
        if step == warmup + steps:
            break
        if arm == "baseline":
            batch = train_llava.collate(batch, processor, prompt, cfg.resize)  # in the loop, on the main process
            batch = {k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            batch["inputs"] = {k: v.to(accelerator.device) for k, v in batch["inputs"].items()}
        with accelerator.autocast():
            if arm == "project":
                logits = train_llava.answer_logits(model, batch["inputs"], answer_ids)
            else:  # every position through the vocabulary projection; the prompt is unpadded, so the last is the answer
                logits = model(**batch["inputs"], use_cache=False).logits[:, -1, answer_ids]
        loss = train_llava.detector_loss(logits, batch["labels"], batch["valid"], None)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sequence_length = batch["inputs"]["input_ids"].shape[1]
        if step >= warmup:  # counted after the clock stops: reading them now would sync with the GPU every step
            measured.append({k: v for k, v in batch["inputs"].items()
                             if k in ("input_ids", "attention_mask", "image_sizes")})
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"{arm}: the loss is {loss.item()}")
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    del model, optimizer, loader
    accelerator.free_memory()  # drops the accelerator's references to this arm's model, then empties the cache
    counts = []  # (text tokens, image tokens, tiles) of each timed screenshot
    for inputs in measured:
        image = (inputs["input_ids"] == config.image_token_id).sum(1).tolist()
        counts += [(real - i, i, n) for real, i, n in zip(inputs["attention_mask"].sum(1).tolist(), image,
                                                            tiles_per_sample(config, inputs))]
    flops = sum(model_flops_per_sample(config, text, image, tiles) for text, image, tiles in counts)
    return {"arm": arm, "family": config.model_type, "batch_size": batch_size,
            "samples_per_second": steps * batch_size / seconds, "peak_gib": peak, "sequence_length": sequence_length,
            "text_tokens": sum(c[0] for c in counts) / len(counts),
            "image_tokens": sum(c[1] for c in counts) / len(counts), "model_tflops": flops / seconds / 1e12}


FAMILY_NAMES = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT"}  # part 2's architectures


def throughput(tiny: bool, family: str, workdir: Path, args) -> list[dict]:
    from accelerate import Accelerator

    import train_llava
    from tools.make_synthetic_screenshots import make_dataset
    from tools.make_tiny_llava import build_tokenizer

    tokenizer = build_tokenizer()  # word-level: about one token per word of the question, as Llama's tokenizer
    config = llava_config(tiny, tokenizer, family)
    processor = processor_for(config, tokenizer)
    folder = workdir / "throughput_screenshots"  # the same screenshots for every family
    data = folder if folder.exists() else make_dataset(folder, {"train": args.batch_size * 4}, seed=1)
    samples, _ = train_llava.load_samples(str(data / "train.jsonl"), skip_bad=False)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16")
    rows = [throughput_arm(arm, accelerator, config, processor, samples, args.batch_size, args.steps, args.warmup,
                           args.num_workers) for arm in ("project", "baseline")]
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_tflops(name, args.peak_tflops) if torch.cuda.is_available() else None
    for row in rows:
        row |= {"device": name, "mfu": row["model_tflops"] / peak if peak else None, "peak_tflops": peak}
    return rows


def print_throughput_table(rows: list[dict], tiny: bool) -> None:
    project, baseline = rows
    family = FAMILY_NAMES[project["family"]]
    what = f"a tiny {family} (CPU)" if tiny else f"{family}-7B architecture, random weights"
    print(f"\nLoRA training throughput, {what}, device {project['device']}, batch {project['batch_size']}, "
          f"{project['text_tokens'] + project['image_tokens']:.0f} tokens per sample ({project['image_tokens']:.0f} "
          f"image, mean), padded batches of up to {project['sequence_length']} tokens:")
    print("| loop | samples/s | peak GPU memory (GiB) | model TFLOP/s | MFU |")
    print("|---|---|---|---|---|")
    for r in rows:
        memory = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"| {r['arm']} | {r['samples_per_second']:.2f} | {memory} | {r['model_tflops']:.3g} | {mfu} |")
    speedup = project["samples_per_second"] / baseline["samples_per_second"]
    memory = (project["peak_gib"] / baseline["peak_gib"]) if project["peak_gib"] else None
    print(f"project / baseline: {speedup:.2f}x samples/s (target >= 1.3x)"
          + (f", {memory:.2f}x peak memory (target <= 0.7x)" if memory else "")
          + (f", MFU {100 * project['mfu']:.1f}% (target >= 40%; peak {project['peak_tflops']:g} TFLOP/s bf16 dense)"
             if project["mfu"] is not None else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on whatever device there is (CPU: ~1 minute)")
    parser.add_argument("--skip_throughput", action="store_true", help="only part 1, the training checks")
    parser.add_argument("--families", nargs="+", default=list(FAMILY_NAMES), choices=list(FAMILY_NAMES),
                        help="throughput: the architectures to measure (default: both)")
    parser.add_argument("--batch_size", type=int, default=8, help="throughput: screenshots per step")
    parser.add_argument("--steps", type=int, default=None,
                        help="throughput: measured steps per arm (default 10; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="throughput: steps before the clock starts (default 2; tiny 1)")
    parser.add_argument("--num_workers", type=int, default=4, help="throughput: DataLoader workers of the project arm")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the GPU's peak dense bf16 TFLOP/s, if its "
                        "name is not in the built-in table")
    parser.add_argument("--json", default=None, help="also write every row of both tables to this JSON file")
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder, removed)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a plan of runs, inside accelerate launch
    args = parser.parse_args()
    if args.child:
        run_child(args.child)
        return 0
    if not args.tiny and not torch.cuda.is_available():
        print("error: no CUDA device; run with --tiny for the CPU version of every check", file=sys.stderr)
        return 2
    args.steps = args.steps or (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    if args.tiny:
        args.num_workers = min(args.num_workers, 1)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    if args.workdir and workdir.exists() and any(workdir.iterdir()):
        print(f"error: --workdir {workdir} is not empty; pass a new or empty folder", file=sys.stderr)
        return 2
    workdir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"gpu_check on {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{'tiny' if args.tiny else 'full'} mode")
    try:
        start = time.perf_counter()
        rows, reload = training_checks(workdir)
        print_training_table(rows, reload)
        print(f"part 1: {time.perf_counter() - start:.0f} s")
        ok = all(r["ok"] is not False for r in rows) and reload["ok"]
        speed = {}
        if not args.skip_throughput:
            start = time.perf_counter()
            for family in args.families:
                speed[family] = throughput(args.tiny, family, workdir, args)
                print_throughput_table(speed[family], args.tiny)
            print(f"part 2: {time.perf_counter() - start:.0f} s")
        if args.json:  # "throughput": LLaVA-1.5's two arms; "throughput_llava_next": LLaVA-NeXT's
            Path(args.json).write_text(json.dumps({"device": device, "training": rows, "adapter_reload": reload,
                                                   "throughput": speed.get("llava", []),
                                                   "throughput_llava_next": speed.get("llava_next", []), "ok": ok},
                                                  indent=1))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
