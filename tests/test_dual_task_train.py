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
    assert saved["test_units"] == 100
    assert saved["train_samples_per_second"] > 0 and saved["peak_memory_mb"] > 0
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


def test_the_same_seed_gives_identical_metrics_and_another_seed_does_not(tmp_path):
    timing = {"wall_seconds", "peak_memory_mb", "train_samples_per_second", "train/samples_per_second"}

    def metrics(name):
        return [{k: v for k, v in r.items() if k not in timing} for r in records(tmp_path / name)]

    a, b, c = (run(tmp_path, "--max_steps", "30", "--seed", seed, name=f"{name}")
               for name, seed in [("a", "7"), ("b", "7"), ("c", "8")])
    assert metrics("a") == metrics("b") and len(metrics("a")) > 5
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert a["test_rmse"] != c["test_rmse"] and metrics("a") != metrics("c")


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


def test_resume_after_a_fallback_or_at_an_epoch_boundary_is_exact(tmp_path, monkeypatch):
    """Restarting from the checkpoint just after a NaN fallback, or at an epoch end, changes nothing."""
    import shutil

    original = train_dual_task.AMNLLoss.__call__
    calls = {"n": 0}

    def nan_at_8(self, *args):
        total, parts = original(self, *args)
        calls["n"] += 1
        return (total * float("nan"), parts) if calls["n"] == 8 else (total, parts)

    monkeypatch.setattr(train_dual_task.AMNLLoss, "__call__", nan_at_8)
    args = ["--epochs", "2", "--mixed_precision", "bf16", "--log_every", "1", "--checkpoint_every", "1",
            "--keep_checkpoints", "1000"]
    straight = run(tmp_path, *args, name="straight")
    assert straight["fell_back_to_fp32_at_step"] == 8
    steps_per_epoch = straight["optimizer_steps"] // 2
    calls["n"] = -1_000_000  # no NaN in the resumed runs: the event lies in their past
    expected = load_file(tmp_path / "straight" / "model.safetensors")
    for step in (9, steps_per_epoch, steps_per_epoch + 1):  # after the fallback; at and just after the epoch end
        name = f"from_{step}"
        checkpoint = tmp_path / "straight" / "checkpoints" / f"step_{step:08d}"
        shutil.copytree(checkpoint, tmp_path / name / "checkpoints" / checkpoint.name)
        resumed = run(tmp_path, *args, "--resume_from", "latest", name=name)
        assert resumed["fell_back_to_fp32_at_step"] == 8 and resumed["optimizer_steps"] == straight["optimizer_steps"]
        weights = load_file(tmp_path / name / "model.safetensors")
        assert all(torch.equal(expected[k], weights[k]) for k in expected), f"resumed from step {step}"
        assert resumed["test_rmse"] == straight["test_rmse"] and resumed["best_val_rmse"] == straight["best_val_rmse"]


def test_persistent_nan_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    from common.checkpoint import resolve_resume
    from common.errors import NonFiniteTrainingError, exit_on_user_error

    original = train_dual_task.AMNLLoss.__call__
    calls = {"n": 0}

    def nan_from_8_on(self, *args):
        total, parts = original(self, *args)
        calls["n"] += 1
        return (total * float("nan"), parts) if calls["n"] >= 8 else (total, parts)

    monkeypatch.setattr(train_dual_task.AMNLLoss, "__call__", nan_from_8_on)
    args = ["--epochs", "1", "--log_every", "1", "--checkpoint_every", "1", "--keep_checkpoints", "100",
            "--max_nonfinite_in_a_row", "3"]
    with pytest.raises(NonFiniteTrainingError, match=r"3 consecutive non-finite updates in fp32 \(at step 11\) "
                                                       r"after the fallback at step 8"):
        run(tmp_path, *args, name="diverged")
    out = tmp_path / "diverged"
    assert not (out / "results.json").exists() and not (out / "model.safetensors").exists()
    assert resolve_resume(out, "latest").name == "step_00000010"  # it stopped at step 11, before saving it
    weights = {step: load_file(out / f"checkpoints/step_{step:08d}/model.safetensors") for step in (6, 7, 8, 9, 10)}
    assert all(torch.isfinite(w).all() for w in weights[10].values())
    # Updates 8-10 were skipped: the weights are those of the last good update, 7 (and 7 did change them).
    for step in (8, 9, 10):
        assert all(torch.equal(weights[step][k], weights[7][k]) for k in weights[7])
    assert not all(torch.equal(weights[6][k], weights[7][k]) for k in weights[7])
    # From the command line: one line and exit code 3.
    monkeypatch.setattr(sys, "argv", ["train_dual_task.py"])
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(lambda: run(tmp_path, *args, name="diverged_cli"))
    assert exit_info.value.code == 3
    assert capsys.readouterr().err.strip().startswith("error: 3 consecutive non-finite updates in fp32")


