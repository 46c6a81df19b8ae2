"""Dual-task learning on NASA C-MAPSS: remaining-useful-life regression + health-state classification.

One model, two heads, combined by the AMNL loss (each task loss divided by a running average of itself, then
weighted). The same file runs on a CPU, one GPU, DDP or FSDP2 (docs/dual_task.md, docs/distributed.md):

    python train_dual_task.py                                       # FD001 on this machine
    python train_dual_task.py --config configs/fd002.yaml --seed 3  # any Config field is a flag or a YAML key
    accelerate launch --config_file accelerate_configs/ddp.yaml train_dual_task.py --output_dir runs/ddp
    python train_dual_task.py --output_dir runs/ddp --resume_from latest
    python predict_dual_task.py --run_dir runs/dual_task --data new_engines.txt      # -> predictions.csv

Protocol: validation units (never windows) pick the best epoch, drive the plateau and stop early; the test set
is scored once, at the end, with the best EMA weights: RMSE on each test unit's last cycle and PHM08.
Reading order: Config, data (only read_runs knows the C-MAPSS files), model, loss, train(), evaluate(), main().
What common/ does for it (run setup, checkpoints, the NaN guard, EMA, logging): README.md's map.
"""

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from common.checkpoint import LoopState, load_checkpoint, save_checkpoint, save_model_atomically
from common.config import ABOVE_ZERO, BELOW_ONE, FRACTION, KEEP, NON_EMPTY, RunConfig, between, setting
from common.ema import EMA
from common.errors import NonFiniteTrainingError, UserError, exit_on_user_error
from common.guard import NonFiniteGuard
from common.launch import RunFolder, exit_preempted, finish, make_accelerator, preflight, run_facts, start_run
from common.preemption import Preemption
from common.run_log import MetricsLog, Run, RunningMean, peak_memory_mb, write_atomic, write_json
from common.schedules import linear_warmup, set_lr, warmup_cosine, warn_if_short
from dual_task_checks import check_inputs, check_runs
from dual_task_plots import plot_test_predictions, plot_training_curves

INFORMATIVE_SENSORS = [2, 3, 4, 7, 8, 9, 11, 12, 13, 14, 15, 17, 20, 21]
OPEN_FRACTION = between(0, 1, low_open=True, high_open=True)  # (0, 1)


@dataclass
class Config(RunConfig):  # each field a --flag and a YAML key; docs/dual_task.md#settings
    moved: ClassVar = dict.fromkeys(  # once --mode predict here
        ["mode", "predict_data", "predict_output"],
        "predict with python predict_dual_task.py --run_dir RUN --data FILE")
    # data: read_runs gives --data and --sensors their meaning
    data: str = setting("FD001", "FD001-FD004, or <folder>/FD00x", NON_EMPTY, **KEEP)
    sensors: list[int] = setting(INFORMATIVE_SENSORS, "sensors used as inputs", between(1), **KEEP)
    window: int = setting(30, "cycles per input window", between(1), **KEEP)
    rul_cap: int = setting(125, "RUL cap (labels, true test RUL)", between(1, 1e5), **KEEP)
    val_fraction: float = setting(0.2, "units held out to validate", OPEN_FRACTION, **KEEP)
    folds: int = setting(1, "K models, K validation folds", between(1, 100), **KEEP)
    val_metric: str = setting("windows", "RMSE that picks: all windows or cuts", choices=["windows", "cut"],
                              **KEEP)
    val_cuts: int = setting(10, "cuts per validation unit", between(1, 1000), **KEEP)
    health_thresholds: list[int] = setting([50, 15], "RULs that start each state", between(0), **KEEP)
    smoothing: float = setting(0.05, "causal smoothing, newest weight (0: off)", FRACTION, **KEEP)
    per_condition_norm: bool = setting(True, "normalise per operating condition", **KEEP)
    cycle_feature: bool = setting(True, "the cycle number as an input", **KEEP)
    phm08: bool = setting(True, "report the PHM08 score (C-MAPSS only)")
    # model
    conv_channels: int = setting(64, "Conv1d channels", between(1, 2048), **KEEP)
    kernel_size: int = setting(5, "Conv1d kernel size", between(1, 64), **KEEP)
    hidden_size: int = setting(64, "GRU size per direction", between(1, 2048), **KEEP)
    gru_layers: int = setting(2, "bidirectional GRU layers", between(1, 8), **KEEP)
    dropout: float = setting(0.2, "dropout in the GRU and heads", BELOW_ONE)
    # loss
    failure_weight: float = setting(1.0, "extra RUL weight near failure", between(0, 1000))
    amnl_decay: float = setting(0.99, "decay of the AMNL averages", BELOW_ONE)
    rul_loss_weight: float = setting(0.5, "AMNL weight of the RUL task", FRACTION)
    # optimisation (and RunConfig's)
    epochs: int = setting(20, "maximum epochs", between(0))
    batch_size: int = setting(256, "windows per micro-batch per process", between(1))
    lr: float = setting(1e-3, "peak learning rate", ABOVE_ZERO)
    weight_decay: float = setting(1e-4, "AdamW decay (not biases, norms)", between(0, 10))
    wd_decay_epochs: list[int] = setting([100, 200], "epochs after which decay is x...", between(0))
    wd_decay_factors: list[float] = setting([0.5, 0.1], "...these factors", between(0))
    warmup_epochs: int = setting(3, "LR warmup from 0.1x", between(0))
    scheduler: str = setting("cosine", "LR after warmup", choices=["cosine", "plateau"])
    min_lr_factor: float = setting(0.01, "lowest LR / --lr", FRACTION)
    plateau_factor: float = setting(0.5, "plateau: LR times this...", ABOVE_ZERO)
    plateau_patience: int = setting(5, "...after this many bad epochs", between(0))
    ema_decay: float = setting(0.995, "EMA decay of evaluated weights", BELOW_ONE)
    early_stopping_patience: int = setting(20, "stop after this many bad epochs", between(1))
    # run (and RunConfig's)
    output_dir: str = setting("runs/dual_task", "where the run is written", NON_EMPTY)
    seed: int = setting(42, "seed of the split, init and batches", between(0, 2**32 - 1), **KEEP)
    log_every: int = setting(50, "log (and check NaN) every N steps", between(1))
    num_threads: int = setting(1, "CPU threads per process (0: all)", between(0, 1024))

    def __post_init__(self):  # every field in its domain, then the rules that tie them together
        super().__post_init__()
        if len(set(self.sensors)) != len(self.sensors) or not (self.sensors or self.cycle_feature):
            raise UserError(f"--sensors {self.sensors} names a sensor twice, or none with --cycle_feature "
                            f"false; list each input sensor once")
        caps = [self.rul_cap, *self.health_thresholds]
        if not self.health_thresholds or any(b >= a for a, b in zip(caps, caps[1:])):
            raise UserError(f"--health_thresholds {self.health_thresholds} must be RULs below --rul_cap, "
                            f"each lower than the one before; e.g. 50,15")
        if len(self.wd_decay_epochs) != len(self.wd_decay_factors):
            raise UserError("--wd_decay_epochs and --wd_decay_factors differ in length; give one factor "
                            "per epoch")
        if self.folds > 1 and self.resume_from not in (None, "latest"):
            raise UserError("--folds resume each fold from its own newest checkpoint; pass --resume_from "
                            "latest")


