"""Dual-task learning on NASA C-MAPSS: remaining-useful-life regression + health-state classification.

One model, two heads, combined by the AMNL loss (each task loss divided by a running average of
itself, then weighted 0.5/0.5). The same file runs on a CPU, one GPU, DDP or FSDP:

    python train_dual_task.py                                    # FD001 on this machine
    python train_dual_task.py --data FD002 --epochs 80           # any field of Config is a flag
    python train_dual_task.py --config configs/fd004.yaml        # or a YAML file of them
    accelerate launch --config_file accelerate_configs/single_gpu.yaml train_dual_task.py --mixed_precision bf16
    python train_dual_task.py --output_dir runs/x --resume_from latest
    python train_dual_task.py --mode predict --output_dir runs/x --predict_data new_engines.txt   # -> predictions.csv

Protocol: 20% of the training engines are held out for validation (split by engine). LR plateau,
early stopping and the best checkpoint use validation only; the test set is evaluated once, at the
end, with the best EMA weights: RMSE on each test engine's last cycle and the PHM08 score.

Reading order: Config, data (in parts: only read_runs knows the C-MAPSS files), model, loss, train(),
evaluate(), main(), predict().
"""

import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm

from common.checkpoint import check_checkpoint_fits, load_checkpoint, resolve_resume, save_checkpoint
from common.config import NON_EMPTY, TRACKER, above, at_least, between, check_domains, parse_config, setting
from common.distributed import (
    check_one_view_of_output_dir,
    fit_fsdp_wrapping,
    refuse_silent_fallbacks,
    use_fsdp_on_cpu,
)
from common.ema import EMA
from common.errors import NonFiniteTrainingError, UserError, exit_on_user_error, warn
from common.guard import NonFiniteGuard
from common.preemption import EXIT_PREEMPTED, Preemption
from common.run_log import MetricsLog, check_output_dir, check_output_file, peak_memory_mb, start_run, write_json
from common.schedules import linear_warmup, set_lr, warmup_cosine

INFORMATIVE_SENSORS = [2, 3, 4, 7, 8, 9, 11, 12, 13, 14, 15, 17, 20, 21]


@dataclass
class Config:
    # data: read_runs gives --data and --sensors their meaning (a reader of your own gives them yours)
    data: str = setting("FD001", "the data: a C-MAPSS subset FD001-FD004 (the copy in data/cmapss), or <folder>/FD00x "
                        "for the train_, test_ and RUL_FD00x files (.txt or .txt.gz) in another folder", NON_EMPTY, same_on_resume=True)
    sensors: list[int] = setting(INFORMATIVE_SENSORS, "sensor columns used as inputs, numbered from 1", at_least(1), same_on_resume=True)
    window: int = setting(30, "cycles per input window", at_least(1), same_on_resume=True)
    rul_cap: int = setting(125, "piecewise-linear RUL cap, for training labels and the true test RUL", between(1, 100_000), same_on_resume=True)
    val_fraction: float = setting(0.2, "fraction of training units held out for validation", between(0, 1, low_open=True, high_open=True), same_on_resume=True)
    folds: int = setting(1, "train this many models, each validated on its own unit-disjoint fold (then --val_fraction is 1/folds), "
                         "and average their test predictions (1: one model)", between(1, 100), same_on_resume=True)
    val_metric: str = setting("windows", "validation RMSE that picks the best epoch, stops early and drives the plateau scheduler: "
                              "'cut' scores each validation unit like a test unit (its last window at random cut points), "
                              "'windows' every window of it", choices=["windows", "cut"], same_on_resume=True)
    val_cuts: int = setting(10, "cut points per validation unit for the 'cut' score (fixed by --seed)", between(1, 1000), same_on_resume=True)
    health_thresholds: list[int] = setting([50, 15], "RUL thresholds between health states, falling: RUL above the first is state 0 "
                                           "(healthy), each threshold the RUL is at or below adds one (50, 15: healthy, degrading, "
                                           "critical)", at_least(0), same_on_resume=True)
    smoothing: float = setting(0.05, "causal exponential smoothing of the normalised sensors, weight of the newest cycle (0: off)", between(0, 1), same_on_resume=True)
    per_condition_norm: bool = setting(True, "normalise per operating condition (FD002/FD004 have six; FD001/FD003 one)", same_on_resume=True)
    cycle_feature: bool = setting(True, "add the cycle number (cycles run so far) as an input feature", same_on_resume=True)
    phm08: bool = setting(True, "report the PHM08 score, C-MAPSS's asymmetric score (its constants are in cycles): off for other data")
    # model
    conv_channels: int = setting(64, "Conv1d channels", between(1, 2048), same_on_resume=True)
    kernel_size: int = setting(5, "Conv1d kernel size over time", between(1, 64), same_on_resume=True)
    hidden_size: int = setting(64, "GRU hidden size per direction", between(1, 2048), same_on_resume=True)
    gru_layers: int = setting(2, "bidirectional GRU layers", between(1, 8), same_on_resume=True)
    dropout: float = setting(0.2, "dropout in the GRU and heads", between(0, 1, high_open=True))
    # loss
    failure_weight: float = setting(1.0, "RUL MSE weight grows from 1 to 1+this as RUL goes to 0", between(0, 1000))
    amnl_decay: float = setting(0.99, "decay of the running averages that normalise each task loss", between(0, 1, high_open=True))
    rul_loss_weight: float = setting(0.5, "AMNL weight of the RUL task", between(0, 1))
    # optimisation
    epochs: int = setting(20, "maximum training epochs", at_least(0))
    max_steps: int = setting(0, "stop after this many optimizer steps (0: no limit)", at_least(0))
    batch_size: int = setting(256, "windows per micro-batch per process", at_least(1))
    grad_accum_steps: int = setting(1, "micro-batches per optimizer step", at_least(1))
    lr: float = setting(1e-3, "peak learning rate (AdamW: above 1 is a typo)", between(0, 1, low_open=True))
    weight_decay: float = setting(1e-4, "AdamW weight decay (not on biases and norm weights)", between(0, 10))
    wd_decay_epochs: list[int] = setting([100, 200], "epochs after which weight decay is multiplied...", at_least(0))
    wd_decay_factors: list[float] = setting([0.5, 0.1], "...by these factors", at_least(0))
    warmup_epochs: int = setting(3, "linear LR warmup from 0.1x to 1x over these epochs", at_least(0))
    scheduler: str = setting("cosine", "LR decay after warmup", choices=["cosine", "plateau"])
    min_lr_factor: float = setting(0.01, "lowest LR as a fraction of --lr", between(0, 1))
    plateau_factor: float = setting(0.5, "plateau: multiply the LR by this...", between(0, 1, low_open=True))
    plateau_patience: int = setting(5, "...after this many epochs without a better validation RMSE", at_least(0))
    max_grad_norm: float = setting(1.0, "gradient clipping norm", above(0))
    ema_decay: float = setting(0.995, "EMA decay of the weights used for evaluation", between(0, 1, high_open=True))
    early_stopping_patience: int = setting(20, "stop after this many epochs without a better validation RMSE", at_least(1))
    mixed_precision: str | None = setting(None, "None: what accelerate launch set, else no", choices=["no", "bf16", "fp16"])
    nan_lr_backoff: float = setting(0.5, "on the first NaN/Inf update: fp32 from then on, base LR times this", between(0, 1, low_open=True))
    max_nonfinite_in_a_row: int = setting(5, "stop after this many non-finite updates in a row in fp32", at_least(1))
    # run
    output_dir: str = setting("runs/dual_task", "where checkpoints, metrics, plots and results go", NON_EMPTY)
    overwrite: bool = setting(False, "replace the run in output_dir (removed only once the new run has passed its checks)")
    seed: int = setting(42, "seed for the split, the initialisation and the batch order", between(0, 2**32 - 1), same_on_resume=True)
    log_every: int = setting(50, "log (and check for NaN) every this many optimizer steps", at_least(1))
    checkpoint_every: int = setting(0, "also checkpoint every this many optimizer steps (0: epoch ends only)", at_least(0))
    keep_checkpoints: int = setting(2, "how many recent checkpoints to keep", at_least(1))
    resume_from: str | None = setting(None, "'latest' or a checkpoint folder", NON_EMPTY)
    report_to: str = setting("none", "Accelerate tracker: none, tensorboard, wandb, ...", TRACKER)
    # One thread holds up on a shared machine: beside another CPU-bound process PyTorch's default (one thread per core)
    # trained at 697 samples/s, one thread at 1,508; alone 3,204 and 2,165 (bench/threads.py, 2 cores, docs/results.md).
    num_threads: int = setting(1, "PyTorch CPU threads per process (0: PyTorch's default, one per core: faster alone, "
                               "several times slower beside another busy process)", between(0, 1024))
    # predict
    mode: str = setting("train", "train, or predict: RUL and health state for the last cycle of each unit in --predict_data, "
                        "with the model(s) and preprocessing saved in --output_dir", choices=["train", "predict"])
    predict_data: str | None = setting(None, "predict: a file in the training data's format (C-MAPSS: like test_FD001.txt)", NON_EMPTY)
    predict_output: str | None = setting(None, "predict: CSV to write (default: output_dir/predictions.csv)", NON_EMPTY)

    def __post_init__(self):  # every field in its domain, then the rules that tie fields together
        check_domains(self)
        if len(set(self.sensors)) != len(self.sensors):
            raise UserError(f"--sensors {self.sensors} names a sensor twice; list each once")
        if not self.sensors and not self.cycle_feature:
            raise UserError("no input features: --sensors is empty and --cycle_feature is false; name at least one sensor")
        thresholds = self.health_thresholds
        if not thresholds or any(b >= a for a, b in zip([self.rul_cap, *thresholds], thresholds)):
            raise UserError(f"--health_thresholds {thresholds} must be one or more RULs below --rul_cap {self.rul_cap}, each "
                            f"lower than the one before (e.g. 50,15); otherwise a health state never occurs")
        if self.mode == "predict" and self.predict_data is None:
            raise UserError("--mode predict needs units to predict; pass --predict_data (a file like test_FD001.txt)")
        if len(self.wd_decay_epochs) != len(self.wd_decay_factors):
            raise UserError(f"--wd_decay_epochs has {len(self.wd_decay_epochs)} entries and --wd_decay_factors "
                            f"{len(self.wd_decay_factors)}; give one factor per epoch")


