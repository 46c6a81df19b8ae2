"""The benchmark scripts run end to end and print their tables (tiny settings: this checks they work, not speed)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_accuracy_bench_prints_a_table_row_per_subset(tmp_path, small_cmapss):
    proc = subprocess.run(
        [sys.executable, "bench/accuracy.py", "--subsets", "FD001", "--seeds", "1", "2", "--output_dir", str(tmp_path),
         "--extra", "--epochs", "1", "--batch_size", "1024", "--conv_channels", "8", "--hidden_size", "8",
         "--gru_layers", "1", "--data", f"{small_cmapss}/FD001"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    header, rule, row = proc.stdout.strip().splitlines()[-3:]
    assert header.startswith("| subset | seeds | folds | test RMSE |") and "peak memory (MB)" in header
    cells = [c.strip() for c in row.strip("|").split("|")]
    folds = yaml.safe_load((REPO / "configs" / "fd001.yaml").read_text()).get("folds", 1)  # the shipped config's
    assert cells[:3] == ["FD001", "2", str(folds)] and len(cells) == len(header.strip("|").split("|"))
    assert all("±" in c for c in cells[3:6])  # mean ± std over the two seeds
    runs = [json.loads((tmp_path / f"FD001_seed{seed}" / "results.json").read_text()) for seed in (1, 2)]
    one_model = sum(r.get("fold_test_rmse_mean", r["test_rmse"]) for r in runs) / 2  # the 'one model' column's mean
    assert cells[5].startswith(f"{one_model:.2f} ±")


def test_overhead_bench_prints_the_ratio():
    proc = subprocess.run([sys.executable, "bench/overhead.py", "--steps", "3", "--rounds", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=True)
    ratio = float(proc.stdout.split("overhead ratio (full / bare):")[1].split()[0])
    assert 0.2 < ratio < 20


def test_threads_bench_prints_a_row_per_setting(small_cmapss):
    proc = subprocess.run([sys.executable, "bench/threads.py", "--threads", "1", "--epochs", "1", "--extra", "--data",
                           f"{small_cmapss}/FD001", "--conv_channels", "8", "--hidden_size", "8", "--gru_layers", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 1 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["alone", "busy"]
    assert all(float(row.split("|")[4].replace(",", "")) > 0 for row in rows)


def test_gpu_check_tiny_runs_every_check_a_cpu_can_and_reports_them(tmp_path):
    """`bench/gpu_check.py --tiny`: the scripts under single_gpu.yaml and fsdp.yaml (1 process) each fall back to
    fp32 at the forced NaN with the LR halved and finish; the LLaVA adapter reloads to the same P(Yes); both
    throughput arms run. fp16 is listed as skipped on a CPU."""
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--tiny", "--json", str(tmp_path / "check.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| dual_fsdp | fsdp x1 | FSDP | bf16 | update 3 | bfloat16 -> float32 | 0.50 |" in proc.stdout
    report = json.loads((tmp_path / "check.json").read_text())
    rows = {r["run"]: r for r in report["training"]}
    assert set(rows) == {f"{s}_{p}" for s in ("dual", "llava") for p in ("bf16", "fp16", "fsdp")}
    for name in ("dual_bf16", "llava_bf16", "dual_fsdp", "llava_fsdp"):
        r = rows[name]
        assert (r["ok"], r["fell_back_at"], r["dtype_before"], r["dtype_after"]) == (True, 3, "bfloat16", "float32"), r
        assert r["lr_ratio"] == pytest.approx(0.5) and math.isfinite(r["test_score"])
    assert rows["dual_fp16"]["ok"] is None and rows["llava_fp16"]["ok"] is None  # skipped, not failed
    assert (rows["dual_fsdp"]["distributed_type"], rows["llava_bf16"]["distributed_type"]) == ("FSDP", "NO")
    # One FSDP process with a bf16 base: Accelerate keeps the trainable LoRA weights in fp32 (until the fallback
    # upcasts the base too).
    assert rows["llava_fsdp"]["weight_dtypes"]["lora_dtype"] == "float32"
    assert report["adapter_reload"]["ok"] and report["adapter_reload"]["max_p_yes_difference"] < 1e-4
    assert report["adapter_reload"]["images"] == 16
    project, baseline = report["throughput"]
    assert (project["arm"], baseline["arm"]) == ("project", "baseline")
    assert project["samples_per_second"] > 0 and baseline["samples_per_second"] > 0
    assert project["sequence_length"] == baseline["sequence_length"] == 64 + project["text_tokens"]
    assert report["ok"] is True


def test_gpu_check_flop_formula_matches_pytorchs_flop_counter():
    """The MFU's model FLOPs: 2 x the forward's matmul FLOPs, as PyTorch's FlopCounterMode counts them for a
    forward that computes the vocabulary projection at the answer position only."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlavaForConditionalGeneration

    import train_llava
    from bench.gpu_check import llava_config, model_flops_per_sample
    from tools.make_tiny_llava import build_tokenizer

    tokenizer = build_tokenizer()
    config = llava_config(tiny=True, tokenizer=tokenizer)
    config.vision_feature_layer = -1  # every vision layer feeds the language model (else the last one runs unused)
    # Eager attention: its two batched matmuls are counted (the CPU's fused attention kernel is not).
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    text_tokens = 20
    image_token, image_tokens = config.image_token_index, config.image_seq_length
    input_ids = torch.tensor([[2] + [image_token] * image_tokens + [7] * (text_tokens - 1)])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "pixel_values": torch.randn(1, 3, config.vision_config.image_size, config.vision_config.image_size)}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        train_llava.answer_logits(model, inputs, [4, 5])
    assert model_flops_per_sample(config, text_tokens) == 2 * counter.get_total_flops()