# ----------------------------------------------------------------------------------------------
# Data, in parts that can be replaced one at a time (docs/dual_task.md#copy-and-edit):
#   read_runs            the files -> Runs, checked by check_runs whatever the reader
#   validation_units     which units validate: split by unit, never by window
#   fit_preprocessing    statistics from the training units only; saved beside the model
#   apply_preprocessing  normalise per operating condition, smooth, add the cycle number
#   windows_per_unit     sliding windows to train on; each unit's last one to test and predict
# ----------------------------------------------------------------------------------------------

SUBSETS = ["FD001", "FD002", "FD003", "FD004"]


@dataclass
class Runs:
    """Units cycle by cycle: a row per unit and cycle, each unit's rows together and in order."""

    name: str  # what the data is, for the console and results.json
    sensor_names: list[str]  # the columns of `sensors`
    unit: np.ndarray  # (rows,) unit id, a whole number
    cycle: np.ndarray  # (rows,) cycles run so far
    condition: np.ndarray  # (rows,) operating condition: normalised per condition
    sensors: np.ndarray  # (rows, sensors)
    rul: np.ndarray  # (rows,) cycles left until failure; NaN where unknown (to predict)
    source: str = ""  # the file the rows came from, for error messages

    def select(self, rows: np.ndarray) -> "Runs":
        return dataclasses.replace(self, unit=self.unit[rows], cycle=self.cycle[rows], rul=self.rul[rows],
                                   condition=self.condition[rows], sensors=self.sensors[rows])


def read_table(path: Path, columns: int = 26) -> np.ndarray:
    """A C-MAPSS file (or its .gz copy, as data/cmapss ships them): rows of `columns` finite numbers
    (unit, cycle, 3 operational settings, 21 sensors; the RUL file: one)."""
    if not path.is_file() and Path(f"{path}.gz").is_file():
        path = Path(f"{path}.gz")
    if not path.is_file():
        raise UserError(f"missing data file {path}; point --data at a folder of C-MAPSS files")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": below
            table = np.loadtxt(path, ndmin=2)
    except (ValueError, EOFError, OSError) as err:
        raise UserError(f"{path} is malformed ({err}); each row must be {columns} numbers") from None
    if table.size == 0 or table.shape[1] != columns:
        found = f"has {table.shape[1]} columns, expected {columns}" if table.size else "is empty"
        raise UserError(f"{path} {found}; restore the original C-MAPSS file")
    bad = ~np.isfinite(table) | ((table < 0) if columns == 1 else False)  # RUL_FD00x: cycles left
    if bad.any():
        row = int(np.argwhere(bad)[0, 0]) + 1
        what = "NaN or Inf" if columns > 1 else "NaN or Inf or a negative RUL"
        raise UserError(f"{path} row {row} holds {what}; fix or remove that row")
    return table, path