# ----------------------------------------------------------------------------------------------
# Data, in parts that can be replaced one at a time (README: "Copy and edit"):
#   read_runs            the files -> Runs, one row per unit and cycle: the only part that knows C-MAPSS's format
#   validation_units     which units validate: split by unit, never by window
#   fit_preprocessing    statistics from the training units only; saved beside the model (preprocessing.json)
#   apply_preprocessing  normalise per operating condition, smooth, add the cycle number
#   windows_per_unit     sliding windows to train on; the last window of each unit to test and predict
# ----------------------------------------------------------------------------------------------


@dataclass
class Runs:
    """Units observed cycle by cycle: one row per unit and cycle, each unit's rows together and in cycle order."""

    name: str  # what the data is, for the console and results.json
    sensor_names: list[str]  # the columns of `sensors`
    unit: np.ndarray  # (rows,) unit id
    cycle: np.ndarray  # (rows,) cycles run so far
    condition: np.ndarray  # (rows,) operating-condition id: normalisation statistics are fitted per condition
    sensors: np.ndarray  # (rows, sensors)
    rul: np.ndarray  # (rows,) cycles left until failure; NaN where unknown (units to predict)

    def select(self, rows: np.ndarray) -> "Runs":
        return dataclasses.replace(self, unit=self.unit[rows], cycle=self.cycle[rows], condition=self.condition[rows],
                                   sensors=self.sensors[rows], rul=self.rul[rows])


CMAPSS_COLUMNS = 26  # unit, cycle, 3 operational settings, 21 sensors
CMAPSS_SUBSETS = ["FD001", "FD002", "FD003", "FD004"]


def read_runs(cfg: Config, predict_file: str | None = None) -> dict[str, Runs]:
    """C-MAPSS: {"train": engines run to failure, "test": engines stopped early, with the true RUL at the stop}, or
    with `predict_file` {"predict": the engines of that one file, RUL unknown}. --data names the subset."""
    folder, subset = Path(cfg.data).parent, Path(cfg.data).name
    if subset not in CMAPSS_SUBSETS:
        raise UserError(f"--data {cfg.data} names no C-MAPSS subset; pass one of {', '.join(CMAPSS_SUBSETS)} or "
                        f"<folder>/FD00x for the files train_FD00x.txt, test_FD00x.txt and RUL_FD00x.txt there")
    if folder == Path("."):
        folder = Path(__file__).resolve().parent / "data" / "cmapss"  # the copy shipped with this repo
    if not folder.is_dir():
        raise UserError(f"data folder {folder} not found; pass --data <folder with the C-MAPSS files>/{subset}")

    def find(name):
        plain = folder / name
        return plain if plain.is_file() or not (folder / f"{name}.gz").is_file() else folder / f"{name}.gz"

    def runs(table, name, rul):
        missing = [s for s in cfg.sensors if s > 21]
        if missing:
            raise UserError(f"--sensors {missing[0]} does not exist; C-MAPSS has sensors 1 to 21")
        return Runs(name, [f"sensor {s}" for s in cfg.sensors], table[:, 0].astype(np.int64),
                    table[:, 1], operating_condition(table), table[:, [4 + s for s in cfg.sensors]], rul)

    if predict_file is not None:
        table = read_table(Path(predict_file), CMAPSS_COLUMNS)
        return {"predict": runs(table, f"{predict_file} (C-MAPSS format)", np.full(len(table), np.nan))}
    train = read_table(find(f"train_{subset}.txt"), CMAPSS_COLUMNS)
    test = read_table(find(f"test_{subset}.txt"), CMAPSS_COLUMNS)
    test_rul_last = read_table(find(f"RUL_{subset}.txt"), 1)[:, 0]
    test_units = np.unique(test[:, 0])
    if len(test_rul_last) != len(test_units):
        raise UserError(f"RUL_{subset} has {len(test_rul_last)} rows for {len(test_units)} test engines; "
                        f"restore the original files")
    # Training engines run to failure; test engines stop early: the RUL at their last cycle is given, earlier rows
    # count up from it.
    true_last = dict(zip(test_units, test_rul_last))
    test_rul = np.array([true_last[u] for u in test[:, 0]]) + cycles_to_last(test)
    return {"train": runs(train, f"C-MAPSS {subset}", cycles_to_last(train)), "test": runs(test, f"C-MAPSS {subset}", test_rul)}


