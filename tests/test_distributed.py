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


# Each helper script ends like this: the gloo group is destroyed, then the process leaves without the
# interpreter's C++ teardown, where PyTorch's gloo backend now and then aborts after all the work is done
# ("terminate called without an active exception", SIGABRT; about 1 run in 50 here, and once in CI).
END_OF_SCRIPT = """
accelerator.end_training()
os._exit(0)
"""

GUARD_SCRIPT = '''
import json, os, sys, torch
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
with open(sys.argv[1] + f"/rank{accelerator.process_index}.json", "w") as f:
    json.dump({"report": report, "lr_scale": guard.lr_scale,
               "weights": [p.detach().sum().item() for p in model.parameters()]}, f)
''' + END_OF_SCRIPT


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


FSDP2_SCRIPT = '''
"""Each rank: a model sharded with FSDP2's fully_shard on a 2-process gloo mesh, next to an unsharded copy."""
import json, os, sys
from pathlib import Path
import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from common.ema import EMA
from common.guard import NonFiniteGuard

accelerator = Accelerator(cpu=True)
rank, out = accelerator.process_index, Path(sys.argv[1])
mesh = init_device_mesh("cpu", (accelerator.num_processes,))


def make(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def shard(model):
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full(tensors, like):  # gather local shards (or DTensors) into full tensors, for comparison
    return [DTensor.from_local(t, p.device_mesh, p.placements).full_tensor() if not isinstance(t, DTensor)
            else t.full_tensor() for t, p in zip(tensors, like)]


reference, sharded = make(0), shard(make(0))
params = list(sharded.parameters())
assert all(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in params[::2])  # really sharded
opt_ref = torch.optim.AdamW(reference.parameters(), lr=0.05, fused=True)
opt = torch.optim.AdamW(params, lr=0.05, fused=True)
ema_ref, ema = EMA(reference.parameters(), decay=0.9), EMA(params, decay=0.9)
guard = NonFiniteGuard(accelerator, sharded, opt)
torch.manual_seed(1)
report = []
for step in range(5):
    x = torch.randn(6, 8)  # the same batch on both ranks, so the sharded model must follow the reference
    loss = sharded(x).square().mean()
    if step == 2 and rank == 1:
        loss = loss * float("nan")  # on one rank only
    loss.backward()
    reference(x).square().mean().backward()
    norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
    norm_ref = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    guard.record_loss(loss)
    finite = bool(guard.mask_nonfinite_update(norm))
    before = [p.full_tensor().clone() for p in params]
    opt.step()
    if step != 2:
        opt_ref.step()  # the reference simply leaves out the update the guard must skip
    opt.zero_grad()
    opt_ref.zero_grad()
    ema.update()
    ema_ref.update()
    report.append({
        "finite": finite,
        "changed": any(not torch.equal(b, p.full_tensor()) for b, p in zip(before, params)),
        "norm_matches": step == 2 or torch.allclose(norm.full_tensor(), norm_ref, rtol=1e-5),
        "weights_match": all(torch.allclose(p.full_tensor(), r, atol=1e-6) for p, r in zip(params, reference.parameters())),
        "ema_matches": all(torch.allclose(e, r, atol=1e-6) for e, r in zip(full(ema.shadow, params), ema_ref.shadow)),
    })
fell_back = guard.poll(5)

# Swap the average in for evaluation and back out, on the shards.
training_weights = [p.full_tensor().clone() for p in params]
with ema.swapped_in():
    swapped_is_ema = all(torch.equal(p.full_tensor(), e) for p, e in zip(params, full(ema.shadow, params)))
    with torch.no_grad(), ema_ref.swapped_in():
        eval_matches = torch.allclose(sharded(torch.ones(2, 8)), reference(torch.ones(2, 8)), atol=1e-6)
restored = all(torch.equal(p.full_tensor(), w) for p, w in zip(params, training_weights))

# Save and load: the sharded state dict with torch.distributed.checkpoint, the EMA shards per rank,
# and the gathered full state dict (every rank takes part; rank 0 would write it).
dcp.save(sharded.state_dict(), checkpoint_id=str(out / "dcp"))
torch.save(ema.state_dict(), out / f"ema_rank{rank}.pt")
fresh = shard(make(123))
state = fresh.state_dict()
dcp.load(state, checkpoint_id=str(out / "dcp"))
fresh.load_state_dict(state)
fresh_ema = EMA(fresh.parameters(), decay=0.9)
fresh_ema.load_state_dict(torch.load(out / f"ema_rank{rank}.pt", weights_only=True))
gathered = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
result = {
    "report": report, "fell_back": fell_back, "lr_scale": guard.lr_scale,
    "swapped_is_ema": swapped_is_ema, "eval_matches": eval_matches, "restored": restored,
    "loaded_weights_equal": all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(fresh.parameters(), params)),
    "loaded_ema_equal": all(torch.equal(a, b) for a, b in zip(fresh_ema.shadow, ema.shadow)),
    "gathered_equals_reference": rank != 0 or all(torch.allclose(gathered[k], v, atol=1e-6)
                                                  for k, v in reference.state_dict().items()),
    "local_shard_sizes": [p.to_local().numel() for p in params],
}
(out / f"rank{rank}.json").write_text(json.dumps(result))
''' + END_OF_SCRIPT


