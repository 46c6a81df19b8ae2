"""predict_dual_task.py: a finished run used on new data, with the saved preprocessing; and the copy-and-edit path
(another run-to-failure data set, only the reading part swapped, in training and prediction alike)."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import predict_dual_task
import train_dual_task
from train_dual_task import Runs

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--conv_channels", "16", "--hidden_size", "16", "--gru_layers", "1", "--batch_size", "64",
         "--warmup_epochs", "1", "--log_every", "5"]


def run(*args):
    AcceleratorState._reset_state(True)
    try:
        return train_dual_task.main([*SMALL, *map(str, args)])
    finally:
        AcceleratorState._reset_state(True)


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def assert_same_predictions(predicted: list[dict], evaluated: list[dict]):
    assert [r["unit"] for r in predicted] == [r["unit"] for r in evaluated]
    for p, e in zip(predicted, evaluated):
        assert float(p["rul"]) == pytest.approx(float(e["rul"]), abs=2e-4)
        assert p["health_state"] == e["health_state"]
        for key in (k for k in e if k.startswith("p_state_")):
            assert float(p[key]) == pytest.approx(float(e[key]), abs=2e-6)


@pytest.mark.parametrize("folds", [1, 2])
def test_predict_on_the_test_file_reproduces_the_final_evaluation(tmp_path, small_cmapss, folds):
    """The saved preprocessing and weights give, on test_FD001.txt, the final evaluation's predictions (a fold
    ensemble: the average of its folds, each with its own normalisation)."""
    out = tmp_path / "run"
    results = run("--data", f"{small_cmapss}/FD001", "--epochs", 1, "--folds", folds, "--output_dir", out)
    model_dirs = [out] if folds == 1 else [out / "fold_1", out / "fold_2"]
    preps = [json.loads((d / "preprocessing.json").read_text()) for d in model_dirs]
    for prep in preps:  # every setting that turns raw rows into inputs, and the fitted statistics, as JSON
        assert prep["window"] == 30 and prep["rul_cap"] == 125 and prep["smoothing"] == 0.05
        assert prep["health_thresholds"] == [50, 15] and prep["cycle_feature"] is True
        assert prep["sensor_names"] == [f"sensor {s}" for s in train_dual_task.INFORMATIVE_SENSORS]
        (stats,) = prep["sensor_stats"].values()  # FD001: one operating condition
        assert len(stats["mean"]) == len(stats["std"]) == 14
    if folds == 2:  # each fold normalised with its own training units
        assert preps[0]["sensor_stats"] != preps[1]["sensor_stats"]
    evaluated = read_csv(out / "test_predictions.csv")
    rmse = np.sqrt(np.mean([(float(r["rul"]) - float(r["true_rul"])) ** 2 for r in evaluated]))
    assert len(evaluated) == 5 and rmse == pytest.approx(results["test_rmse"], abs=1e-3)

    proc = subprocess.run([sys.executable, "predict_dual_task.py", "--run_dir", str(out),
                           "--data", str(small_cmapss / "test_FD001.txt")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"RUL and health state of 5 units of {small_cmapss / 'test_FD001.txt'}" in proc.stdout
    predicted = read_csv(out / "predictions.csv")
    assert "true_rul" not in predicted[0]
    assert_same_predictions(predicted, evaluated)


def test_predict_refuses_bad_input_with_one_line_and_writes_nothing(tmp_path, small_cmapss):
    out = tmp_path / "run"
    run("--data", f"{small_cmapss}/FD001", "--max_steps", 3, "--output_dir", out)
    (out / "predictions.csv").write_text("the user's earlier predictions\n")

    def refused(*args, match):
        proc = subprocess.run([sys.executable, "predict_dual_task.py", *map(str, args)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert re.search(match, proc.stderr.strip().splitlines()[-1]), proc.stderr

    refused("--run_dir", out, match="needs a run and units; pass --run_dir .* and --data")
    refused("--run_dir", out, "--data", tmp_path / "nope.txt", "--output", tmp_path / "p.csv",
            match="missing data file .*nope.txt")
    refused("--run_dir", tmp_path / "empty", "--data", small_cmapss / "test_FD001.txt",
            match="holds no training run")
    refused("--run_dir", out, "--data", small_cmapss / "test_FD001.txt",
            match="predictions.csv exists; pass --overwrite true")
    bad = tmp_path / "bad.txt"
    bad.write_text("1 1 0.5\n")
    refused("--run_dir", out, "--data", bad, "--output", tmp_path / "p.csv", match="has 3 columns")
    (out / "preprocessing.json").unlink()
    refused("--run_dir", out, "--data", small_cmapss / "test_FD001.txt", "--output",
            tmp_path / "p.csv", match="has no model.safetensors and preprocessing.json")
    assert (out / "predictions.csv").read_text() == "the user's earlier predictions\n"
    assert not (tmp_path / "p.csv").exists()


def test_the_old_predict_mode_names_the_new_command(tmp_path):
    for flags in (["--mode", "predict"], ["--predict_data", "x.txt"], ["--predict_output", "p.csv"]):
        proc = subprocess.run([sys.executable, "train_dual_task.py", *flags, "--output_dir", str(tmp_path / "run")],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.splitlines() == [
            f"error: {flags[0]} is not a setting of this script any more; predict with python predict_dual_task.py "
            f"--run_dir RUN --data FILE"], proc.stderr
    assert not (tmp_path / "run").exists()


def test_health_states_follow_the_thresholds_and_phm08_can_be_switched_off(tmp_path, small_cmapss, capsys):
    out = tmp_path / "run"
    results = run("--data", f"{small_cmapss}/FD001", "--max_steps", 3, "--health_thresholds", "100,60,30,10",
                  "--phm08", "false", "--output_dir", out)
    assert load_file(out / "model.safetensors")["health_head.3.weight"].shape[0] == 5  # four thresholds: five states
    assert results["test_score"] is None and "PHM08" not in capsys.readouterr().out
    assert len([k for k in read_csv(out / "test_predictions.csv")[0] if k.startswith("p_state_")]) == 5


# ----------------------------------------------------------------------------------------------
# Copy and edit: another run-to-failure data set (a CSV of pumps, 6 sensors), only read_runs replaced
# ----------------------------------------------------------------------------------------------

PUMP_SENSORS = ["temperature", "pressure", "vibration", "current", "flow", "speed"]


def write_pump_csv(path: Path, units: int = 60, seed: int = 0) -> None:
    """unit,cycle,<6 sensors>: each pump runs to failure; four sensors drift as it wears, two are noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for unit in range(1, units + 1):
        life = int(rng.integers(60, 140))
        wear = np.linspace(0, 1, life) ** 2
        drift = np.array([3.0, -2.0, 4.0, 1.5, 0.0, 0.0])
        for cycle in range(1, life + 1):
            rows.append([unit, cycle, *(50 + drift * wear[cycle - 1] + rng.normal(0, 0.3, 6))])
    with path.open("w") as f:
        f.write(",".join(["unit", "cycle", *PUMP_SENSORS]) + "\n")
        f.writelines(",".join(f"{v:g}" for v in row) + "\n" for row in rows)


