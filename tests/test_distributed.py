"""Two gloo processes on the CPU (`accelerate launch` with accelerate_configs/ddp.yaml): one model, not two."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch():
    # A fresh rendezvous port per launch: back-to-back runs on the default port can collide.
    return [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port())]
SMALL = ["--conv_channels", "16", "--hidden_size", "16", "--gru_layers", "1", "--warmup_epochs", "1", "--overwrite", "true"]

pytestmark = pytest.mark.multiprocess


def run(cmd, expect_ok=True):
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # scripts written to tmp_path import common/ too
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def steps(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    common = [*SMALL, "--dropout", "0", "--max_steps", "12", "--log_every", "1"]
    run([sys.executable, "train_dual_task.py", *common, "--batch_size", "512", "--output_dir", str(tmp_path / "one")])
    run([*launch(), "--config_file", "accelerate_configs/ddp.yaml", "train_dual_task.py", *common,
         "--batch_size", "256", "--output_dir", str(tmp_path / "two")])
    one, two = json.loads((tmp_path / "one" / "results.json").read_text()), json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["num_processes"] == 2 and two["distributed_type"] == "MULTI_CPU"
    assert one["num_processes"] == 1 and one["distributed_type"] == "NO"
    assert one["optimizer_steps"] == two["optimizer_steps"] == 12
    # Same samples per update; losses agree to 1e-3 relative (the RUL loss to 3e-3) (each rank averages its own half, and the
    # failure-weighted MSE is a ratio of means, so the halves do not combine exactly).
    for a, b in zip(steps(tmp_path / "one"), steps(tmp_path / "two"), strict=True):
        assert a["step"] == b["step"] and a["train/lr"] == b["train/lr"]
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-3)
        assert b["train/rul_loss"] == pytest.approx(a["train/rul_loss"], rel=3e-3)
    assert two["test_rmse"] == pytest.approx(one["test_rmse"], abs=0.01)


def test_evaluation_counts_every_sample_once_with_an_uneven_split(tmp_path):
    # FD002 has 259 test engines: one process gets a padded batch, gather_for_metrics drops the copy.
    run([*launch(), "--config_file", "accelerate_configs/ddp.yaml", "train_dual_task.py", *SMALL,
         "--subset", "FD002", "--max_steps", "2", "--output_dir", str(tmp_path / "fd002")])
    results = json.loads((tmp_path / "fd002" / "results.json").read_text())
    assert results["test_engines"] == 259 and results["num_processes"] == 2


GUARD_SCRIPT = '''
import json, sys, torch
from accelerate import Accelerator
from common.guard import NonFiniteGuard
accelerator = Accelerator(cpu=True, mixed_precision="bf16")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
model, optimizer = accelerator.prepare(model, optimizer)
guard = NonFiniteGuard(accelerator, model, optimizer)
dtypes = []
accelerator.unwrap_model(model)[0].register_forward_hook(lambda m, i, o: dtypes.append(str(o.dtype)))
report = []
for step in range(1, 4):
    with accelerator.autocast():
        loss = model(torch.randn(8, 4)).float().pow(2).mean()
    if step == 2 and accelerator.process_index == 1:
        loss = loss * float("nan")  # only rank 1 sees a NaN
    before = [p.detach().clone() for p in model.parameters()]
    accelerator.backward(loss)
    guard.record_loss(loss)
    finite = guard.mask_nonfinite_update(accelerator.clip_grad_norm_(model.parameters(), 1.0))
    optimizer.step()
    optimizer.zero_grad()
    fell_back = guard.poll(step)
    changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    report.append({"finite": bool(finite), "changed": changed, "fell_back": fell_back, "dtype": dtypes[-1]})
json.dump({"report": report, "lr_scale": guard.lr_scale,
           "weights": [p.detach().sum().item() for p in model.parameters()]},
          open(sys.argv[1] + f"/rank{accelerator.process_index}.json", "w"))
'''


def test_a_nan_on_one_rank_makes_every_rank_skip_and_fall_back_together(tmp_path):
    script = tmp_path / "guard_ddp.py"
    script.write_text(GUARD_SCRIPT)
    run([*launch(), "--config_file", "accelerate_configs/ddp.yaml", str(script), str(tmp_path)])
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1  # identical decisions, identical weights
    assert [r["finite"] for r in rank0["report"]] == [True, False, True]
    assert [r["changed"] for r in rank0["report"]] == [True, False, True]  # the NaN update skipped everywhere
    assert [r["fell_back"] for r in rank0["report"]] == [False, True, False]
    assert [r["dtype"] for r in rank0["report"]] == ["torch.bfloat16", "torch.bfloat16", "torch.float32"]
    assert rank0["lr_scale"] == 0.5


@pytest.mark.parametrize("script", ["train_dual_task.py", "train_llava.py"])
def test_fsdp_on_a_machine_without_gpus_is_refused_not_silently_ddp(tmp_path, script):
    proc = run([*launch(), "--config_file", "accelerate_configs/fsdp.yaml", script,
                "--output_dir", str(tmp_path / "out")], expect_ok=False)
    assert proc.returncode != 0
    assert "error: FSDP was requested, but Accelerate set up MULTI_CPU" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def llava_inputs(tmp_path_factory):
    from tools.make_synthetic_screenshots import make_dataset
    from tools.make_tiny_llava import build_tiny_llava

    root = tmp_path_factory.mktemp("llava")
    data = make_dataset(root / "screenshots", {"train": 32, "val": 9}, seed=0)  # 9: an uneven split over 2 ranks
    return build_tiny_llava(root / "model"), data


def llava_args(model, data, *extra):
    return ["--model", str(model), "--train_data", str(data / "train.jsonl"), "--val_data", str(data / "val.jsonl"),
            "--lora_dropout", "0", "--max_steps", "4", "--log_every", "1", "--num_workers", "0", "--num_threads", "1",
            "--grad_accum_steps", "1", "--lr", "1e-3", *map(str, extra)]


def test_llava_two_processes_train_like_one_with_the_same_global_batch(tmp_path, llava_inputs):
    model, data = llava_inputs
    run([sys.executable, "train_llava.py", *llava_args(model, data, "--batch_size", 8, "--output_dir", tmp_path / "one")])
    run([*launch(), "--config_file", "accelerate_configs/ddp.yaml", "train_llava.py",
         *llava_args(model, data, "--batch_size", 4, "--output_dir", tmp_path / "two")])
    one, two = json.loads((tmp_path / "one" / "results.json").read_text()), json.loads((tmp_path / "two" / "results.json").read_text())
    assert (one["num_processes"], one["distributed_type"]) == (1, "NO")
    assert (two["num_processes"], two["distributed_type"]) == (2, "MULTI_CPU")
    assert one["optimizer_steps"] == two["optimizer_steps"] == 4
    assert one["val_num_samples"] == two["val_num_samples"] == 9  # the padded duplicate is dropped
    # Same 8 samples per update: the mean loss of two halves of 4 equals the loss of 8 (to float rounding).
    for a, b in zip(steps(tmp_path / "one"), steps(tmp_path / "two"), strict=True):
        assert a["step"] == b["step"] and a["train/lr"] == b["train/lr"]
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4)
    assert two["val_accuracy"] == one["val_accuracy"]


def test_llava_a_corrupt_image_seen_by_one_rank_stops_every_rank(tmp_path, llava_inputs):
    """The unreadable image lands on one process; the job still ends at once with the one-line error."""
    model, data = llava_inputs
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    lines = (data / "train.jsonl").read_text().splitlines()
    records = [dict(json.loads(line), path=str(data / json.loads(line)["path"])) for line in lines]
    records[5] = {"path": str(tmp_path / "corrupt.png"), "label": 1}
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = run([*launch(), "--config_file", "accelerate_configs/ddp.yaml", "train_llava.py",
                *llava_args(model, data, "--batch_size", 4, "--train_data", manifest, "--output_dir", tmp_path / "out")],
               expect_ok=False)
    assert proc.returncode != 0
    assert "error: cannot read image" in proc.stderr and "corrupt.png" in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()