def read_runs(cfg: Config, predict_file: str | None = None) -> dict[str, Runs]:
    """C-MAPSS: {"train": engines run to failure, "test": engines stopped early, with the true RUL
    at the stop}, or with `predict_file` {"predict": that file's engines, RUL unknown}."""
    folder = Path(cfg.data).parent
    subset = Path(cfg.data).name
    if subset not in SUBSETS:
        raise UserError(f"--data {cfg.data} names no C-MAPSS subset; pass one of {', '.join(SUBSETS)}, "
                        f"or <folder>/FD00x for its train_, test_ and RUL_FD00x.txt")
    if folder == Path("."):
        folder = Path(__file__).resolve().parent / "data" / "cmapss"  # the copy shipped here
    if not folder.is_dir():
        raise UserError(f"data folder {folder} not found; pass --data <folder>/{subset}")
    if max(cfg.sensors, default=0) > 21:
        raise UserError(f"--sensors {max(cfg.sensors)} does not exist; C-MAPSS has sensors 1 to 21")

    def runs(path: Path, rul_at_stop: np.ndarray | None = None, name=f"C-MAPSS {subset}") -> Runs:
        table, path = read_table(path)
        units, at = np.unique(table[:, 0], return_inverse=True)
        last_cycle = np.full(len(units), -np.inf)
        np.maximum.at(last_cycle, at, table[:, 1])
        rul = last_cycle[at] - table[:, 1]  # cycles to the unit's last row
        if rul_at_stop is not None and len(rul_at_stop) != len(units):
            raise UserError(f"RUL_{subset} has {len(rul_at_stop)} rows for {len(units)} test engines; "
                            f"restore the original files")
        if rul_at_stop is not None:  # test engines stop early: RUL_FD00x gives the RUL at their last row
            rul = rul + rul_at_stop[at]
        settings = np.round(table[:, 2:5] * [1, 100, 1]).astype(np.int64)  # six tight set points
        condition = settings @ np.array([10**6, 10**3, 1])
        names = [f"sensor {s}" for s in cfg.sensors]
        sensors = table[:, [4 + s for s in cfg.sensors]]
        return Runs(name, names, table[:, 0], table[:, 1], condition, sensors, rul, str(path))

    if predict_file is not None:
        predict = runs(Path(predict_file), name=f"{predict_file} (C-MAPSS format)")
        return {"predict": dataclasses.replace(predict, rul=np.full(len(predict.rul), np.nan))}
    rul_at_stop = read_table(folder / f"RUL_{subset}.txt", columns=1)[0][:, 0]
    return {"train": runs(folder / f"train_{subset}.txt"),
            "test": runs(folder / f"test_{subset}.txt", rul_at_stop)}


def validation_units(units: np.ndarray, cfg: Config, fold: int) -> np.ndarray:
    """The units held out: a seeded share, or fold `fold` of --folds disjoint ones. By unit, never
    by window: the windows of one unit are strongly correlated."""
    order = np.random.default_rng(cfg.seed).permutation(units)
    if cfg.folds > len(units):
        raise UserError(f"--folds {cfg.folds} needs as many training units, the data has "
                        f"{len(units)}; lower --folds")
    if cfg.folds > 1:
        return np.array_split(order, cfg.folds)[fold]
    n_val = max(1, round(cfg.val_fraction * len(units)))
    if n_val >= len(units):
        raise UserError(f"the training data has {len(units)} unit(s) and --val_fraction "
                        f"{cfg.val_fraction:g} holds out {n_val} for validation, leaving none to train "
                        f"on; lower --val_fraction or add units")
    return order[:n_val]


def fit_preprocessing(train: Runs, cfg: Config) -> dict:
    """What turns rows into inputs, fitted on the training units only, as JSON: saved beside the
    model, so that predict_dual_task.py prepares new data as the training data was."""
    conditions = train.condition if cfg.per_condition_norm else np.zeros_like(train.condition)
    stats = {}
    for c in np.unique(conditions):
        rows = train.sensors[conditions == c]
        std = np.where(rows.std(0) > 1e-8, rows.std(0), 1.0)
        stats[str(c)] = {"mean": rows.mean(0).tolist(), "std": std.tolist()}
    kept = ["per_condition_norm", "smoothing", "cycle_feature", "window", "rul_cap", "health_thresholds"]
    return {"data": train.name, "sensor_names": train.sensor_names, "sensor_stats": stats,
            "cycle_mean": float(train.cycle.mean()), "cycle_std": float(train.cycle.std()),
            **{key: getattr(cfg, key) for key in kept}}


def smooth_per_unit(features: np.ndarray, units: np.ndarray, alpha: float) -> np.ndarray:
    """Causal exponential smoothing within each unit, s_t = a x_t + (1-a) s_t-1: no future."""
    out = features.copy()
    for t in range(1, len(out)):
        if units[t] == units[t - 1]:
            out[t] = alpha * features[t] + (1 - alpha) * out[t - 1]
    return out


def apply_preprocessing(runs: Runs, prep: dict) -> np.ndarray:
    """(rows, features): sensors normalised per condition, smoothed per unit; the cycle number."""
    conditions = runs.condition if prep["per_condition_norm"] else np.zeros_like(runs.condition)
    features = np.empty(runs.sensors.shape)
    for c in np.unique(conditions):
        if str(c) not in prep["sensor_stats"]:
            raise UserError(f"an operating condition of {runs.name} never occurs in the units trained "
                            f"on; train with --per_condition_norm false")
        stats = prep["sensor_stats"][str(c)]
        rows = conditions == c
        features[rows] = (runs.sensors[rows] - stats["mean"]) / np.array(stats["std"])
    check_inputs(runs, features)  # before smoothing, which could hide an overflow
    if prep["smoothing"] > 0:
        features = smooth_per_unit(features, runs.unit, prep["smoothing"])
    if prep["cycle_feature"]:  # how long the unit has run is known at test time too
        cycle = (runs.cycle - prep["cycle_mean"]) / prep["cycle_std"]
        features = np.concatenate([features, cycle[:, None]], axis=1)
    return check_inputs(runs, features)


