"""Dual-task learning on NASA C-MAPSS: remaining-useful-life regression + health-state classification.

One model, two heads, combined by the AMNL loss (each task loss divided by a running average of
itself, then weighted 0.5/0.5). The same file runs on a CPU, one GPU, DDP or FSDP:

    python train_dual_task.py                                    # FD001 on this machine
    python train_dual_task.py --subset FD002 --epochs 80         # any field of Config is a flag
    python train_dual_task.py --config configs/fd004.yaml        # or a YAML file of them
    accelerate launch --config_file accelerate_configs/single_gpu.yaml train_dual_task.py --mixed_precision bf16
    python train_dual_task.py --output_dir runs/x --resume_from latest

Protocol: 20% of the training engines are held out for validation (split by engine). LR plateau,
early stopping and the best checkpoint use validation only; the test set is evaluated once, at the
end, with the best EMA weights: RMSE on each test engine's last cycle and the PHM08 score.

Reading order: Config, data, model, loss, train(), evaluate(), main().
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
from common.run_log import MetricsLog, check_output_dir, peak_memory_mb, start_run, write_json
from common.schedules import linear_warmup, set_lr, warmup_cosine

INFORMATIVE_SENSORS = [2, 3, 4, 7, 8, 9, 11, 12, 13, 14, 15, 17, 20, 21]


@dataclass
class Config:
    # data
    subset: str = setting("FD001", "C-MAPSS subset", choices=["FD001", "FD002", "FD003", "FD004"], same_on_resume=True)
    data_dir: str = setting("data/cmapss", "folder with {train,test,RUL}_FD00x.txt[.gz]", NON_EMPTY)
    sensors: list[int] = setting(INFORMATIVE_SENSORS, "sensor numbers used as inputs", between(1, 21), same_on_resume=True)
    window: int = setting(30, "cycles per input window", at_least(1), same_on_resume=True)
    rul_cap: int = setting(125, "piecewise-linear RUL cap, for training labels and the true test RUL", between(1, 100_000), same_on_resume=True)
    val_fraction: float = setting(0.2, "fraction of training engines held out for validation", between(0, 1, low_open=True, high_open=True), same_on_resume=True)
    folds: int = setting(1, "train this many models, each validated on its own engine-disjoint fold (then --val_fraction is 1/folds), "
                         "and average their test predictions (1: one model)", between(1, 100), same_on_resume=True)
    val_metric: str = setting("windows", "validation RMSE that picks the best epoch, stops early and drives the plateau scheduler: "
                              "'cut' scores each validation engine like a test engine (its last window at random cut points), "
                              "'windows' every window of it", choices=["windows", "cut"], same_on_resume=True)
    val_cuts: int = setting(10, "cut points per validation engine for the 'cut' score (fixed by --seed)", between(1, 1000), same_on_resume=True)
    healthy_above: int = setting(50, "RUL above this is 'healthy'", at_least(1), same_on_resume=True)
    critical_at_or_below: int = setting(15, "RUL at or below this is 'critical'; between is 'degrading'", at_least(0), same_on_resume=True)
    smoothing: float = setting(0.05, "causal exponential smoothing of the normalised sensors, weight of the newest cycle (0: off)", between(0, 1), same_on_resume=True)
    per_condition_norm: bool = setting(True, "normalise per operating condition (FD002/FD004 have six; FD001/FD003 one)", same_on_resume=True)
    cycle_feature: bool = setting(True, "add the cycle number (cycles run so far) as an input feature", same_on_resume=True)
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
    num_threads: int = setting(0, "PyTorch CPU threads per process (0: PyTorch's default, one per core)", between(0, 1024))

    def __post_init__(self):  # every field in its domain, then the rules that tie fields together
        check_domains(self)
        if len(set(self.sensors)) != len(self.sensors):
            raise UserError(f"--sensors {self.sensors} names a sensor twice; list each once")
        if not self.sensors and not self.cycle_feature:
            raise UserError("no input features: --sensors is empty and --cycle_feature is false; name at least one sensor")
        if not self.critical_at_or_below < self.healthy_above < self.rul_cap:
            raise UserError(f"the health thresholds must satisfy --critical_at_or_below < --healthy_above < --rul_cap, got "
                            f"{self.critical_at_or_below}, {self.healthy_above}, {self.rul_cap}; otherwise a health state never occurs")
        if len(self.wd_decay_epochs) != len(self.wd_decay_factors):
            raise UserError(f"--wd_decay_epochs has {len(self.wd_decay_epochs)} entries and --wd_decay_factors "
                            f"{len(self.wd_decay_factors)}; give one factor per epoch")


# ----------------------------------------------------------------------------------------------
# Data: read, label, split by engine, normalise on training engines, cut windows once as tensors
# ----------------------------------------------------------------------------------------------

NUM_COLUMNS = 26  # unit, cycle, 3 operational settings, 21 sensors


def read_table(path: Path, columns: int) -> np.ndarray:
    """Read a whitespace-separated C-MAPSS file (.txt or .txt.gz) into a float array."""
    if not path.is_file():
        raise UserError(f"missing data file {path}; point --data_dir at a folder with the C-MAPSS files")
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
    if columns == NUM_COLUMNS:  # engines: positive whole unit and cycle numbers, each engine's rows together, in cycle order
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


def rul_per_row(table: np.ndarray) -> np.ndarray:
    """Cycles left until each engine's last recorded cycle (training engines run to failure)."""
    units, cycles = table[:, 0], table[:, 1]
    last_cycle = {u: cycles[units == u].max() for u in np.unique(units)}
    return np.array([last_cycle[u] for u in units]) - cycles