def test_an_exception_during_evaluation_leaves_no_corrupt_output(tmp_path, monkeypatch):
    """A crash in epoch 2's validation: earlier checkpoints and logs stay valid, nothing half-written, resume works."""
    from common.checkpoint import resolve_resume

    real_evaluate = train_dual_task.evaluate
    calls = {"n": 0}

    def evaluate_that_fails_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # each validation scores all windows, then the cuts: the 3rd call is epoch 2's
            raise RuntimeError("injected failure during evaluation")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_dual_task, "evaluate", evaluate_that_fails_in_epoch_2)
    with pytest.raises(RuntimeError, match="injected failure"):
        run(tmp_path, "--epochs", "2", "--checkpoint_every", "30", name="crashed")
    out = tmp_path / "crashed"
    assert not (out / "results.json").exists() and not (out / "model.safetensors").exists()
    assert not list(out.rglob(".tmp*")) and not list(out.rglob(".*.tmp"))
    latest = resolve_resume(out, "latest")
    assert json.loads((latest / "meta.json").read_text())["step"] == 30  # in epoch 2, before its validation
    assert [r["epoch"] for r in records(out) if "val/rmse" in r] == [1]  # every line parses; epoch 2 never logged
    resumed = run(tmp_path, "--epochs", "2", "--checkpoint_every", "30", "--resume_from", "latest", name="crashed")
    assert resumed["epochs_run"] == 2 and [r["epoch"] for r in records(out) if "val/rmse" in r] == [1, 2]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "1", "--lrr", "0.1"], "error: unknown config key 'lrr' in the command line (did you mean 'lr'?)"),
        (["--data", "/nonexistent/cmapss/FD001"], "error: data folder /nonexistent/cmapss not found"),
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