def windows_per_unit(features, rul, units, window: int, last_only: bool):
    """Sliding windows per unit (all, or each unit's last; a short unit is front-padded with its
    first cycle): (windows, the RUL at each window's end, each window's unit)."""
    xs = []
    ys = []
    for unit in np.unique(units):
        x = features[units == unit]
        y = rul[units == unit]
        if len(x) < window and not last_only:
            raise UserError(f"training unit {int(unit)} has {len(x)} cycles, fewer than --window "
                            f"{window}; lower --window or remove that unit")
        x = np.concatenate([np.repeat(x[:1], max(0, window - len(x)), axis=0), x])
        if last_only:
            xs.append(x[None, -window:])
            ys.append(y[-1:])
        else:
            xs.append(np.lib.stride_tricks.sliding_window_view(x, window, axis=0).transpose(0, 2, 1))
            ys.append(y[window - 1:])
    ids = [np.full(len(y), unit, dtype=np.int64) for unit, y in zip(np.unique(units), ys)]
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.float32), np.concatenate(ids)


def cut_like_test(features, rul, units, cuts: int, seed: int):
    """Each validation unit cut at `cuts` seeded points, uniform from 20% of its life to one cycle
    before failure; each cut a new unit, scored like a test unit (its last window)."""
    rng = np.random.default_rng([seed, 1])  # its own stream: the unit split does not move
    parts = []
    for unit in np.unique(units):
        rows = np.nonzero(units == unit)[0]
        low = max(1, math.ceil(0.2 * len(rows)))
        parts += [rows[:n] for n in rng.integers(low, max(low, len(rows) - 1), size=cuts, endpoint=True)]
    keep = np.concatenate(parts)
    return features[keep], rul[keep], np.repeat(np.arange(len(parts)), [len(p) for p in parts])


def health_state(rul: np.ndarray, thresholds: list[int]) -> np.ndarray:
    """0 above the first threshold (healthy), one more per threshold the RUL is at or below."""
    return (rul[:, None] <= np.array(thresholds)[None, :]).sum(1).astype(np.int64)


@dataclass
class Split(torch.utils.data.Dataset):
    """Windows as tensors; `__getitems__` hands the loader a whole batch by one index op."""

    x: torch.Tensor  # (N, window, features) float32
    rul: torch.Tensor  # (N,) float32, capped
    health: torch.Tensor  # (N,) int64
    unit: torch.Tensor  # (N,) the unit of each window

    def __len__(self):
        return len(self.rul)

    def __getitems__(self, rows):
        return self.x[rows], self.rul[rows], self.health[rows]


def load_splits(cfg: Config, runs: dict[str, Runs], fold: int = 0) -> tuple[dict[str, Split], dict]:
    """The parts wired together: train/val/val_cut/test windows, and the preprocessing."""
    train = runs["train"]
    test = runs["test"]
    is_val = np.isin(train.unit, validation_units(np.unique(train.unit), cfg, fold))
    prep = fit_preprocessing(train.select(~is_val), cfg)
    x = apply_preprocessing(train, prep)
    rul = np.minimum(train.rul, cfg.rul_cap)
    val = (x[is_val], rul[is_val], train.unit[is_val])
    parts = {"train": ((x[~is_val], rul[~is_val], train.unit[~is_val]), False), "val": (val, False),
             "val_cut": (cut_like_test(*val, cfg.val_cuts, cfg.seed), True),  # scored like the test
             "test": ((apply_preprocessing(test, prep), np.minimum(test.rul, cfg.rul_cap), test.unit), True)}
    splits = {}
    for name, (rows, last_only) in parts.items():
        x, y, unit = windows_per_unit(*rows, cfg.window, last_only)
        health = health_state(y, cfg.health_thresholds)
        splits[name] = Split(*(torch.from_numpy(a) for a in (x, y, health, unit)))
    return splits, prep


def make_loader(split: Split, batch_size: int, shuffle: bool, seed: int):
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(split, batch_size, shuffle, generator=generator,
                                       collate_fn=lambda batch: batch)  # whole batches already


# ----------------------------------------------------------------------------------------------
# Model: Conv1d over time -> bidirectional GRU -> attention pooling -> RUL head + health head
# ----------------------------------------------------------------------------------------------

# FSDP2 warns that the model returns a view (the squeezed RUL): an in-place op on it would skip a
# hook. The loop never modifies outputs in place: nothing a user could act on.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