def operating_condition(table: np.ndarray) -> np.ndarray:
    """The operating regime of each row: the three settings cluster tightly around six set points."""
    settings = np.round(table[:, 2:5] * [1, 100, 1]).astype(np.int64)
    return settings[:, 0] * 10**6 + settings[:, 1] * 10**3 + settings[:, 2]


def smooth_per_engine(features: np.ndarray, units: np.ndarray, alpha: float) -> np.ndarray:
    """Causal exponential smoothing within each engine (s_t = a x_t + (1-a) s_t-1): damps sensor noise, uses no future."""
    out = features.copy()
    for t in range(1, len(out)):
        if units[t] == units[t - 1]:
            out[t] = alpha * features[t] + (1 - alpha) * out[t - 1]
    return out


def windows_per_engine(features: np.ndarray, rul: np.ndarray, units: np.ndarray, window: int, last_only: bool):
    """Cut sliding windows per engine (all of them, or the last); short engines are front-padded."""
    xs, ys, ids = [], [], []
    for unit in np.unique(units):
        rows = units == unit
        x, y = features[rows], rul[rows]
        if len(x) < window:
            if not last_only:
                raise UserError(f"training engine {int(unit)} has {len(x)} cycles, fewer than --window {window}; "
                                f"lower --window or remove that engine")
            x = np.concatenate([np.repeat(x[:1], window - len(x), axis=0), x])  # repeat the first cycle
        if last_only:
            xs.append(x[None, -window:])
            ys.append(y[-1:])
        else:
            xs.append(np.lib.stride_tricks.sliding_window_view(x, window, axis=0).transpose(0, 2, 1))
            ys.append(y[window - 1:])
        ids.append(np.full(len(ys[-1]), unit, dtype=np.int64))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.float32), np.concatenate(ids)


# A validation engine cut like a test engine is observed for a uniform fraction of its life in this range (chosen
# in advance, not fitted to the test set): from early in life, when the RUL is far above the cap, to one cycle
# before failure.
VAL_CUT_RANGE = (0.2, 1.0)


def cut_like_test(features: np.ndarray, rul: np.ndarray, units: np.ndarray, cuts: int, seed: int):
    """Each engine cut at `cuts` random points; each cut becomes an engine observed up to there (a new unit id), to
    be scored like a test engine: by its last window and the RUL at the cut."""
    rng = np.random.default_rng([seed, 1])  # its own stream: the engine split does not move
    parts, new_units = [], []
    for unit in np.unique(units):
        rows = np.nonzero(units == unit)[0]
        low = max(1, math.ceil(VAL_CUT_RANGE[0] * len(rows)))
        for length in rng.integers(low, max(low, len(rows) - 1), size=cuts, endpoint=True):
            parts.append(rows[:length])
            new_units.append(np.full(length, len(new_units)))
    keep = np.concatenate(parts)
    return features[keep], rul[keep], np.concatenate(new_units)


