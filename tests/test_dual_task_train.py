"""End-to-end runs of train_dual_task.py on the real FD001 data with a small model (CPU, seconds each)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import train_dual_task
from train_dual_task import Config, TrainState, lr_at

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--conv_channels", "16", "--hidden_size", "16", "--gru_layers", "1", "--batch_size", "512",
         "--warmup_epochs", "1", "--log_every", "5"]


def run(tmp_path, *args, name="run"):
    AcceleratorState._reset_state(True)
    try:
        return train_dual_task.main([*SMALL, "--output_dir", str(tmp_path / name), *args])
    finally:
        AcceleratorState._reset_state(True)


def records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_two_epochs_learn_and_write_every_output(tmp_path):
    results = run(tmp_path, "--epochs", "2")
    out = tmp_path / "run"
    for key in ["test_rmse", "test_score", "best_val_rmse", "wall_seconds"]:
        assert isinstance(results[key], float) and torch.isfinite(torch.tensor(results[key]))
    saved = json.loads((out / "results.json").read_text())
    assert saved["epochs_run"] == 2 and saved["best_epoch"] in (1, 2) and saved["num_processes"] == 1
    assert saved["distributed_type"] == "NO" and saved["mixed_precision"] == "no" and saved["seed"] == 42
    assert saved["test_engines"] == 100
    # The task losses fall, and the model beats a constant guess by a wide margin (std of RUL ~ 40 cycles).
    steps = [r for r in records(out) if "train/rul_loss" in r]
    assert steps[-1]["train/rul_loss"] < 0.5 * steps[0]["train/rul_loss"]
    assert steps[-1]["train/health_loss"] < steps[0]["train/health_loss"]
    epochs = [r for r in records(out) if "val/rmse" in r]
    assert [r["epoch"] for r in epochs] == [1, 2] and epochs[-1]["val/rmse"] < 30
    assert saved["test_rmse"] < 30
    # Outputs: the resolved config, the best weights as the only top-level safetensors, plots, a checkpoint.
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 2
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    weights = load_file(out / "model.safetensors")
    assert "rul_head.3.weight" in weights and all(torch.isfinite(w).all() for w in weights.values())
    assert (out / "training_curves.png").stat().st_size > 10_000 and (out / "test_predictions.png").is_file()
    assert (out / "checkpoints" / "LATEST").read_text().startswith("step_")


def test_resume_from_latest_continues_the_run(tmp_path):
    first = run(tmp_path, "--epochs", "1", "--checkpoint_every", "10", name="resumed")
    steps_per_epoch = first["optimizer_steps"]
    resumed = run(tmp_path, "--epochs", "2", "--checkpoint_every", "10", "--resume_from", "latest", name="resumed")
    assert resumed["optimizer_steps"] == 2 * steps_per_epoch and resumed["epochs_run"] == 2
    assert [r["epoch"] for r in records(tmp_path / "resumed") if "val/rmse" in r] == [1, 2]

    # Mid-epoch: stop at step 12 (checkpoint at 10), resume to the end of epoch 1.
    run(tmp_path, "--epochs", "1", "--checkpoint_every", "10", "--max_steps", "12", name="mid")
    assert (tmp_path / "mid" / "checkpoints" / "LATEST").read_text().strip() == "step_00000012"
    mid = run(tmp_path, "--epochs", "1", "--resume_from", "latest", name="mid")
    assert mid["optimizer_steps"] == steps_per_epoch and mid["epochs_run"] == 1
    logged = [r["step"] for r in records(tmp_path / "mid") if "train/loss" in r]
    assert logged == sorted(set(logged))  # no step logged twice after the resume


def test_refuses_to_mix_a_new_run_into_an_old_output_dir(tmp_path):
    run(tmp_path, "--max_steps", "10", "--report_to", "tensorboard", name="taken")
    assert list((tmp_path / "taken").rglob("events.out.tfevents*")), "tensorboard logs missing"
    with pytest.raises(train_dual_task.UserError, match="already holds a run"):
        run(tmp_path, "--max_steps", "2", name="taken")
    assert (tmp_path / "taken" / "results.json").is_file()  # nothing of the old run was touched
    run(tmp_path, "--max_steps", "2", "--overwrite", "true", name="taken")


def test_nan_in_training_falls_back_to_fp32_and_backs_off_the_lr(tmp_path, monkeypatch):
    """Inject a NaN loss at the 8th micro-batch of a bf16 run, through the real loop."""
    original = train_dual_task.AMNLLoss.__call__
    calls = {"n": 0}

    def nan_once(self, *args):
        total, parts = original(self, *args)
        calls["n"] += 1
        return (total * float("nan"), parts) if calls["n"] == 8 else (total, parts)

    monkeypatch.setattr(train_dual_task.AMNLLoss, "__call__", nan_once)
    results = run(tmp_path, "--epochs", "1", "--mixed_precision", "bf16", "--log_every", "1", name="nan")
    assert results["fell_back_to_fp32_at_step"] == 8 and results["mixed_precision"] == "bf16"
    assert torch.isfinite(torch.tensor(results["test_rmse"]))
    logged = {r["step"]: r for r in records(tmp_path / "nan") if "train/lr" in r and "epoch" not in r}
    cfg = Config(warmup_epochs=1, batch_size=512)
    steps_per_epoch, total = results["optimizer_steps"], results["optimizer_steps"]
    schedule = [lr_at(s, cfg, TrainState(), steps_per_epoch, total, 1.0) for s in range(total)]
    # The LR logged at step s is the one its update used: schedule(s - 1); from step 9 on, halved.
    assert logged[8]["train/lr"] == pytest.approx(schedule[7])
    for step in range(9, total + 1):
        assert logged[step]["train/lr"] == pytest.approx(0.5 * schedule[step - 1]), step
    assert torch.isnan(torch.tensor(logged[8]["train/loss"]))  # the event is visible in the log


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "1", "--lrr", "0.1"], "error: unknown config key 'lrr' in the command line (did you mean 'lr'?)"),
        (["--data_dir", "/nonexistent/cmapss"], "error: data folder /nonexistent/cmapss not found"),
        (["--epochs", "many"], "error: config key 'epochs' expects int, got 'many'"),
        (["--mixed_precision", "fp16"], "error: --mixed_precision fp16 needs a GPU"),
    ],
)
def test_bad_input_exits_with_one_clear_line(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "train_dual_task.py", "--output_dir", str(tmp_path / "x"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in proc.stderr


def test_kill_9_mid_epoch_then_resume_gives_bit_identical_weights(tmp_path):
    """A hard kill after a mid-epoch checkpoint loses nothing: RNG, sampler position, EMA, AMNL, guard restored."""
    import signal
    import time

    from common.checkpoint import find_latest_checkpoint

    args = [*SMALL, "--epochs", "2", "--checkpoint_every", "7"]
    script = [sys.executable, "train_dual_task.py"]
    subprocess.run([*script, *args, "--output_dir", str(tmp_path / "full")], cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*script, *args, "--output_dir", str(killed)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        latest = find_latest_checkpoint(killed)
        if latest is not None and json.loads((latest / "meta.json").read_text())["step"] >= 35:
            break  # in the second epoch, mid-way
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"
    subprocess.run([*script, *args, "--output_dir", str(killed), "--resume_from", "latest"], cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    full, resumed = load_file(tmp_path / "full" / "model.safetensors"), load_file(killed / "model.safetensors")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    a, b = (json.loads((p / "results.json").read_text()) for p in (tmp_path / "full", killed))
    assert a["test_rmse"] == b["test_rmse"] and a["best_val_rmse"] == b["best_val_rmse"]


def test_no_host_sync_per_training_step(tmp_path, monkeypatch):
    """Host syncs (.item(), float(t), .cpu(), ...) happen at log intervals and epoch ends, never per step.

    Counted over whole runs of 10 and 20 optimizer steps with no log interval in between: any
    per-step sync would add 10 to the count.
    """
    counts = {"n": 0}
    for name in ["item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"]:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    syncs = []
    for steps in (10, 20):
        counts["n"] = 0
        run(tmp_path, "--max_steps", str(steps), "--log_every", "1000", name=f"steps{steps}")
        syncs.append(counts["n"])
    assert syncs[0] == syncs[1], f"host syncs grow with the number of steps: {syncs}"