def read_table(path: Path, columns: int) -> np.ndarray:
    """Read a whitespace-separated C-MAPSS file (.txt or .txt.gz) into a float array."""
    if not path.is_file():
        raise UserError(f"missing data file {path}; point --data at a folder with the C-MAPSS files")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
            table = np.loadtxt(path, ndmin=2)
    except (ValueError, EOFError, OSError) as err:
        raise UserError(f"{path} is malformed ({err}); each row must be {columns} space-separated numbers") from None
    if table.size == 0:
        raise UserError(f"{path} is empty; restore the original C-MAPSS file")
    if table.shape[1] != columns:
        raise UserError(f"{path} has {table.shape[1]} columns, expected {columns}; restore the original C-MAPSS file")
    if not np.isfinite(table).all():
        row = int(np.argwhere(~np.isfinite(table))[0, 0]) + 1
        raise UserError(f"{path} row {row} holds NaN or Inf; fix or remove that row")
    if columns == CMAPSS_COLUMNS:  # engines: positive whole unit and cycle numbers, each engine's rows together, in cycle order
        unit, cycle = table[:, 0], table[:, 1]
        same_engine = unit[1:] == unit[:-1]
        bad = (unit < 1) | (unit != np.round(unit)) | (cycle < 1) | (cycle != np.round(cycle))
        bad[1:] |= same_engine & (cycle[1:] <= cycle[:-1])  # cycles go backwards within an engine
        starts = np.r_[0, np.nonzero(~same_engine)[0] + 1]
        _, first_start = np.unique(unit[starts], return_index=True)
        bad[np.delete(starts, first_start)] = True  # an engine whose rows are split in two
        if bad.any():
            row = int(np.argmax(bad)) + 1
            raise UserError(f"{path} row {row} (engine {table[row - 1, 0]:g}, cycle {table[row - 1, 1]:g}) breaks the "
                            f"layout; restore the file (whole engine and cycle numbers from 1, each engine's rows together in cycle order)")
    elif (table < 0).any():  # RUL_FD00x: cycles left, one row per test engine
        raise UserError(f"{path} row {int(np.argmax(table[:, 0] < 0)) + 1} holds a negative RUL; restore the original file")
    return table


def cycles_to_last(table: np.ndarray) -> np.ndarray:
    """Cycles from each row to its engine's last recorded cycle."""
    units, cycles = table[:, 0], table[:, 1]
    last_cycle = {u: cycles[units == u].max() for u in np.unique(units)}
    return np.array([last_cycle[u] for u in units]) - cycles


def operating_condition(table: np.ndarray) -> np.ndarray:
    """The operating regime of each row: the three settings cluster tightly around six set points."""
    settings = np.round(table[:, 2:5] * [1, 100, 1]).astype(np.int64)
    return settings[:, 0] * 10**6 + settings[:, 1] * 10**3 + settings[:, 2]


def validation_units(units: np.ndarray, cfg: Config, fold: int) -> np.ndarray:
    """The units held out for validation: a seeded share of them, or with --folds K fold `fold` of K disjoint ones.
    By unit, never by window: the windows of one unit are strongly correlated."""
    order = np.random.default_rng(cfg.seed).permutation(units)
    if cfg.folds > 1:
        if cfg.folds > len(units):
            raise UserError(f"--folds {cfg.folds} needs at least {cfg.folds} training units, the data has "
                            f"{len(units)}; lower --folds")
        return np.array_split(order, cfg.folds)[fold]
    n_val = max(1, round(cfg.val_fraction * len(units)))
    if n_val >= len(units):
        raise UserError(f"the training data has {len(units)} unit(s) and --val_fraction {cfg.val_fraction:g} holds "
                        f"out {n_val} for validation, leaving none to train on; lower --val_fraction or add units")
    return order[:n_val]


def fit_preprocessing(train: Runs, cfg: Config) -> dict:
    """Everything that turns raw rows into model inputs, fitted on the training units only, as plain JSON: it is
    saved beside the model, so that --mode predict prepares new data exactly as the training data was."""
    conditions = train.condition if cfg.per_condition_norm else np.zeros_like(train.condition)
    stats = {}
    for c in np.unique(conditions):
        rows = train.sensors[conditions == c]
        stats[str(c)] = {"mean": rows.mean(0).tolist(), "std": np.where(rows.std(0) > 1e-8, rows.std(0), 1.0).tolist()}
    return {"data": train.name, "sensor_names": train.sensor_names, "sensor_stats": stats,
            "cycle_mean": float(train.cycle.mean()), "cycle_std": float(train.cycle.std()),
            "per_condition_norm": cfg.per_condition_norm, "smoothing": cfg.smoothing, "cycle_feature": cfg.cycle_feature,
            "window": cfg.window, "rul_cap": cfg.rul_cap, "health_thresholds": cfg.health_thresholds}


def apply_preprocessing(runs: Runs, prep: dict) -> np.ndarray:
    """(rows, features): sensors normalised per operating condition, smoothed within each unit, then the cycle number."""
    conditions = runs.condition if prep["per_condition_norm"] else np.zeros_like(runs.condition)
    features = np.empty(runs.sensors.shape)
    for c in np.unique(conditions):
        if str(c) not in prep["sensor_stats"]:
            raise UserError(f"an operating condition of {runs.name} never occurs in the units trained on, so it cannot "
                            f"be normalised; train with --per_condition_norm false")
        stats = prep["sensor_stats"][str(c)]
        features[conditions == c] = (runs.sensors[conditions == c] - np.array(stats["mean"])) / np.array(stats["std"])
    if prep["smoothing"] > 0:
        features = smooth_per_unit(features, runs.unit, prep["smoothing"])
    if prep["cycle_feature"]:  # how long the unit has run is known at test time too
        cycle = (runs.cycle - prep["cycle_mean"]) / prep["cycle_std"]
        features = np.concatenate([features, cycle[:, None]], axis=1)
    return features


def smooth_per_unit(features: np.ndarray, units: np.ndarray, alpha: float) -> np.ndarray:
    """Causal exponential smoothing within each unit (s_t = a x_t + (1-a) s_t-1): damps sensor noise, uses no future."""
    out = features.copy()
    for t in range(1, len(out)):
        if units[t] == units[t - 1]:
            out[t] = alpha * features[t] + (1 - alpha) * out[t - 1]
    return out


def windows_per_unit(features: np.ndarray, rul: np.ndarray, units: np.ndarray, window: int, last_only: bool):
    """Cut sliding windows per unit (all of them, or the last); short units are front-padded."""
    xs, ys, ids = [], [], []
    for unit in np.unique(units):
        rows = units == unit
        x, y = features[rows], rul[rows]
        if len(x) < window:
            if not last_only:
                raise UserError(f"training unit {int(unit)} has {len(x)} cycles, fewer than --window {window}; "
                                f"lower --window or remove that unit")
            x = np.concatenate([np.repeat(x[:1], window - len(x), axis=0), x])  # repeat the first cycle
        if last_only:
            xs.append(x[None, -window:])
            ys.append(y[-1:])
        else:
            xs.append(np.lib.stride_tricks.sliding_window_view(x, window, axis=0).transpose(0, 2, 1))
            ys.append(y[window - 1:])
        ids.append(np.full(len(ys[-1]), unit, dtype=np.int64))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.float32), np.concatenate(ids)