def health_state(rul: np.ndarray, cfg: Config) -> np.ndarray:
    """0 healthy, 1 degrading, 2 critical, from the (capped) RUL."""
    return np.where(rul > cfg.healthy_above, 0, np.where(rul > cfg.critical_at_or_below, 1, 2)).astype(np.int64)


@dataclass
class Split:
    x: torch.Tensor  # (N, window, features) float32
    rul: torch.Tensor  # (N,) float32, capped
    health: torch.Tensor  # (N,) int64
    unit: torch.Tensor  # (N,) engine id of each window


def load_cmapss(cfg: Config, fold: int = 0) -> dict[str, Split]:
    data_dir = Path(cfg.data_dir)
    if not data_dir.is_absolute() and not data_dir.exists():
        data_dir = Path(__file__).resolve().parent / data_dir  # the copy shipped with this repo
    if not data_dir.is_dir():
        raise UserError(f"data folder {cfg.data_dir} not found; pass --data_dir with the C-MAPSS files")

    def find(name):
        plain = data_dir / name
        return plain if plain.is_file() or not (data_dir / f"{name}.gz").is_file() else data_dir / f"{name}.gz"

    train = read_table(find(f"train_{cfg.subset}.txt"), NUM_COLUMNS)
    test = read_table(find(f"test_{cfg.subset}.txt"), NUM_COLUMNS)
    test_rul_last = read_table(find(f"RUL_{cfg.subset}.txt"), 1)[:, 0]
    test_units = np.unique(test[:, 0])
    if len(test_rul_last) != len(test_units):
        raise UserError(f"RUL_{cfg.subset} has {len(test_rul_last)} rows for {len(test_units)} test engines; "
                        f"restore the original files")

    # Split by engine, never by window: windows of one engine are strongly correlated.
    # With --folds K the engines, in one seeded order, fall into K disjoint validation folds; this is fold `fold`.
    units = np.unique(train[:, 0])
    order = np.random.default_rng(cfg.seed).permutation(units)
    if cfg.folds > 1:
        if cfg.folds > len(units):
            raise UserError(f"--folds {cfg.folds} needs at least {cfg.folds} training engines, train_{cfg.subset} has "
                            f"{len(units)}; lower --folds")
        val_units = set(np.array_split(order, cfg.folds)[fold].tolist())
    else:
        n_val = max(1, round(cfg.val_fraction * len(units)))
        if n_val >= len(units):
            raise UserError(f"train_{cfg.subset} has {len(units)} engine(s) and --val_fraction {cfg.val_fraction:g} holds "
                            f"out {n_val} for validation, leaving none to train on; lower --val_fraction or add engines")
        val_units = set(order[:n_val].tolist())
    is_val = np.isin(train[:, 0], list(val_units))

    # Normalisation statistics from the training engines only, per operating condition.
    sensor_cols = [4 + s for s in cfg.sensors]  # sensor k is column 4 + k (after unit, cycle, 3 settings)
    conditions = {"train": operating_condition(train), "test": operating_condition(test)}
    if not cfg.per_condition_norm:
        conditions = {k: np.zeros_like(v) for k, v in conditions.items()}
    fit_rows = train[~is_val][:, sensor_cols]
    fit_cond = conditions["train"][~is_val]
    stats = {}
    for c in np.unique(fit_cond):
        rows = fit_rows[fit_cond == c]
        stats[c] = (rows.mean(0), np.where(rows.std(0) > 1e-8, rows.std(0), 1.0))

    def normalise(table, cond):
        out = np.empty((len(table), len(sensor_cols)))
        for c in np.unique(cond):
            if c not in stats:
                raise UserError(f"an operating condition of the {cfg.subset} data never occurs in the engines trained on, "
                                f"so it cannot be normalised; run with --per_condition_norm false")
            mean, std = stats[c]
            out[cond == c] = (table[cond == c][:, sensor_cols] - mean) / std
        return out

    train_feat = normalise(train, conditions["train"])
    test_feat = normalise(test, conditions["test"])
    if cfg.smoothing > 0:
        train_feat = smooth_per_engine(train_feat, train[:, 0], cfg.smoothing)
        test_feat = smooth_per_engine(test_feat, test[:, 0], cfg.smoothing)
    if cfg.cycle_feature:  # how long the engine has run is known at test time too; scaled by the training engines
        mean, std = train[~is_val, 1].mean(), train[~is_val, 1].std()
        train_feat = np.concatenate([train_feat, (train[:, 1:2] - mean) / std], axis=1)
        test_feat = np.concatenate([test_feat, (test[:, 1:2] - mean) / std], axis=1)
    train_rul = np.minimum(rul_per_row(train), cfg.rul_cap)
    # Test engines stop before failure: RUL at the last cycle is given, earlier rows count up from it.
    true_last = dict(zip(test_units, test_rul_last))
    test_rul = np.array([true_last[u] for u in test[:, 0]]) + rul_per_row(test)
    test_rul = np.minimum(test_rul, cfg.rul_cap)

    val_cut = cut_like_test(train_feat[is_val], train_rul[is_val], train[is_val, 0], cfg.val_cuts, cfg.seed)
    splits = {}
    for name, (feat, rul, unit_col), last_only in [
        ("train", (train_feat[~is_val], train_rul[~is_val], train[~is_val, 0]), False),
        ("val", (train_feat[is_val], train_rul[is_val], train[is_val, 0]), False),
        ("val_cut", val_cut, True),  # validation engines scored like test engines
        ("test", (test_feat, test_rul, test[:, 0]), True),
    ]:
        x, y, unit = windows_per_engine(feat, rul, unit_col, cfg.window, last_only)
        splits[name] = Split(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(health_state(y, cfg)),
                             torch.from_numpy(unit))
    return splits


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
        self.health_head = nn.Sequential(nn.Linear(4 * h, h), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(h, 3))

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
    """RMSE and PHM08 score in cycles, health accuracy; every sample counted once across processes."""
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
    return {
        "rmse": torch.sqrt(((pred - true) ** 2).mean()).item(),
        "score": phm08_score(pred, true),
        "health_accuracy": (torch.cat(probs).argmax(-1) == torch.cat(healths)).float().mean().item(),
        "num_samples": len(true),
        "pred": pred.cpu(),
        "true": true.cpu(),
        "health_prob": torch.cat(probs).cpu(),  # for a fold ensemble
        "health": torch.cat(healths).cpu(),
    }


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
        log.log({"epoch": state.epoch, "val/rmse": windows["rmse"], "val/score": windows["score"],
                 "val/health_accuracy": windows["health_accuracy"], "val/rmse_cut": cut["rmse"],
                 "val/score_cut": cut["score"], "train/samples_per_second": samples_per_second,
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
    ax.set(title=f"test engines, last cycle: RMSE {test['rmse']:.2f}, score {test['score']:.0f}",
           xlabel="test engine (sorted by true RUL)", ylabel="cycles")
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


RUN_OUTPUTS = ["config.yaml", "results.json", "metrics.jsonl", "model.safetensors", "training_curves.png",
               "test_predictions.png", "checkpoints", "dual_task"]  # what a run writes ("dual_task": tensorboard)


def main(argv=None):
    cfg = parse_config(Config, argv, description=__doc__.split("\n")[0])  # every setting checked against its domain
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
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
    fold_splits = [load_cmapss(cfg, fold) for fold in range(cfg.folds)]
    splits = fold_splits[0]
    accelerator.print(f"{cfg.subset}: {len(splits['train'].rul)} training windows, {len(splits['val'].rul)} "
                      f"validation windows ({len(splits['val_cut'].rul)} cuts), {len(splits['test'].rul)} test engines, "
                      f"{len(cfg.sensors)} sensors" + (f"; {cfg.folds} folds" if cfg.folds > 1 else ""))
    # SIGTERM/SIGINT: during training, finish the step, checkpoint and exit 75; after it, finish the short
    # final phase (test, save) and exit 0. A second signal stops at once.
    preemption = Preemption().install()
    fold_results, fold_tests = [], []
    for fold, (splits, run_dir, resume_path) in enumerate(zip(fold_splits, run_dirs, resume_paths)):
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
            accelerator.print(f"fold {fold + 1}/{cfg.folds}: validation engines "
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
        test = evaluate(model, test_loader, accelerator, cfg.rul_cap)
        save_model_atomically(accelerator, model, run_dir)  # -> run_dir/model.safetensors
        results = {
            "subset": cfg.subset,
            "test_rmse": test["rmse"],
            "test_score": test["score"],
            "test_health_accuracy": test["health_accuracy"],
            "test_engines": test["num_samples"],
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
        } | ({"fold": fold + 1, "val_engines": sorted(int(u) for u in splits["val"].unit.unique())} if cfg.folds > 1 else {})
        if accelerator.is_main_process:
            write_json(run_dir / "results.json", results)
            save_plots(run_dir, test, cfg.rul_cap)
            best = (f"best val RMSE ({cfg.val_metric}) {state.best_val_rmse:.2f} at epoch {state.best_epoch}"
                    if state.best_epoch >= 0 else "no epoch finished")
            print(("" if cfg.folds == 1 else f"fold {fold + 1}: ") +
                  f"test RMSE {test['rmse']:.2f} | PHM08 score {test['score']:.1f} | health accuracy "
                  f"{test['health_accuracy']:.3f} | {best} | {results['wall_seconds']:.0f} s | results in "
                  f"{run_dir / 'results.json'}")
        fold_results.append(results)
        fold_tests.append(test)
        accelerator.free_memory()  # the next fold's objects are prepared and checkpointed alone

    if cfg.folds > 1:  # the ensemble: test predictions (RUL and health probabilities) averaged over the folds
        results, test = ensemble_results(cfg, fold_results, fold_tests, time.perf_counter() - wall_start)
        if accelerator.is_main_process:
            write_json(output_dir / "results.json", results)
            save_plots(output_dir, test, cfg.rul_cap, curves=False)
            print(f"ensemble of {cfg.folds} folds: test RMSE {test['rmse']:.2f} | PHM08 score {test['score']:.1f} | "
                  f"health accuracy {test['health_accuracy']:.3f} | {results['wall_seconds']:.0f} s | results in "
                  f"{output_dir / 'results.json'}")
    accelerator.end_training()
    preemption.uninstall()
    if preemption.requested:
        accelerator.print("the signal came after training: the test evaluation and the outputs were finished (exit code 0)")
    return results


def ensemble_results(cfg: Config, fold_results: list[dict], fold_tests: list[dict], wall_seconds: float):
    pred = torch.stack([t["pred"] for t in fold_tests]).mean(0)
    true, health = fold_tests[0]["true"], fold_tests[0]["health"]  # the same test engines, in the same order
    prob = torch.stack([t["health_prob"] for t in fold_tests]).mean(0)
    test = {"rmse": torch.sqrt(((pred - true) ** 2).mean()).item(), "score": phm08_score(pred, true),
            "health_accuracy": (prob.argmax(-1) == health).float().mean().item(), "num_samples": len(true),
            "pred": pred, "true": true}
    keep = ("subset", "num_processes", "distributed_type", "mixed_precision", "seed", "val_metric")
    results = {"test_rmse": test["rmse"], "test_score": test["score"], "test_health_accuracy": test["health_accuracy"],
               "test_engines": test["num_samples"], "folds": len(fold_results),
               "fold_test_rmse_mean": float(np.mean([r["test_rmse"] for r in fold_results])),
               "best_val_rmse_mean": float(np.mean([r["best_val_rmse"] for r in fold_results
                                                    if r["best_val_rmse"] is not None] or [np.nan])),
               "optimizer_steps": sum(r["optimizer_steps"] for r in fold_results), "wall_seconds": wall_seconds,
               "peak_memory_mb": max(r["peak_memory_mb"] for r in fold_results)}
    results |= {k: fold_results[0][k] for k in keep} | {"per_fold": fold_results}
    return results, test


if __name__ == "__main__":
    exit_on_user_error(main)