def test_fsdp2_shards_ema_guard_clipping_and_state_dicts_match_the_unsharded_computation(tmp_path):
    script = tmp_path / "fsdp2_helpers.py"
    script.write_text(FSDP2_SCRIPT)
    run([*launch(), "--config_file", "accelerate_configs/ddp.yaml", str(script), str(tmp_path)])
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["local_shard_sizes"] != [] and sum(rank0["local_shard_sizes"]) + sum(rank1["local_shard_sizes"]) == 8 * 16 + 16 + 16 * 4 + 4
    for rank in (rank0, rank1):
        assert [r["finite"] for r in rank["report"]] == [True, True, False, True, True]  # the NaN on rank 1 only
        assert [r["changed"] for r in rank["report"]] == [True, True, False, True, True]  # skipped on both ranks
        assert all(r["norm_matches"] and r["weights_match"] and r["ema_matches"] for r in rank["report"])
        assert rank["fell_back"] is True and rank["lr_scale"] == 0.5
        assert rank["swapped_is_ema"] and rank["eval_matches"] and rank["restored"]
        assert rank["loaded_weights_equal"] and rank["loaded_ema_equal"] and rank["gathered_equals_reference"]


ADAPTER_SCRIPT = '''
"""Each rank: a LoRA model sharded with FSDP2; every rank gathers the adapter, rank 0 writes it."""
import json, os, sys
from pathlib import Path
import torch
from accelerate import Accelerator
from peft import LoraConfig, PeftModel, get_peft_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from common.checkpoint import gathered_trainable_state

accelerator = Accelerator(cpu=True)
out = Path(sys.argv[1])


def make_base():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def make():
    return get_peft_model(make_base(), LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))


reference, model = make(), make()
mesh = init_device_mesh("cpu", (accelerator.num_processes,))
for layer in (model.base_model.model[0], model.base_model.model[2]):
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
state = gathered_trainable_state(accelerator, model)  # every rank
if accelerator.is_main_process:
    model.save_pretrained(out / "adapter", state_dict=state)
accelerator.wait_for_everyone()
expected = {n: p for n, p in reference.named_parameters() if p.requires_grad}
reloaded = PeftModel.from_pretrained(make_base(), out / "adapter")
x = torch.randn(3, 8)
(out / f"rank{accelerator.process_index}.json").write_text(json.dumps({
    "keys_match": sorted(state) == sorted(expected),
    "values_match": all(torch.equal(state[n], expected[n].detach()) for n in expected),
    "reloaded_matches": torch.allclose(reloaded(x), reference(x)) and not torch.allclose(make_base()(x), reference(x)),
    "sharded": any(p.to_local().numel() < p.numel() for p in model.parameters() if hasattr(p, "to_local")),
}))
''' + END_OF_SCRIPT


def test_llava_adapter_is_gathered_by_every_rank_and_written_once_under_fsdp2(tmp_path):
    script = tmp_path / "adapter_fsdp2.py"
    script.write_text(ADAPTER_SCRIPT)
    run([*launch(), "--config_file", "accelerate_configs/ddp.yaml", str(script), str(tmp_path)])
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {
            "keys_match": True, "values_match": True, "reloaded_matches": True, "sharded": True}
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                         "adapter_model.safetensors"]


def test_checkpoints_are_saved_by_every_rank_written_once_and_resume_on_two_processes(tmp_path):
    ddp = [*SMALL, "--batch_size", "256", "--log_every", "1", "--checkpoint_every", "3", "--keep_checkpoints", "10"]
    out = tmp_path / "run"
    run([*launch(), "--config_file", "accelerate_configs/ddp.yaml", "train_dual_task.py", *ddp, "--max_steps", "6",
         "--output_dir", str(out)])
    checkpoint = out / "checkpoints" / "step_00000006"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "meta.json", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl",
        "train_state_rank0.pt", "train_state_rank1.pt"]  # shared state once, per-rank state per rank
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert (meta["step"], meta["num_processes"], meta["config"]["batch_size"]) == (6, 2, 256)
    assert sorted(meta["files"]) == sorted(p.name for p in checkpoint.iterdir() if p.name != "meta.json")  # every rank's
    assert (out / "checkpoints" / "LATEST").read_text() == "step_00000006"
    assert not list((out / "checkpoints").glob(".tmp*"))
    run([*launch(), "--config_file", "accelerate_configs/ddp.yaml", "train_dual_task.py", *ddp, "--max_steps", "9",
         "--output_dir", str(out), "--resume_from", "latest"])
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["optimizer_steps"] == 9 and resumed["num_processes"] == 2
    assert [r["step"] for r in steps(out)] == list(range(1, 10))  # each step logged once, by one process
    # One process cannot continue a two-process checkpoint: a clear error, not a silent mismatch.
    proc = run([sys.executable, "train_dual_task.py", *ddp, "--max_steps", "12", "--output_dir", str(out),
                "--resume_from", "latest"], expect_ok=False)
    assert proc.returncode == 2 and "written by 2 processes; resume it with the same number of processes" in proc.stderr