# A validation unit cut like a test unit is observed for a uniform fraction of its life in this range (chosen in
# advance, not fitted to the test set): from early in life, when the RUL is far above the cap, to one cycle before
# failure.
VAL_CUT_RANGE = (0.2, 1.0)


def cut_like_test(features: np.ndarray, rul: np.ndarray, units: np.ndarray, cuts: int, seed: int):
    """Each unit cut at `cuts` random points; each cut becomes a unit observed up to there (a new unit id), to
    be scored like a test unit: by its last window and the RUL at the cut."""
    rng = np.random.default_rng([seed, 1])  # its own stream: the unit split does not move
    parts, new_units = [], []
    for unit in np.unique(units):
        rows = np.nonzero(units == unit)[0]
        low = max(1, math.ceil(VAL_CUT_RANGE[0] * len(rows)))
        for length in rng.integers(low, max(low, len(rows) - 1), size=cuts, endpoint=True):
            parts.append(rows[:length])
            new_units.append(np.full(length, len(new_units)))
    keep = np.concatenate(parts)
    return features[keep], rul[keep], np.concatenate(new_units)


def health_state(rul: np.ndarray, thresholds: list[int]) -> np.ndarray:
    """0 for RUL above the first threshold (healthy), one more for each threshold the RUL is at or below."""
    return (rul[:, None] <= np.array(thresholds)[None, :]).sum(1).astype(np.int64)


@dataclass
class Split:
    x: torch.Tensor  # (N, window, features) float32
    rul: torch.Tensor  # (N,) float32, capped
    health: torch.Tensor  # (N,) int64
    unit: torch.Tensor  # (N,) unit id of each window


def load_splits(cfg: Config, runs: dict[str, Runs], fold: int = 0) -> tuple[dict[str, Split], dict]:
    """The parts wired together: train/val/val_cut/test windows as tensors, and the fitted preprocessing."""
    train, test = runs["train"], runs["test"]
    is_val = np.isin(train.unit, validation_units(np.unique(train.unit), cfg, fold))
    prep = fit_preprocessing(train.select(~is_val), cfg)
    train_x, test_x = apply_preprocessing(train, prep), apply_preprocessing(test, prep)
    train_rul, test_rul = np.minimum(train.rul, cfg.rul_cap), np.minimum(test.rul, cfg.rul_cap)
    val_cut = cut_like_test(train_x[is_val], train_rul[is_val], train.unit[is_val], cfg.val_cuts, cfg.seed)
    splits = {}
    for name, (x, rul, unit), last_only in [
        ("train", (train_x[~is_val], train_rul[~is_val], train.unit[~is_val]), False),
        ("val", (train_x[is_val], train_rul[is_val], train.unit[is_val]), False),
        ("val_cut", val_cut, True),  # validation units scored like test units
        ("test", (test_x, test_rul, test.unit), True),
    ]:
        x, y, unit = windows_per_unit(x, rul, unit, cfg.window, last_only)
        splits[name] = Split(torch.from_numpy(x), torch.from_numpy(y),
                             torch.from_numpy(health_state(y, cfg.health_thresholds)), torch.from_numpy(unit))
    return splits, prep