class DualTaskNet(nn.Module):
    def __init__(self, num_features: int, cfg: Config):
        super().__init__()
        c = cfg.conv_channels
        h = cfg.hidden_size
        k = cfg.kernel_size
        self.conv = nn.Sequential(nn.Conv1d(num_features, c, k, padding=k // 2), nn.GELU(),
                                  nn.Conv1d(c, c, k, padding=k // 2), nn.GELU())
        self.gru = nn.GRU(c, h, num_layers=cfg.gru_layers, batch_first=True, bidirectional=True,
                          dropout=cfg.dropout if cfg.gru_layers > 1 else 0.0)
        self.norm = nn.LayerNorm(2 * h)
        # No bias: softmax over time ignores a constant, so its gradient is zero, and AdamW would
        # turn rounding noise into lr-sized steps (1 and 2 processes would drift apart).
        self.attention = nn.Linear(2 * h, 1, bias=False)

        def head(outputs):  # the attention-pooled summary and the last time step
            return nn.Sequential(nn.Linear(4 * h, h), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(h, outputs))

        self.rul_head = head(1)
        self.health_head = head(len(cfg.health_thresholds) + 1)  # a logit per health state

    def forward(self, x):  # x: (batch, time, features)
        z = self.conv(x.transpose(1, 2)).transpose(1, 2)
        z, _ = self.gru(z)
        z = self.norm(z)
        weights = torch.softmax(self.attention(z), dim=1)  # (batch, time, 1)
        summary = torch.cat([(weights * z).sum(1), z[:, -1]], dim=-1)
        return self.rul_head(summary).squeeze(-1), self.health_head(summary)  # RUL / cap


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors): decaying them only hurts."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay, "base_weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0, "base_weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------
# Loss: AMNL, each task loss divided by a running average of itself, then weighted
# ----------------------------------------------------------------------------------------------


class AMNLLoss:
    """`w * rul_loss / avg(rul_loss) + (1 - w) * health_loss / avg(health_loss)`.

    Dividing by a running average puts both tasks on the same scale whatever their units, so
    neither dominates. The averages are device tensors updated without a host sync, skip
    non-finite values (one bad batch cannot poison them), and are saved in checkpoints.
    """

    def __init__(self, cfg: Config, device, reduce=lambda losses: losses):
        self.reduce = reduce  # under DDP: the mean over processes: every rank normalises alike
        self.decay = cfg.amnl_decay
        self.rul_weight = cfg.rul_loss_weight
        self.failure_weight = cfg.failure_weight
        self.averages = torch.zeros(2, device=device)  # [rul, health], bias-corrected by the count
        self.updates = torch.zeros(2, device=device)  # of finite losses: a skipped one changes neither

    def __call__(self, rul_pred, rul_true, health_logits, health_true):
        # MSE weighted towards failure: errors near the end of life matter most (and cost most in PHM08).
        weight = 1.0 + self.failure_weight * (1.0 - rul_true)
        rul_loss = (weight * (rul_pred - rul_true) ** 2).mean() / weight.mean()
        losses = torch.stack([rul_loss, F.cross_entropy(health_logits, health_true)])
        with torch.no_grad():
            observed = self.reduce(losses.detach())
            finite = torch.isfinite(observed)
            updated = self.decay * self.averages + (1 - self.decay) * observed
            self.averages.copy_(torch.where(finite, updated, self.averages))
            self.updates += finite
            scale = (self.averages / (1 - self.decay**self.updates).clamp_min(1e-12)).clamp_min(1e-8)
        normalised = losses / scale
        total = self.rul_weight * normalised[0] + (1 - self.rul_weight) * normalised[1]
        return total, losses.detach()

    def state_dict(self):
        return {"averages": self.averages.cpu(), "updates": self.updates.cpu()}

    def load_state_dict(self, state):
        self.averages.copy_(state["averages"])
        self.updates.copy_(state["updates"])


# ----------------------------------------------------------------------------------------------
# The training loop, and what it keeps between restarts
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainState(LoopState):
    """What the loop needs to continue after a restart, beyond model, optimizer and RNG."""

    best_val_rmse: float = math.inf
    best_epoch: int = -1
    epochs_since_best: int = 0
    plateau_best: float = math.inf  # ReduceLROnPlateau, written out: stateless but these
    plateau_bad_epochs: int = 0
    plateau_factor: float = 1.0
    best_weights: dict = field(default_factory=dict)  # the EMA at the best epoch, whole


def lr_at(step: int, cfg: Config, state: TrainState, steps_per_epoch: int, total_steps: int,
          lr_scale: float) -> float:
    """Base LR x backoff x schedule: warmup from 0.1x to 1x, then cosine or the plateau factor."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if cfg.scheduler == "cosine":
        factor = warmup_cosine(step, warmup, total_steps, start_factor=0.1, final_factor=cfg.min_lr_factor)
    else:
        factor = linear_warmup(step, warmup, start_factor=0.1) * max(state.plateau_factor, cfg.min_lr_factor)
    return cfg.lr * lr_scale * factor


def step_plateau(state: TrainState, val_rmse: float, cfg: Config) -> None:
    """ReduceLROnPlateau (mode min): the factor times --plateau_factor after --plateau_patience bad epochs."""
    state.plateau_bad_epochs = 0 if val_rmse < state.plateau_best else state.plateau_bad_epochs + 1
    state.plateau_best = min(state.plateau_best, val_rmse)
    if state.plateau_bad_epochs > cfg.plateau_patience:
        state.plateau_factor *= cfg.plateau_factor
        state.plateau_bad_epochs = 0


def set_weight_decay(optimizer, factor: float) -> None:
    """Write `factor` x each param group's `base_weight_decay` into its weight decay."""
    for group in optimizer.param_groups:
        group["weight_decay"] = group["base_weight_decay"] * factor


def milestone_factor(epoch: int, milestones: list[int], factors: list[float]) -> float:
    """A step schedule: 1.0, then factors[i] from epoch milestones[i] on (e.g. weight decay x0.5 after 100 epochs)."""
    factor = 1.0
    for after, f in zip(milestones, factors):
        if epoch >= after:
            factor = f
    return factor


def train(cfg, accelerator, model, optimizer, loaders, loss_fn, ema, guard, state: TrainState, run: Run) -> bool:
    """Train until --epochs, --max_steps or early stopping; True if a signal stopped it (checkpointed)."""
    steps_per_epoch = math.ceil(len(loaders["train"]) / cfg.grad_accum_steps)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    objects = {"ema": ema, "guard": guard, "amnl": loss_fn}  # checkpointed beside the loop's state
    warn_if_short(total_steps, steps_per_epoch, cfg.max_steps, "the test set is scored with the initial weights",
                  "no validation runs, and the test set is scored with the last EMA weights")

    def current_lr():
        return lr_at(state.step, cfg, state, steps_per_epoch, total_steps, guard.lr_scale)

    def finished():  # also true for a resumed run that had already finished training
        stopped_early = state.epochs_since_best >= cfg.early_stopping_patience
        return state.epoch >= cfg.epochs or state.step >= total_steps or stopped_early

    set_lr(optimizer, current_lr())
    # The bar shows on the main process's terminal (disable=None: hidden when not a terminal).
    bar = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_local_main_process or None)
    running = RunningMean(3, accelerator.device)  # total, RUL and health loss since the last log line
    done = preempted = False
    while not done and not finished():
        epoch_start = time.perf_counter()
        samples = 0
        loaders["train"].set_epoch(state.epoch)  # a different, reproducible shuffle every epoch
        batches = loaders["train"]
        if state.batches_done:  # resumed mid-epoch
            batches = accelerator.skip_first_batches(batches, state.batches_done)
        set_weight_decay(optimizer, milestone_factor(state.epoch, cfg.wd_decay_epochs, cfg.wd_decay_factors))
        model.train()
        for x, rul, health in batches:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    rul_pred, health_logits = model(x)
                loss, task_losses = loss_fn(rul_pred.float(), rul / cfg.rul_cap, health_logits.float(), health)
                accelerator.backward(loss)
                guard.record_loss(loss)
                if accelerator.sync_gradients:  # clip full updates only: otherwise the norm is partial
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    guard.mask_nonfinite_update(grad_norm)  # a NaN/Inf update becomes a no-op
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_done += 1
            samples += len(rul) * accelerator.num_processes  # all processes'
            running.add(loss, *task_losses)
            if not accelerator.sync_gradients:
                continue

            state.step += 1
            ema.update()
            bar.update(1)
            log_step = state.step % cfg.log_every == 0
            if log_step:
                mean = running.pop_mean(accelerator)  # the only per-interval sync
                guard.poll(state.step)  # a NaN/Inf since the last log: fp32 from here on
                lr = optimizer.param_groups[0]["lr"]
                run.log.log({"train/loss": mean[0], "train/rul_loss": mean[1], "train/health_loss": mean[2],
                             "train/grad_norm": grad_norm.item(), "train/lr": lr}, state.step)
                bar.set_postfix(loss=f"{mean[0]:.3f}", lr=f"{lr:.2e}")
            set_lr(optimizer, current_lr())
            preempted = run.preemption.should_stop(accelerator, at_sync_point=log_step)
            done = preempted or state.step >= total_steps
            mid_epoch = state.batches_done < len(loaders["train"])  # an epoch's end has its own
            if mid_epoch and (done or cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0):
                save_checkpoint(accelerator, run.dir, state, objects, cfg)
            if done:
                break
        if done and state.batches_done < len(loaders["train"]):
            break  # stopped mid-epoch by --max_steps: no end-of-epoch evaluation

        # End of epoch: validate with the EMA weights; best weights, early stopping, plateau.
        guard.poll(state.step)
        seconds = time.perf_counter() - epoch_start
        state.train_samples += samples
        state.train_seconds += seconds
        with ema.swapped_in():
            val = {"windows": evaluate(model, loaders["val"], accelerator, cfg.rul_cap),
                   "cut": evaluate(model, loaders["val_cut"], accelerator, cfg.rul_cap)}
        selected = val[cfg.val_metric]["rmse"]  # --val_metric: what picks, stops and schedules
        improved = selected < state.best_val_rmse
        state.epoch += 1
        state.batches_done = 0
        state.epochs_since_best = 0 if improved else state.epochs_since_best + 1
        if improved:
            state.best_val_rmse = selected
            state.best_epoch = state.epoch
            state.best_weights = ema.state_dict()  # whole tensors: restorable on any processes
        if cfg.scheduler == "plateau" and state.step >= cfg.warmup_epochs * steps_per_epoch:
            step_plateau(state, selected, cfg)
            set_lr(optimizer, current_lr())
        report_epoch(accelerator, run, state, val, samples / seconds, optimizer.param_groups[0]["lr"])
        save_checkpoint(accelerator, run.dir, state, objects, cfg, best=improved)
        if state.epochs_since_best >= cfg.early_stopping_patience:
            accelerator.print(f"early stopping: no better validation RMSE for {cfg.early_stopping_patience} epochs")
    bar.close()
    return preempted


def report_epoch(accelerator, run: Run, state: TrainState, val: dict, speed: float, lr: float) -> None:
    """An epoch's end in metrics.jsonl (and the trackers), and its line on the console."""
    memory = peak_memory_mb(accelerator.device)
    run.log.log({"epoch": state.epoch, "val/rmse": val["windows"]["rmse"], "val/rmse_cut": val["cut"]["rmse"],
                 "val/health_accuracy": val["windows"]["health_accuracy"], "train/samples_per_second": speed,
                 "peak_memory_mb": memory, "train/lr": lr}, state.step)
    accelerator.print(f"epoch {state.epoch:3d} | val RMSE {val['windows']['rmse']:6.2f} cut "
                      f"{val['cut']['rmse']:6.2f} health acc {val['windows']['health_accuracy']:.3f} | best "
                      f"{state.best_val_rmse:6.2f} @ {state.best_epoch} | lr {lr:.2e} | {speed:,.0f} samples/s "
                      f"| {memory:,.0f} MB", flush=True)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, loader, accelerator, rul_cap: int) -> dict:
    """RMSE in cycles, health accuracy and the predictions; each sample counted once across processes."""
    model.eval()
    parts = []
    for x, rul, health in loader:
        with accelerator.autocast():
            rul_pred, health_logits = model(x)
        prob = health_logits.float().softmax(-1)
        parts.append(accelerator.gather_for_metrics((rul_pred.float(), rul, prob, health)))
    model.train()
    pred, true, prob, health = (torch.cat([p[i] for p in parts]).cpu() for i in range(4))
    pred = (pred * rul_cap).clamp(0, rul_cap)  # the model predicts RUL / cap
    if not torch.isfinite(pred).all():  # weights that overflowed: no result beats a meaningless one
        raise NonFiniteTrainingError("the model's predictions are not finite (its weights diverged); lower "
                                     "--lr, then resume from a checkpoint before it or start again")
    return prediction_scores(pred, true, prob, health)