def read_pump_runs(cfg, predict_file=None) -> dict[str, Runs]:
    """What a user writes in place of read_runs: their file format, their names; --data and --sensors mean
    "the CSV" and "its sensor columns, numbered from 1". Pumps 51-60 are stopped early to test on."""
    table = np.loadtxt(predict_file or cfg.data, delimiter=",", skiprows=1)
    names = [PUMP_SENSORS[s - 1] for s in cfg.sensors]
    unit, cycle, sensors = table[:, 0].astype(np.int64), table[:, 1], table[:, [1 + s for s in cfg.sensors]]
    last = {u: cycle[unit == u].max() for u in np.unique(unit)}
    rul = np.array([last[u] for u in unit]) - cycle

    def runs(rows, rul):
        return Runs("pump fleet", names, unit[rows], cycle[rows], np.zeros(rows.sum(), np.int64), sensors[rows], rul)

    if predict_file is not None:
        return {"predict": runs(np.ones(len(unit), bool), np.full(len(unit), np.nan))}
    stop = {u: int(0.6 * last[u]) for u in range(51, 61)}  # test pumps observed up to 60% of their life
    test_rows = np.isin(unit, list(stop)) & (cycle <= np.array([stop.get(u, 0) for u in unit]))
    return {"train": runs(unit <= 50, rul[unit <= 50]), "test": runs(test_rows, rul[test_rows])}


def test_copy_and_edit_another_data_set_by_replacing_only_the_reader(tmp_path, monkeypatch, capsys):
    data = tmp_path / "pumps.csv"
    write_pump_csv(data)
    monkeypatch.setattr(train_dual_task, "read_runs", read_pump_runs)
    out = tmp_path / "run"
    results = run("--data", data, "--sensors", "1,2,3,4,5,6", "--window", 20, "--rul_cap", 80,
                  "--health_thresholds", "40,10", "--phm08", "false", "--epochs", 3, "--lr", "3e-3",
                  "--output_dir", out)
    console = capsys.readouterr().out

    # The records describe the pumps, not C-MAPSS.
    saved = "".join((out / name).read_text() for name in ("results.json", "config.yaml", "preprocessing.json"))
    for word in ("C-MAPSS", "FD00", "cmapss", "sensor 2", "engine"):
        assert word not in saved and word not in console, word
    assert results["data"] == "pump fleet" and results["test_units"] == 10 and results["test_score"] is None
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"] == str(data) and config["sensors"] == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "preprocessing.json").read_text())["sensor_names"] == PUMP_SENSORS
    assert "pump fleet: " in console and "inputs: temperature, pressure, vibration, current, flow, speed" in console
    # It learned: better than always guessing the mean RUL of the test pumps.
    rows = read_csv(out / "test_predictions.csv")
    true = np.array([float(r["true_rul"]) for r in rows])
    assert results["test_rmse"] < 0.8 * np.sqrt(np.mean((true - true.mean()) ** 2))

    # Predict with the same reader: the whole CSV, each pump's last cycle.
    written = predict_dual_task.main(["--run_dir", str(out), "--data", str(data)])
    predicted = read_csv(written)
    assert [int(r["unit"]) for r in predicted] == list(range(1, 61))
    assert all(0 <= float(r["rul"]) <= 80 for r in predicted)
    assert torch.tensor([float(r["rul"]) for r in predicted[:50]]).mean() < 20  # the training pumps ran to failure


def test_every_file_a_run_and_its_prediction_write_follows_the_umask(tmp_path, small_cmapss):
    """safetensors creates its files 0600; the run's model.safetensors and each checkpoint's must end with the mode
    every other output has (the umask's), so a teammate who can read results.json can load the model too."""
    import os

    previous = os.umask(0o002)  # group-writable: unlike both safetensors' 0600 and the usual 0644
    try:
        out = tmp_path / "run"
        run("--data", f"{small_cmapss}/FD001", "--epochs", 1, "--folds", 2, "--output_dir", out)
        predict_dual_task.main(["--run_dir", str(out), "--data", str(small_cmapss / "test_FD001.txt")])
    finally:
        os.umask(previous)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len([p for p in files if p.suffix == ".safetensors"]) >= 4  # two models and their checkpoints
    assert (out / "predictions.csv") in files
    modes = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in files}
    assert {name: mode for name, mode in modes.items() if mode != "0o664"} == {}