class WindowDataset(torch.utils.data.Dataset):
    """Windows held as tensors; `__getitems__` lets the DataLoader fetch a whole batch by one index op."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self):
        return len(self.split.rul)

    def __getitem__(self, i):
        return self.split.x[i], self.split.rul[i], self.split.health[i]

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices)
        return self.split.x[idx], self.split.rul[idx], self.split.health[idx]


def keep_batch(batch):
    return batch  # __getitems__ already returns batched tensors


def make_loader(split: Split, batch_size: int, shuffle: bool, seed: int):
    return torch.utils.data.DataLoader(
        WindowDataset(split), batch_size=batch_size, shuffle=shuffle, collate_fn=keep_batch,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


# ----------------------------------------------------------------------------------------------
# Model: Conv1d over time -> bidirectional GRU -> attention pooling -> RUL head + health head
# ----------------------------------------------------------------------------------------------


# FSDP2 warns that the model returns a view (the squeezed RUL): an in-place op on it would skip a hook.
# The loop never modifies the outputs in place, so the warning says nothing a user could act on.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


class DualTaskNet(nn.Module):
    def __init__(self, num_features: int, cfg: Config):
        super().__init__()
        c, h = cfg.conv_channels, cfg.hidden_size
        self.conv = nn.Sequential(
            nn.Conv1d(num_features, c, cfg.kernel_size, padding=cfg.kernel_size // 2), nn.GELU(),
            nn.Conv1d(c, c, cfg.kernel_size, padding=cfg.kernel_size // 2), nn.GELU(),
        )
        self.gru = nn.GRU(c, h, num_layers=cfg.gru_layers, batch_first=True, bidirectional=True,
                          dropout=cfg.dropout if cfg.gru_layers > 1 else 0.0)
        self.norm = nn.LayerNorm(2 * h)
        self.attention = nn.Linear(2 * h, 1)
        # Both heads see the attention-pooled summary and the last time step (the most recent state).
        self.rul_head = nn.Sequential(nn.Linear(4 * h, h), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(h, 1))
        num_states = len(cfg.health_thresholds) + 1
        self.health_head = nn.Sequential(nn.Linear(4 * h, h), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(h, num_states))

    def forward(self, x):  # x: (batch, time, features)
        z = self.conv(x.transpose(1, 2)).transpose(1, 2)
        z, _ = self.gru(z)
        z = self.norm(z)
        weights = torch.softmax(self.attention(z), dim=1)  # (batch, time, 1)
        summary = torch.cat([(weights * z).sum(1), z[:, -1]], dim=-1)
        return self.rul_head(summary).squeeze(-1), self.health_head(summary)  # RUL as a fraction of the cap


# ----------------------------------------------------------------------------------------------
# Loss: AMNL, each task loss divided by a running average of itself, then weighted
# ----------------------------------------------------------------------------------------------


class AMNLLoss:
    """`w * rul_loss / avg(rul_loss) + (1 - w) * health_loss / avg(health_loss)`.

    Dividing by a running average puts both tasks on the same scale whatever their units, so neither
    dominates. The averages are device tensors updated without a host sync, and skip non-finite
    values so that one bad batch cannot poison them. They are saved in checkpoints.
    """

    def __init__(self, cfg: Config, device, reduce=lambda losses: losses):
        self.reduce = reduce  # under DDP: the mean over processes, so every rank normalises alike
        self.decay = cfg.amnl_decay
        self.rul_weight = cfg.rul_loss_weight
        self.failure_weight = cfg.failure_weight
        self.averages = torch.zeros(2, device=device)  # [rul, health], bias-corrected by num_updates
        self.num_updates = 0

    def __call__(self, rul_pred, rul_true, health_logits, health_true):
        # MSE weighted towards failure: errors near the end of life matter most (and cost most in PHM08).
        weight = 1.0 + self.failure_weight * (1.0 - rul_true)
        rul_loss = (weight * (rul_pred - rul_true) ** 2).mean() / weight.mean()
        health_loss = F.cross_entropy(health_logits, health_true)
        losses = torch.stack([rul_loss, health_loss])
        with torch.no_grad():
            observed = self.reduce(losses.detach())
            updated = self.decay * self.averages + (1 - self.decay) * observed
            self.averages.copy_(torch.where(torch.isfinite(observed), updated, self.averages))
            self.num_updates += 1
            scale = (self.averages / (1 - self.decay**self.num_updates)).clamp_min(1e-8)
        normalised = losses / scale
        total = self.rul_weight * normalised[0] + (1 - self.rul_weight) * normalised[1]
        return total, losses.detach()

    def state_dict(self):
        return {"averages": self.averages.cpu(), "num_updates": self.num_updates}

    def load_state_dict(self, state):
        self.averages.copy_(state["averages"])
        self.num_updates = state["num_updates"]


# ----------------------------------------------------------------------------------------------
# Training state and schedules
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything the loop needs to continue after a restart, beyond model/optimizer/RNG."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batches_done: int = 0  # micro-batches consumed in the current epoch
    best_val_rmse: float = math.inf
    best_epoch: int = -1
    epochs_since_best: int = 0
    plateau_best: float = math.inf  # ReduceLROnPlateau, written out: stateless except for these
    plateau_bad_epochs: int = 0
    plateau_factor: float = 1.0
    train_samples: int = 0  # over finished epochs, this process: for the throughput in results.json
    train_seconds: float = 0.0
    best_weights: dict = field(default_factory=dict)  # EMA weights at the best epoch

    def state_dict(self):
        return dataclasses.asdict(self)

    def load_state_dict(self, state):
        for key, value in state.items():
            setattr(self, key, value)


def lr_at(step: int, cfg: Config, state: TrainState, steps_per_epoch: int, total_steps: int, lr_scale: float) -> float:
    """Base LR x backoff x schedule. Warmup goes from 0.1x to 1x; then cosine, or the plateau factor."""
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    if cfg.scheduler == "cosine":
        factor = warmup_cosine(step, warmup_steps, total_steps, start_factor=0.1, final_factor=cfg.min_lr_factor)
    else:
        factor = linear_warmup(step, warmup_steps, start_factor=0.1) * max(state.plateau_factor, cfg.min_lr_factor)
    return cfg.lr * lr_scale * factor


def step_plateau(state: TrainState, val_rmse: float, cfg: Config) -> None:
    """ReduceLROnPlateau (mode min): multiply the LR factor by `plateau_factor` after `plateau_patience` bad epochs."""
    if val_rmse < state.plateau_best:
        state.plateau_best, state.plateau_bad_epochs = val_rmse, 0
        return
    state.plateau_bad_epochs += 1
    if state.plateau_bad_epochs > cfg.plateau_patience:
        state.plateau_factor *= cfg.plateau_factor
        state.plateau_bad_epochs = 0


def weight_decay_factor(epoch: int, cfg: Config) -> float:
    """Adaptive weight decay: regularise less once the model has settled (x0.5 after 100, x0.1 after 200)."""
    factor = 1.0
    for after, f in zip(cfg.wd_decay_epochs, cfg.wd_decay_factors):
        if epoch >= after:
            factor = f
    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors): decaying them only hurts."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay, "base_weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "base_weight_decay": 0.0},
    ]


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def phm08_score(pred: torch.Tensor, true: torch.Tensor) -> float:
    """PHM08 challenge score: late predictions (d > 0) cost more than early ones."""
    d = pred - true
    return torch.where(d < 0, torch.exp(-d / 13) - 1, torch.exp(d / 10) - 1).sum().item()


@torch.no_grad()
def evaluate(model, loader, accelerator, rul_cap: int) -> dict:
    """RMSE in cycles, health accuracy and the predictions; every sample counted once across processes."""
    model.eval()
    preds, trues, probs, healths = [], [], [], []
    for x, rul, health in loader:
        with accelerator.autocast():
            rul_pred, health_logits = model(x)
        rul_pred, rul, prob, health = accelerator.gather_for_metrics(
            (rul_pred.float(), rul, health_logits.float().softmax(-1), health)
        )
        preds.append(rul_pred)
        trues.append(rul)
        probs.append(prob)
        healths.append(health)
    model.train()
    pred = (torch.cat(preds) * rul_cap).clamp(0, rul_cap)  # the model predicts RUL / cap
    true = torch.cat(trues)
    if not torch.isfinite(pred).all():  # weights that overflowed: no result is better than a meaningless one
        raise NonFiniteTrainingError("the model's predictions are not finite (its weights diverged); lower --lr, "
                                     "then resume from a checkpoint before the divergence or start again")
    return prediction_scores(pred.cpu(), true.cpu(), torch.cat(probs).cpu(), torch.cat(healths).cpu())


def prediction_scores(pred: torch.Tensor, true: torch.Tensor, health_prob: torch.Tensor, health: torch.Tensor) -> dict:
    """RMSE in cycles and health accuracy, with the predictions they came from (a fold ensemble averages those)."""
    return {"rmse": torch.sqrt(((pred - true) ** 2).mean()).item(),
            "health_accuracy": (health_prob.argmax(-1) == health).float().mean().item(), "num_samples": len(true),
            "pred": pred, "true": true, "health_prob": health_prob, "health": health}


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------


def train(cfg, accelerator, model, optimizer, train_loader, val_loaders, loss_fn, ema, guard, state, log, output_dir,
          preemption):
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    checkpointed = {"train_state": state, "ema": ema, "guard": guard, "amnl": loss_fn}
    if total_steps == 0:
        warn("--epochs 0: nothing is trained; the test set is scored with the initial weights")
    elif total_steps < steps_per_epoch:
        warn(f"--max_steps {cfg.max_steps} ends training before the first epoch ({steps_per_epoch} steps) finishes: "
             f"no validation runs, and the test set is scored with the last EMA weights")

    def current_lr():
        return lr_at(state.step, cfg, state, steps_per_epoch, total_steps, guard.lr_scale)

    def finished():  # also true for a resumed run that had already finished training
        return (state.epoch >= cfg.epochs or (cfg.max_steps > 0 and state.step >= cfg.max_steps)
                or state.epochs_since_best >= cfg.early_stopping_patience)

    set_lr(optimizer, current_lr())
    # The bar shows on an interactive terminal of the main process (None: tqdm hides it when piped).
    bar = tqdm(total=total_steps, initial=state.step, desc="train", disable=None if accelerator.is_local_main_process else True)
    running = torch.zeros(3, device=accelerator.device)  # sums of total, RUL and health loss since last log
    running_batches = 0
    done = preempted = False
    while not done and not finished():
        epoch_start, samples = time.perf_counter(), 0
        train_loader.set_epoch(state.epoch)  # a different, reproducible shuffle every epoch
        batches = accelerator.skip_first_batches(train_loader, state.batches_done) if state.batches_done else train_loader
        for group in optimizer.param_groups:
            group["weight_decay"] = group["base_weight_decay"] * weight_decay_factor(state.epoch, cfg)
        model.train()
        for x, rul, health in batches:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    rul_pred, health_logits = model(x)
                loss, task_losses = loss_fn(rul_pred.float(), rul / cfg.rul_cap, health_logits.float(), health)
                accelerator.backward(loss)
                guard.record_loss(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    guard.mask_nonfinite_update(grad_norm)  # a NaN/Inf update becomes a no-op, on the device
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_done += 1
            samples += len(rul)
            running += torch.cat([loss.detach()[None], task_losses])
            running_batches += 1
            if not accelerator.sync_gradients:
                continue

            state.step += 1
            ema.update()
            bar.update(1)
            if state.step % cfg.log_every == 0:
                mean = (accelerator.reduce(running, "mean") / running_batches).tolist()  # the only per-interval sync
                running.zero_()
                running_batches = 0
                if guard.poll(state.step):
                    accelerator.print(f"step {state.step}: non-finite loss/gradients; continuing in fp32 with "
                                      f"the base LR x{guard.lr_scale:g}")
                log.log({"train/loss": mean[0], "train/rul_loss": mean[1], "train/health_loss": mean[2],
                         "train/grad_norm": grad_norm.item(), "train/lr": optimizer.param_groups[0]["lr"]}, state.step)
                bar.set_postfix(loss=f"{mean[0]:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            set_lr(optimizer, current_lr())
            preempted = preemption.should_stop(accelerator, at_sync_point=state.step % cfg.log_every == 0)
            done = preempted or (bool(cfg.max_steps) and state.step >= cfg.max_steps)
            stops_mid_epoch = done and state.batches_done < len(train_loader)  # no epoch-end checkpoint follows
            if stops_mid_epoch or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0):
                save_checkpoint(accelerator, output_dir, state.step, checkpointed, cfg.keep_checkpoints, config=cfg)
            if done:
                break
        if done and state.batches_done < len(train_loader):
            break  # stopped mid-epoch by --max_steps: no end-of-epoch evaluation

        # End of epoch: validate with the EMA weights, then plateau, early stopping, best weights.
        guard.poll(state.step)
        epoch_seconds = time.perf_counter() - epoch_start
        state.train_samples += samples
        state.train_seconds += epoch_seconds
        with ema.swapped_in():
            val = {metric: evaluate(model, loader, accelerator, cfg.rul_cap) for metric, loader in val_loaders.items()}
            selected = val[cfg.val_metric]["rmse"]  # --val_metric: the one score that picks, stops and schedules
            improved = selected < state.best_val_rmse
            if improved:
                state.best_weights = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        state.epoch += 1
        state.batches_done = 0
        if improved:
            state.best_val_rmse, state.best_epoch, state.epochs_since_best = selected, state.epoch, 0
        else:
            state.epochs_since_best += 1
        if cfg.scheduler == "plateau" and state.step >= cfg.warmup_epochs * steps_per_epoch:
            step_plateau(state, selected, cfg)
            set_lr(optimizer, current_lr())
        samples_per_second = samples * accelerator.num_processes / epoch_seconds
        windows, cut = val["windows"], val["cut"]
        log.log({"epoch": state.epoch, "val/rmse": windows["rmse"], "val/health_accuracy": windows["health_accuracy"],
                 "val/rmse_cut": cut["rmse"], "train/samples_per_second": samples_per_second,
                 "peak_memory_mb": peak_memory_mb(accelerator.device), "train/lr": optimizer.param_groups[0]["lr"]},
                state.step)
        accelerator.print(f"epoch {state.epoch:3d} | val RMSE {windows['rmse']:6.2f} cut {cut['rmse']:6.2f} "
                  f"health acc {windows['health_accuracy']:.3f} | best {state.best_val_rmse:6.2f} @ {state.best_epoch} | "
                  f"lr {optimizer.param_groups[0]['lr']:.2e} | {samples_per_second:,.0f} samples/s | "
                  f"{peak_memory_mb(accelerator.device):,.0f} MB", flush=True)
        save_checkpoint(accelerator, output_dir, state.step, checkpointed, cfg.keep_checkpoints, best=improved,
                        config=cfg)
        if state.epochs_since_best >= cfg.early_stopping_patience:
            accelerator.print(f"early stopping: no better validation RMSE for {cfg.early_stopping_patience} epochs")
    bar.close()
    return preempted


# ----------------------------------------------------------------------------------------------
# main: wire it together, train, restore the best weights, test once, save
# ----------------------------------------------------------------------------------------------


def save_plots(output_dir: Path, test: dict, rul_cap: int, curves: bool = True) -> None:
    import matplotlib  # imported here: only the main process plots, at the very end

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if curves:  # a fold ensemble has no curves of its own (each fold's are in its folder)
        save_training_curves(output_dir, rul_cap, plt)
    order = torch.argsort(test["true"])
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(test["true"][order], "k-", label="true RUL (capped)")
    ax.plot(test["pred"][order], "o", markersize=3, label="predicted RUL")
    score = f", PHM08 score {test['score']:.0f}" if test["score"] is not None else ""
    ax.set(title=f"test units, last cycle: RMSE {test['rmse']:.2f}{score}", xlabel="test unit (sorted by true RUL)",
           ylabel="cycles")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output_dir / "test_predictions.png", dpi=100)
    plt.close(fig)


def save_training_curves(output_dir: Path, rul_cap: int, plt) -> None:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in records if "train/rul_loss" in r]
    epochs = [r for r in records if "val/rmse" in r]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    # The task losses, not the AMNL total: that divides each loss by its own falling average, so it hovers near
    # 1 and rises as the model learns, which reads as divergence. The RUL loss in cycles sits beside validation.
    axes[0].plot([r["step"] for r in steps], [math.sqrt(max(r["train/rul_loss"], 0)) * rul_cap for r in steps],
                 label="training: √(failure-weighted MSE)")
    axes[0].plot([r["step"] for r in epochs], [r["val/rmse"] for r in epochs], "o-", label="validation RMSE, all windows")
    axes[0].plot([r["step"] for r in epochs], [r["val/rmse_cut"] for r in epochs], "s-",
                 label="validation RMSE, cut like test")
    axes[0].set(title="RUL error (validation: EMA weights)", xlabel="optimizer step", ylabel="cycles")
    axes[0].legend()
    axes[1].plot([r["step"] for r in steps], [r["train/health_loss"] for r in steps], label="health cross-entropy")
    axes[1].set(title="health-state loss", xlabel="optimizer step", ylabel="cross-entropy")
    total = axes[1].twinx()
    total.plot([r["step"] for r in steps], [r["train/loss"] for r in steps], color="0.7", linewidth=0.8)
    total.set_ylabel("AMNL total (about 1 by construction)", color="0.5")
    axes[2].plot([r["step"] for r in records if "train/lr" in r], [r["train/lr"] for r in records if "train/lr" in r])
    axes[2].set(title="learning rate", xlabel="optimizer step")
    fig.tight_layout()
    fig.savefig(output_dir / "training_curves.png", dpi=100)
    plt.close(fig)


def save_model_atomically(accelerator, model, output_dir: Path) -> None:
    """model.safetensors via a temporary folder and a rename: a kill while saving leaves no half-written file."""
    tmp = output_dir / ".model.tmp"
    accelerator.save_model(model, tmp)  # gathers the weights on every process (FSDP); the main process writes
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp / "model.safetensors", output_dir / "model.safetensors")
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()


def write_predictions(path: Path, units, pred: torch.Tensor, health_prob: torch.Tensor, true=None) -> None:
    """CSV, one row per unit: predicted RUL, the most likely health state and each state's probability (and the
    true RUL, where known). Written atomically."""
    header = ["unit", "rul", "health_state", *[f"p_state_{k}" for k in range(health_prob.shape[1])]]
    rows = [[int(u), f"{r:.4f}", int(p.argmax()), *[f"{q:.6f}" for q in p.tolist()]]
            for u, r, p in zip(units, pred.tolist(), health_prob)]
    if true is not None:
        header.append("true_rul")
        rows = [row + [f"{t:g}"] for row, t in zip(rows, true.tolist())]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(",".join(map(str, row)) for row in [header, *rows]) + "\n")
    os.replace(tmp, path)


def test_scores(scores: dict, cfg: Config) -> dict:
    """The test set's numbers: prediction_scores and the PHM08 score (--phm08)."""
    return scores | {"score": phm08_score(scores["pred"], scores["true"]) if cfg.phm08 else None}