def prediction_scores(pred, true, health_prob, health) -> dict:
    """RMSE and health accuracy, with the predictions (a fold ensemble averages those)."""
    return {"rmse": torch.sqrt(((pred - true) ** 2).mean()).item(),
            "health_accuracy": (health_prob.argmax(-1) == health).float().mean().item(),
            "num_samples": len(true), "pred": pred, "true": true, "health_prob": health_prob, "health": health}


def phm08_score(pred: torch.Tensor, true: torch.Tensor) -> float | None:
    """PHM08 challenge score: late predictions (d > 0) cost more than early ones. None when it overflows
    (some 900 cycles late: a large --rul_cap and a model that has not learned)."""
    d = pred - true
    score = torch.where(d < 0, torch.exp(-d / 13) - 1, torch.exp(d / 10) - 1).sum().item()
    return score if math.isfinite(score) else None


def test_results(scores: dict, cfg: Config) -> dict:
    """The test set's numbers for results.json, PHM08 among them (--phm08)."""
    return {"test_rmse": scores["rmse"], "test_score": phm08_score(scores["pred"], scores["true"]) if cfg.phm08
            else None, "test_health_accuracy": scores["health_accuracy"], "test_units": scores["num_samples"]}


# ----------------------------------------------------------------------------------------------
# Outputs: results, per-unit predictions and plots (main process only)
# ----------------------------------------------------------------------------------------------