EXACT_ARGS = [*SMALL, "--epochs", "2", "--checkpoint_every", "7"]
SCRIPT = [sys.executable, "train_dual_task.py"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference for the interrupted runs below: the same arguments, never stopped."""
    out = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run([*SCRIPT, *EXACT_ARGS, "--output_dir", str(out)], cwd=REPO, check=True, capture_output=True,
                   timeout=300)
    return out


def start_and_wait_for_checkpoint(out: Path, min_step: int) -> subprocess.Popen:
    """Start a run and return once it has saved a checkpoint at or after `min_step`."""
    import time

    from common.checkpoint import resolve_resume

    proc = subprocess.Popen([*SCRIPT, *EXACT_ARGS, "--output_dir", str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        latest = resolve_resume(out, "latest")
        if latest is not None and json.loads((latest / "meta.json").read_text())["step"] >= min_step:
            return proc
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint at step >= {min_step}: {proc.poll()=}")


def resume_and_compare(out: Path, reference: Path) -> None:
    subprocess.run([*SCRIPT, *EXACT_ARGS, "--output_dir", str(out), "--resume_from", "latest"], cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    full, resumed = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    a, b = (json.loads((p / "results.json").read_text()) for p in (reference, out))
    assert a["test_rmse"] == b["test_rmse"] and a["best_val_rmse"] == b["best_val_rmse"]
    assert a["optimizer_steps"] == b["optimizer_steps"]


def test_kill_9_mid_epoch_then_resume_gives_bit_identical_weights(tmp_path, uninterrupted):
    """A hard kill after a mid-epoch checkpoint loses nothing: RNG, sampler position, EMA, AMNL, guard restored."""
    import signal

    proc = start_and_wait_for_checkpoint(tmp_path / "killed", min_step=35)  # in the second epoch, mid-way
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (tmp_path / "killed" / "results.json").exists(), "the run finished before it could be killed"
    resume_and_compare(tmp_path / "killed", uninterrupted)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_finishes_the_step_saves_and_exits_75_then_resumes_exactly(tmp_path, uninterrupted, signal_name):
    import signal

    from common.checkpoint import resolve_resume
    from common.preemption import EXIT_PREEMPTED

    out = tmp_path / "preempted"
    proc = start_and_wait_for_checkpoint(out, min_step=7)
    proc.send_signal(getattr(signal, signal_name))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED == 75, stderr[-2000:]
    assert f"received {signal_name}" in stderr and "Traceback" not in stderr
    assert not (out / "results.json").exists()
    # The checkpoint is of the step it stopped on (not merely the last periodic one).
    stopped_at = int(stdout.split("stopped by a signal at step ")[1].split()[0])
    assert json.loads((resolve_resume(out, "latest") / "meta.json").read_text())["step"] == stopped_at >= 7
    resume_and_compare(out, uninterrupted)


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


def test_val_metric_picks_the_best_epoch_and_stops_early_on_its_own_score(tmp_path, small_cmapss):
    """Both validation scores are logged every epoch; --val_metric alone decides the best epoch and early stopping.
    The same seed trains the same model either way until a stop."""
    by_metric = {}
    for metric, key in (("windows", "val/rmse"), ("cut", "val/rmse_cut")):
        results = run(tmp_path, "--data", f"{small_cmapss}/FD001", "--batch_size", "64", "--epochs", "5",
                      "--lr", "3e-3", "--val_metric", metric, "--early_stopping_patience", "2", name=metric)
        scores = [r[key] for r in records(tmp_path / metric) if key in r]
        best = min(range(len(scores)), key=scores.__getitem__)
        assert results["val_metric"] == metric and results["best_val_rmse"] == scores[best]
        assert results["best_epoch"] == best + 1
        assert results["epochs_run"] == min(5, best + 1 + 2)  # early stopping after 2 epochs without a better score
        by_metric[metric] = [(r["val/rmse"], r["val/rmse_cut"]) for r in records(tmp_path / metric) if "val/rmse" in r]
    shared = min(len(by_metric["windows"]), len(by_metric["cut"]))
    assert by_metric["windows"][:shared] == by_metric["cut"][:shared]


def test_folds_train_one_model_per_engine_disjoint_fold_and_average_their_test_predictions(tmp_path, small_cmapss,
                                                                                          monkeypatch):
    """--folds 2: two models, each validated on its own half of the engines, each fold's best weights saved; the
    ensemble's test RMSE is that of the averaged predictions of the saved weights. A crash in fold 2 resumes
    with --resume_from latest to the same results."""
    from safetensors.torch import load_file

    from train_dual_task import DualTaskNet, load_splits, read_runs

    args = ["--data", f"{small_cmapss}/FD001", "--batch_size", "64", "--epochs", "2", "--folds", "2"]
    results = run(tmp_path, *args, name="straight")
    out = tmp_path / "straight"
    assert results["folds"] == 2 and [f["fold"] for f in results["per_fold"]] == [1, 2]
    val_units = [set(f["val_units"]) for f in results["per_fold"]]
    assert not val_units[0] & val_units[1] and val_units[0] | val_units[1] == set(range(1, 11))
    assert not (out / "model.safetensors").exists() and (out / "test_predictions.png").is_file()
    cfg = Config(data=f"{small_cmapss}/FD001", folds=2, conv_channels=16, hidden_size=16, gru_layers=1)
    predictions = []
    for fold in range(2):
        assert json.loads((out / f"fold_{fold + 1}" / "results.json").read_text()) == results["per_fold"][fold]
        model = DualTaskNet(num_features=15, cfg=cfg).eval()
        model.load_state_dict(load_file(out / f"fold_{fold + 1}" / "model.safetensors"))
        test = load_splits(cfg, read_runs(cfg), fold)[0]["test"]  # normalised with this fold's training units
        with torch.no_grad():
            pred = (model(test.x)[0] * cfg.rul_cap).clamp(0, cfg.rul_cap)
        assert (torch.sqrt(((pred - test.rul) ** 2).mean()).item()
                == pytest.approx(results["per_fold"][fold]["test_rmse"], rel=1e-5))
        predictions.append(pred)
    ensemble = torch.stack(predictions).mean(0)
    assert results["test_rmse"] == pytest.approx(torch.sqrt(((ensemble - test.rul) ** 2).mean()).item(), rel=1e-5)
    assert json.loads((out / "results.json").read_text())["test_rmse"] == results["test_rmse"]

    real_evaluate, calls = train_dual_task.evaluate, {"n": 0}

    def crash_in_fold_2_epoch_2(*a, **k):  # fold 1: 2 epochs x 2 validation scores + the test = 5 calls
        calls["n"] += 1
        if calls["n"] == 8:  # fold 2, epoch 2's validation: after fold 2's epoch-1 checkpoint
            raise RuntimeError("injected crash")
        return real_evaluate(*a, **k)

    monkeypatch.setattr(train_dual_task, "evaluate", crash_in_fold_2_epoch_2)
    with pytest.raises(RuntimeError, match="injected crash"):
        run(tmp_path, *args, name="crashed")
    assert not (tmp_path / "crashed" / "results.json").exists()
    monkeypatch.setattr(train_dual_task, "evaluate", real_evaluate)
    resumed = run(tmp_path, *args, "--resume_from", "latest", name="crashed")
    timing = ("wall_seconds", "train_samples_per_second", "peak_memory_mb")
    strip = lambda r: {k: v for k, v in r.items() if k not in timing}  # noqa: E731
    assert [strip(f) for f in resumed["per_fold"]] == [strip(f) for f in results["per_fold"]]
    assert resumed["test_rmse"] == results["test_rmse"]