def report(test: dict) -> str:
    score = f" | PHM08 score {test['score']:.1f}" if test["score"] is not None else ""
    return f"test RMSE {test['rmse']:.2f}{score} | health accuracy {test['health_accuracy']:.3f}"


RUN_OUTPUTS = ["config.yaml", "results.json", "metrics.jsonl", "model.safetensors", "preprocessing.json",
               "test_predictions.csv", "training_curves.png", "test_predictions.png", "checkpoints",
               "dual_task"]  # what a run writes ("dual_task": tensorboard)


def main(argv=None):
    cfg = parse_config(Config, argv, description=__doc__.split("\n")[0])  # every setting checked against its domain
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.mode == "predict":
        return predict(cfg)
    wall_start = time.perf_counter()
    try:
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # lets `accelerate launch --multi_gpu` run gloo processes on CPU
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.grad_accum_steps,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_dir=cfg.output_dir,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
    except ValueError as err:
        raise UserError(f"{err}; choose another --mixed_precision (bf16 works on CPU)") from None
    use_fsdp_on_cpu(accelerator)  # fsdp.yaml on CPU processes: Accelerate's real FSDP2 path, not DDP
    refuse_silent_fallbacks(accelerator)
    set_seed(cfg.seed)

    # Check everything that bad input can fail before the first write: the output folder, the checkpoints
    # to resume, the data, the model. Until start_run() nothing on disk changes.
    output_dir = check_output_dir(cfg.output_dir, resuming=cfg.resume_from is not None, overwrite=cfg.overwrite)
    if cfg.folds > 1 and cfg.resume_from not in (None, "latest"):
        raise UserError(f"--resume_from {cfg.resume_from} with --folds {cfg.folds}: each fold resumes from its own "
                        f"newest checkpoint; pass --resume_from latest")
    # --folds K: K models, one after another on every process, each in its own folder with its own checkpoints.
    run_dirs = [output_dir] if cfg.folds == 1 else [output_dir / f"fold_{k}" for k in range(1, cfg.folds + 1)]
    resume_paths = [resolve_resume(run_dir, cfg.resume_from) for run_dir in run_dirs]
    for path in filter(None, resume_paths):
        check_checkpoint_fits(accelerator, path, cfg)  # every fold's, before anything is written
    check_one_view_of_output_dir(output_dir, next(filter(None, resume_paths), None))  # several machines: one filesystem
    runs = read_runs(cfg)
    fold_data = [load_splits(cfg, runs, fold) for fold in range(cfg.folds)]  # [(splits, preprocessing)] per fold
    splits, prep = fold_data[0]
    accelerator.print(f"{runs['train'].name}: {len(splits['train'].rul):,} training windows, {len(splits['val'].rul):,} "
                      f"validation windows ({len(splits['val_cut'].rul):,} cuts), {len(splits['test'].rul):,} test units; "
                      f"inputs: {', '.join(prep['sensor_names'])}{', cycle number' if cfg.cycle_feature else ''}"
                      + (f"; {cfg.folds} folds" if cfg.folds > 1 else ""))
    # SIGTERM/SIGINT: during training, finish the step, checkpoint and exit 75; after it, finish the short
    # final phase (test, save) and exit 0. A second signal stops at once.
    preemption = Preemption().install()
    fold_results, fold_tests = [], []
    for fold, ((splits, prep), run_dir, resume_path) in enumerate(zip(fold_data, run_dirs, resume_paths)):
        fold_start = time.perf_counter()
        set_seed(cfg.seed + fold)  # each fold's initialisation, whatever ran before it (a resumed run skips folds)
        train_loader = make_loader(splits["train"], cfg.batch_size, shuffle=True, seed=cfg.seed)
        val_loader = make_loader(splits["val"], 4 * cfg.batch_size, shuffle=False, seed=cfg.seed)
        val_cut_loader = make_loader(splits["val_cut"], 4 * cfg.batch_size, shuffle=False, seed=cfg.seed)
        test_loader = make_loader(splits["test"], 4 * cfg.batch_size, shuffle=False, seed=cfg.seed)

        model = DualTaskNet(num_features=splits["train"].x.shape[-1], cfg=cfg)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=True)
        fit_fsdp_wrapping(accelerator, model)  # FSDP2: one unit per transformer block the model has
        model, optimizer, train_loader, val_loader, val_cut_loader, test_loader = accelerator.prepare(
            model, optimizer, train_loader, val_loader, val_cut_loader, test_loader
        )
        loss_fn = AMNLLoss(cfg, accelerator.device, reduce=lambda losses: accelerator.reduce(losses, "mean"))
        ema = EMA(model.parameters(), decay=cfg.ema_decay)
        guard = NonFiniteGuard(accelerator, model, optimizer, cfg.nan_lr_backoff, cfg.max_nonfinite_in_a_row)
        state = TrainState()
        if resume_path is not None:  # refused if it does not fit these settings, before anything is written
            load_checkpoint(accelerator, resume_path, {"train_state": state, "ema": ema, "guard": guard, "amnl": loss_fn},
                            config=cfg)
            accelerator.print(f"resumed from {resume_path} at step {state.step}, epoch {state.epoch}")
        elif cfg.resume_from == "latest":
            accelerator.print(f"no checkpoint in {run_dir}; starting from scratch")

        if fold == 0:  # every check has passed: from here on the run writes (an --overwrite'n run's outputs go now)
            old_folds = sorted(p.name for p in output_dir.glob("fold_*"))
            start_run(accelerator, output_dir, cfg, RUN_OUTPUTS + old_folds, fresh=not any(resume_paths))
            if cfg.report_to != "none":
                accelerator.init_trackers("dual_task", config={k: str(v) if isinstance(v, list) else v
                                                              for k, v in dataclasses.asdict(cfg).items()})
        if accelerator.is_main_process:
            run_dir.mkdir(exist_ok=True)
        accelerator.wait_for_everyone()
        if cfg.folds > 1:
            accelerator.print(f"fold {fold + 1}/{cfg.folds}: validation units "
                              f"{sorted(int(u) for u in splits['val'].unit.unique())}")
        log = MetricsLog(accelerator, run_dir, step_offset=state.step if resume_path else None)
        if train(cfg, accelerator, model, optimizer, train_loader, {"windows": val_loader, "cut": val_cut_loader},
                 loss_fn, ema, guard, state, log, run_dir, preemption):
            accelerator.end_training()
            accelerator.print(f"stopped by a signal at step {state.step} with a checkpoint saved; "
                              f"continue with --resume_from latest (exit code {EXIT_PREEMPTED})", flush=True)
            sys.exit(EXIT_PREEMPTED)

        # The best EMA weights, chosen on validation, are evaluated on the test set once.
        if state.best_weights:
            accelerator.unwrap_model(model).load_state_dict(state.best_weights)
        else:
            ema.copy_to()  # no epoch finished (e.g. a tiny --max_steps): use the current EMA weights
        test = test_scores(evaluate(model, test_loader, accelerator, cfg.rul_cap), cfg)
        save_model_atomically(accelerator, model, run_dir)  # -> run_dir/model.safetensors
        results = {
            "data": runs["train"].name,
            "test_rmse": test["rmse"],
            "test_score": test["score"],
            "test_health_accuracy": test["health_accuracy"],
            "test_units": test["num_samples"],
            "best_val_rmse": state.best_val_rmse if state.best_epoch >= 0 else None,
            "val_metric": cfg.val_metric,
            "best_epoch": state.best_epoch,
            "epochs_run": state.epoch,
            "optimizer_steps": state.step,
            "wall_seconds": time.perf_counter() - (wall_start if cfg.folds == 1 else fold_start),
            "train_samples_per_second": state.train_samples * accelerator.num_processes / state.train_seconds
            if state.train_seconds else None,
            "peak_memory_mb": peak_memory_mb(accelerator.device),
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type.value),
            "mixed_precision": accelerator.mixed_precision,
            "fell_back_to_fp32_at_step": guard.fallback_step,
            "seed": cfg.seed,
        } | ({"fold": fold + 1, "val_units": sorted(int(u) for u in splits["val"].unit.unique())} if cfg.folds > 1 else {})
        if accelerator.is_main_process:
            write_json(run_dir / "preprocessing.json", prep)  # beside model.safetensors: what --mode predict needs
            write_predictions(run_dir / "test_predictions.csv", splits["test"].unit, test["pred"], test["health_prob"],
                              test["true"])
            write_json(run_dir / "results.json", results)
            save_plots(run_dir, test, cfg.rul_cap)
            best = (f"best val RMSE ({cfg.val_metric}) {state.best_val_rmse:.2f} at epoch {state.best_epoch}"
                    if state.best_epoch >= 0 else "no epoch finished")
            print(("" if cfg.folds == 1 else f"fold {fold + 1}: ") + f"{report(test)} | {best} | "
                  f"{results['wall_seconds']:.0f} s | results in {run_dir / 'results.json'}")
        fold_results.append(results)
        fold_tests.append(test)
        accelerator.free_memory()  # the next fold's objects are prepared and checkpointed alone

    if cfg.folds > 1:  # the ensemble: test predictions (RUL and health probabilities) averaged over the folds
        results, test = ensemble_results(cfg, fold_results, fold_tests, time.perf_counter() - wall_start)
        if accelerator.is_main_process:
            write_predictions(output_dir / "test_predictions.csv", splits["test"].unit, test["pred"], test["health_prob"],
                              test["true"])
            write_json(output_dir / "results.json", results)
            save_plots(output_dir, test, cfg.rul_cap, curves=False)
            print(f"ensemble of {cfg.folds} folds: {report(test)} | {results['wall_seconds']:.0f} s | results in "
                  f"{output_dir / 'results.json'}")
    accelerator.end_training()
    preemption.uninstall()
    if preemption.requested:
        accelerator.print("the signal came after training: the test evaluation and the outputs were finished (exit code 0)")
    return results