def write_predictions(path: Path, units, pred, health_prob, true=None) -> None:
    """CSV, a row per unit: the predicted RUL, the likeliest health state, each state's probability
    (and the true RUL where known)."""
    header = ["unit", "rul", "health_state", *[f"p_state_{k}" for k in range(health_prob.shape[1])]]
    rows = [[int(u), f"{r:.4f}", int(p.argmax()), *[f"{q:.6f}" for q in p.tolist()]]
            for u, r, p in zip(units, pred.tolist(), health_prob)]
    if true is not None:
        header.append("true_rul")
        rows = [row + [f"{t:g}"] for row, t in zip(rows, true.tolist())]
    write_atomic(path, "\n".join(",".join(map(str, row)) for row in [header, *rows]) + "\n")


def write_test_outputs(run_dir: Path, test: dict, results: dict, units, label: str, picked: str = "") -> None:
    """results.json, test_predictions.csv and .png, and one console line."""
    write_json(run_dir / "results.json", results)
    write_predictions(run_dir / "test_predictions.csv", units, test["pred"], test["health_prob"], test["true"])
    score = "" if results["test_score"] is None else f" | PHM08 score {results['test_score']:.1f}"
    plot_test_predictions(run_dir / "test_predictions.png", test["pred"], test["true"], results["test_rmse"], score)
    print(f"{label}test RMSE {results['test_rmse']:.2f}{score} | health accuracy "
          f"{results['test_health_accuracy']:.3f}{picked} | {results['wall_seconds']:.0f} s | results in "
          f"{run_dir / 'results.json'}")


# ----------------------------------------------------------------------------------------------
# main: check every input, then fit each fold's model (train, the best weights, test once), average
# ----------------------------------------------------------------------------------------------

RUN_OUTPUTS = ["config.yaml", "results.json", "metrics.jsonl", "model.safetensors", "preprocessing.json", "fold_*",
               "test_predictions.csv", "training_curves.png", "test_predictions.png", "checkpoints",
               "dual_task"]  # what a run writes ("dual_task": tensorboard)


def run_dirs(cfg: Config) -> list[Path]:
    """Where each model trains: --output_dir, or with --folds K its fold_1 ... fold_K."""
    out = Path(cfg.output_dir)
    return [out] if cfg.folds == 1 else [out / f"fold_{k}" for k in range(1, cfg.folds + 1)]


def fit_one(cfg, accelerator, fold: int, data: tuple, resume_paths: list, folder: RunFolder,
            preemption: Preemption, started: float):
    """Train fold `fold`'s model (validated on its own units), put in its best EMA weights, test it
    once, save it. Returns its results and its test predictions."""
    splits, prep = data
    run_dir = run_dirs(cfg)[fold]
    set_seed(cfg.seed + fold)  # each fold's initialisation, whatever ran before
    loaders = {name: make_loader(splits[name], cfg.batch_size * (1 if name == "train" else 4),
                                 name == "train", cfg.seed) for name in ("train", "val", "val_cut", "test")}
    model = DualTaskNet(num_features=splits["train"].x.shape[-1], cfg=cfg)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=True)
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *loaders.values())
    loaders = dict(zip(loaders, prepared))
    loss_fn = AMNLLoss(cfg, accelerator.device, reduce=lambda losses: accelerator.reduce(losses, "mean"))
    ema = EMA(model.parameters(), decay=cfg.ema_decay)
    guard = NonFiniteGuard(accelerator, model, optimizer, cfg.nan_lr_backoff, cfg.max_nonfinite_in_a_row)
    state = TrainState()
    if resume_paths[fold] is not None:  # the objects that train() checkpoints
        objects = {"ema": ema, "guard": guard, "amnl": loss_fn}
        load_checkpoint(accelerator, resume_paths[fold], state, objects, cfg)
    if fold == 0:  # every check has passed: from here on the run writes
        start_run(accelerator, cfg, folder, RUN_OUTPUTS, fresh=not any(resume_paths), project="dual_task")
    log = MetricsLog(accelerator, run_dir, step_offset=state.step if resume_paths[fold] else None)
    val_units = sorted(int(u) for u in splits["val"].unit.unique())
    if cfg.folds > 1:
        accelerator.print(f"fold {fold + 1}/{cfg.folds}: validation units {val_units}")
    if train(cfg, accelerator, model, optimizer, loaders, loss_fn, ema, guard, state,
             Run(run_dir, log, preemption)):
        exit_preempted(accelerator, state.step)

    # The best EMA weights on validation (none if no epoch finished: the last) meet the test set once.
    if state.best_weights:
        ema.load_state_dict(state.best_weights)
    ema.copy_to()
    test = evaluate(model, loaders["test"], accelerator, cfg.rul_cap)
    save_model_atomically(accelerator, model, run_dir)  # -> model.safetensors
    best = state.best_val_rmse if state.best_epoch >= 0 else None
    results = {"data": prep["data"], **test_results(test, cfg), "val_metric": cfg.val_metric,
               "best_val_rmse": best, "best_epoch": state.best_epoch,
               **run_facts(accelerator, state, guard, cfg.seed, started)}
    results |= {"fold": fold + 1, "val_units": val_units} if cfg.folds > 1 else {}
    if accelerator.is_main_process:
        write_json(run_dir / "preprocessing.json", prep)  # beside the model: what predict needs
        plot_training_curves(run_dir, cfg.rul_cap)
        picked = " | no epoch finished"
        if best is not None:
            picked = f" | best val RMSE ({cfg.val_metric}) {best:.2f} at epoch {state.best_epoch}"
        label = f"fold {fold + 1}: " if cfg.folds > 1 else ""
        write_test_outputs(run_dir, test, results, splits["test"].unit, label, picked)
    accelerator.free_memory()  # the next fold's objects are prepared and checkpointed alone
    return results, test


def ensemble(cfg: Config, fitted: list[tuple[dict, dict]], wall_seconds: float) -> tuple[dict, dict]:
    """--folds K: the folds' test predictions (RUL, health probabilities) averaged, scored as one."""
    folds = [r for r, _ in fitted]
    tests = [t for _, t in fitted]
    pred = torch.stack([t["pred"] for t in tests]).mean(0)
    prob = torch.stack([t["health_prob"] for t in tests]).mean(0)
    test = prediction_scores(pred, tests[0]["true"], prob, tests[0]["health"])  # the same units
    best_vals = [r["best_val_rmse"] for r in folds if r["best_val_rmse"] is not None] or [np.nan]
    results = {**test_results(test, cfg), "folds": len(fitted), "best_val_rmse_mean": float(np.mean(best_vals)),
               "fold_test_rmse_mean": float(np.mean([r["test_rmse"] for r in folds])),
               "optimizer_steps": sum(r["optimizer_steps"] for r in folds), "wall_seconds": wall_seconds,
               "peak_memory_mb": max(r["peak_memory_mb"] for r in folds)}
    keep = ("data", "num_processes", "distributed_type", "mixed_precision", "seed", "val_metric")
    return results | {k: folds[0][k] for k in keep} | {"per_fold": folds}, test


def main(argv=None):
    cfg = Config.parse(argv)
    if cfg.num_threads:  # 1 by default: beside another busy process, far faster than all cores
        torch.set_num_threads(cfg.num_threads)
    wall_start = time.perf_counter()
    accelerator = make_accelerator(cfg.mixed_precision, cfg.grad_accum_steps, cfg.report_to, cfg.output_dir)
    set_seed(cfg.seed)
    with RunFolder(accelerator, cfg.output_dir) as folder:  # one run per folder
        # Everything bad input can fail, before the first write (start_run, in the first fold): the
        # output folder, every fold's checkpoint, the data (whichever reader read it).
        resume_paths = preflight(accelerator, cfg, run_dirs(cfg))
        runs = check_runs(read_runs(cfg))
        folds = [load_splits(cfg, runs, fold) for fold in range(cfg.folds)]  # (splits, preprocessing)
        splits, prep = folds[0]
        accelerator.print(f"{prep['data']}: {len(splits['train']):,} training windows, "
                          f"{len(splits['val']):,} validation windows ({len(splits['val_cut']):,} cuts), "
                          f"{len(splits['test']):,} test units; inputs: {', '.join(prep['sensor_names'])}"
                          + (", cycle number" if cfg.cycle_feature else "")
                          + (f"; {cfg.folds} folds" if cfg.folds > 1 else ""))
        # SIGTERM/SIGINT: in training, finish the step, checkpoint, exit 75; after it, finish the
        # final phase (test, save) and exit 0. A second signal stops at once.
        preemption = Preemption().install()
        fitted = []
        for fold, data in enumerate(folds):  # K models one after another, on every process
            started = wall_start if cfg.folds == 1 else time.perf_counter()
            fitted.append(fit_one(cfg, accelerator, fold, data, resume_paths, folder, preemption, started))
        results = fitted[0][0]
        if cfg.folds > 1:
            results, test = ensemble(cfg, fitted, time.perf_counter() - wall_start)
            if accelerator.is_main_process:
                write_test_outputs(Path(cfg.output_dir), test, results, splits["test"].unit,
                                   f"ensemble of {cfg.folds} folds: ")
        finish(accelerator, preemption)
    return results


if __name__ == "__main__":
    exit_on_user_error(main)