def ensemble_results(cfg: Config, fold_results: list[dict], fold_tests: list[dict], wall_seconds: float):
    pred = torch.stack([t["pred"] for t in fold_tests]).mean(0)
    prob = torch.stack([t["health_prob"] for t in fold_tests]).mean(0)
    test = test_scores(prediction_scores(pred, fold_tests[0]["true"], prob, fold_tests[0]["health"]), cfg)  # same units
    keep = ("data", "num_processes", "distributed_type", "mixed_precision", "seed", "val_metric")
    results = {"test_rmse": test["rmse"], "test_score": test["score"], "test_health_accuracy": test["health_accuracy"],
               "test_units": test["num_samples"], "folds": len(fold_results),
               "fold_test_rmse_mean": float(np.mean([r["test_rmse"] for r in fold_results])),
               "best_val_rmse_mean": float(np.mean([r["best_val_rmse"] for r in fold_results
                                                    if r["best_val_rmse"] is not None] or [np.nan])),
               "optimizer_steps": sum(r["optimizer_steps"] for r in fold_results), "wall_seconds": wall_seconds,
               "peak_memory_mb": max(r["peak_memory_mb"] for r in fold_results)}
    results |= {k: fold_results[0][k] for k in keep} | {"per_fold": fold_results}
    return results, test


def predict(cfg: Config) -> Path:
    """RUL and health state at the last cycle of each unit in --predict_data, by the model(s) of the run in
    --output_dir, each with the preprocessing it was trained with (a fold ensemble: the folds' predictions averaged)."""
    run_dir = Path(cfg.output_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} holds no training run (no config.yaml); pass the --output_dir of a finished run")
    trained = parse_config(Config, ["--config", str(run_dir / "config.yaml")])  # its model and its data format
    model_dirs = [run_dir] if trained.folds == 1 else [run_dir / f"fold_{k}" for k in range(1, trained.folds + 1)]
    for folder in model_dirs:
        if not (folder / "model.safetensors").is_file() or not (folder / "preprocessing.json").is_file():
            raise UserError(f"{folder} has no model.safetensors and preprocessing.json: the run has not finished; "
                            f"finish it with --resume_from latest, then predict")
    output = check_output_file(cfg.predict_output or run_dir / "predictions.csv", cfg.overwrite,
                               inputs=[cfg.predict_data], flag="--predict_output")
    runs = read_runs(trained, cfg.predict_data)["predict"]
    preds, probs = [], []
    for folder in model_dirs:
        prep = json.loads((folder / "preprocessing.json").read_text())
        x, _, units = windows_per_unit(apply_preprocessing(runs, prep), runs.rul, runs.unit, prep["window"], last_only=True)
        model = DualTaskNet(num_features=x.shape[-1], cfg=trained).eval()
        model.load_state_dict(load_file(folder / "model.safetensors"))
        with torch.no_grad():
            rul, health_logits = model(torch.from_numpy(x))
        preds.append((rul * prep["rul_cap"]).clamp(0, prep["rul_cap"]))
        probs.append(health_logits.softmax(-1))
    output.parent.mkdir(parents=True, exist_ok=True)
    write_predictions(output, units, torch.stack(preds).mean(0), torch.stack(probs).mean(0))
    print(f"RUL and health state of {len(units)} units of {runs.name} written to {output}")
    return output


if __name__ == "__main__":
    exit_on_user_error(main)
