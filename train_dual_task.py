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
"""

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from common import cmapss
from common.checkpoint import load_checkpoint, save_checkpoint, save_model_atomically
from common.config import check_domains, parse_config, setting
from common.distributed import fit_fsdp_wrapping
from common.domains import ABOVE_ZERO, BELOW_ONE, FRACTION, NON_EMPTY, TRACKER, above, at_least, between
from common.ema import EMA
from common.errors import NonFiniteTrainingError, UserError, exit_on_user_error
from common.guard import NonFiniteGuard
from common.launch import Run, exit_preempted, finish, make_accelerator, preflight, run_facts, start_run, warn_if_short
from common.plots import plot_test_predictions, plot_training_curves
from common.preemption import Preemption
from common.run_log import MetricsLog, RunningMean, peak_memory_mb, write_json
from common.runs import Runs, check_inputs, check_runs, write_predictions
from common.schedules import linear_warmup, milestone_factor, set_lr, set_weight_decay, warmup_cosine
from common.trainable import gather_trainable, restore_trainable
from common.windows import Split, cut_like_test, make_loader, smooth_per_unit, windows_per_unit

INFORMATIVE_SENSORS = [2, 3, 4, 7, 8, 9, 11, 12, 13, 14, 15, 17, 20, 21]
PREDICT = "predict with python predict_dual_task.py --run_dir RUN --data FILE"  # once --mode predict here
MOVED = dict.fromkeys(["mode", "predict_data", "predict_output"], PREDICT)
KEEP = {"same_on_resume": True}  # a resumed run must keep these settings: the data, its split, the model's shape
OPEN_FRACTION = between(0, 1, low_open=True, high_open=True)  # (0, 1)


@dataclass
class Config:  # every field is a --flag and a YAML key; what each means in depth: docs/dual_task.md#settings
    # data: read_runs gives --data and --sensors their meaning (a reader of your own gives them yours)
    data: str = setting("FD001", "C-MAPSS subset FD001-FD004 (data/cmapss), or <folder>/FD00x", NON_EMPTY, **KEEP)
    sensors: list[int] = setting(INFORMATIVE_SENSORS, "sensor columns used as inputs, from 1", at_least(1), **KEEP)
    window: int = setting(30, "cycles per input window", at_least(1), **KEEP)
    rul_cap: int = setting(125, "piecewise-linear RUL cap (labels and the true test RUL)", between(1, 1e5), **KEEP)
    val_fraction: float = setting(0.2, "share of training units held out for validation", OPEN_FRACTION, **KEEP)
    folds: int = setting(1, "K models on unit-disjoint validation folds, tests averaged", between(1, 100), **KEEP)
    val_metric: str = setting("windows", "validation RMSE that picks: every window, or units cut like test units",
                              choices=["windows", "cut"], **KEEP)
    val_cuts: int = setting(10, "cut points per validation unit for --val_metric cut", between(1, 1000), **KEEP)
    health_thresholds: list[int] = setting([50, 15], "falling RUL thresholds of the health states", at_least(0), **KEEP)
    smoothing: float = setting(0.05, "causal exponential smoothing, newest cycle's weight (0: off)", FRACTION, **KEEP)
    per_condition_norm: bool = setting(True, "normalise per operating condition (FD002/FD004 have six)", **KEEP)
    cycle_feature: bool = setting(True, "add the cycle number as an input feature", **KEEP)
    phm08: bool = setting(True, "report the PHM08 score (C-MAPSS's asymmetric score; off for other data)")
    # model
    conv_channels: int = setting(64, "Conv1d channels", between(1, 2048), **KEEP)
    kernel_size: int = setting(5, "Conv1d kernel size over time", between(1, 64), **KEEP)
    hidden_size: int = setting(64, "GRU hidden size per direction", between(1, 2048), **KEEP)
    gru_layers: int = setting(2, "bidirectional GRU layers", between(1, 8), **KEEP)
    dropout: float = setting(0.2, "dropout in the GRU and heads", BELOW_ONE)
    # loss
    failure_weight: float = setting(1.0, "RUL MSE weight grows from 1 to 1+this as RUL goes to 0", between(0, 1000))
    amnl_decay: float = setting(0.99, "decay of the averages that normalise each task loss", BELOW_ONE)
    rul_loss_weight: float = setting(0.5, "AMNL weight of the RUL task", FRACTION)
    # optimisation
    epochs: int = setting(20, "maximum training epochs", at_least(0))
    max_steps: int = setting(0, "stop after this many optimizer steps (0: no limit)", at_least(0))
    batch_size: int = setting(256, "windows per micro-batch per process", at_least(1))
    grad_accum_steps: int = setting(1, "micro-batches per optimizer step", at_least(1))
    lr: float = setting(1e-3, "peak learning rate (AdamW: above 1 is a typo)", ABOVE_ZERO)
    weight_decay: float = setting(1e-4, "AdamW weight decay (not on biases and norm weights)", between(0, 10))
    wd_decay_epochs: list[int] = setting([100, 200], "epochs after which weight decay is multiplied...", at_least(0))
    wd_decay_factors: list[float] = setting([0.5, 0.1], "...by these factors", at_least(0))
    warmup_epochs: int = setting(3, "linear LR warmup from 0.1x to 1x over these epochs", at_least(0))
    scheduler: str = setting("cosine", "LR decay after warmup", choices=["cosine", "plateau"])
    min_lr_factor: float = setting(0.01, "lowest LR as a fraction of --lr", FRACTION)
    plateau_factor: float = setting(0.5, "plateau: multiply the LR by this...", ABOVE_ZERO)
    plateau_patience: int = setting(5, "...after this many epochs without a better validation RMSE", at_least(0))
    max_grad_norm: float = setting(1.0, "gradient clipping norm", above(0))
    ema_decay: float = setting(0.995, "EMA decay of the weights used for evaluation", BELOW_ONE)
    early_stopping_patience: int = setting(20, "stop after this many epochs without a better val RMSE", at_least(1))
    mixed_precision: str | None = setting(None, "None: what accelerate launch set", choices=["no", "bf16", "fp16"])
    nan_lr_backoff: float = setting(0.5, "first NaN/Inf update: fp32 from then on, base LR times this", ABOVE_ZERO)
    max_nonfinite_in_a_row: int = setting(5, "stop after this many non-finite updates in a row in fp32", at_least(1))
    # run
    output_dir: str = setting("runs/dual_task", "where checkpoints, metrics, plots and results go", NON_EMPTY)
    overwrite: bool = setting(False, "replace the run in output_dir (once the new run has passed its checks)")
    seed: int = setting(42, "seed for the split, the initialisation and the batch order", between(0, 2**32 - 1), **KEEP)
    log_every: int = setting(50, "log (and check for NaN) every this many optimizer steps", at_least(1))
    checkpoint_every: int = setting(0, "also checkpoint every this many steps (0: epoch ends only)", at_least(0))
    keep_checkpoints: int = setting(2, "how many recent checkpoints to keep", at_least(1))
    resume_from: str | None = setting(None, "'latest' or a checkpoint folder", NON_EMPTY)
    report_to: str = setting("none", "Accelerate tracker: none, tensorboard, wandb, ...", TRACKER)
    num_threads: int = setting(1, "PyTorch CPU threads per process (0: PyTorch's default)", between(0, 1024))

    def __post_init__(self):  # every field in its domain, then the rules that tie fields together
        check_domains(self)
        if len(set(self.sensors)) != len(self.sensors) or not (self.sensors or self.cycle_feature):
            raise UserError(f"--sensors {self.sensors} names a sensor twice, or none with --cycle_feature false (no "
                            f"input at all); list each input sensor once")
        thresholds = self.health_thresholds
        if not thresholds or any(b >= a for a, b in zip([self.rul_cap, *thresholds], thresholds)):
            raise UserError(f"--health_thresholds {thresholds} must be one or more RULs below --rul_cap "
                            f"{self.rul_cap}, each lower than the one before (e.g. 50,15)")
        if len(self.wd_decay_epochs) != len(self.wd_decay_factors):
            raise UserError(f"--wd_decay_epochs has {len(self.wd_decay_epochs)} entries and --wd_decay_factors "
                            f"{len(self.wd_decay_factors)}; give one factor per epoch")
        if self.folds > 1 and self.resume_from not in (None, "latest"):
            raise UserError(f"--resume_from {self.resume_from} with --folds {self.folds}: each fold resumes from "
                            f"its own newest checkpoint; pass --resume_from latest")


# ----------------------------------------------------------------------------------------------
# Data, in parts that can be replaced one at a time (docs/dual_task.md#copy-and-edit):
#   read_runs            the files -> Runs (common/runs.py), checked by check_runs whatever the reader
#   validation_units     which units validate: split by unit, never by window
#   fit_preprocessing    statistics from the training units only; saved beside the model (preprocessing.json)
#   apply_preprocessing  normalise per operating condition, smooth, add the cycle number
#   windows_per_unit     sliding windows to train on; the last window of each unit to test and predict
#                        (common/windows.py, with the causal smoothing and the validation units cut like test units)
# ----------------------------------------------------------------------------------------------

def read_runs(cfg: Config, predict_file: str | None = None) -> dict[str, Runs]:
    """C-MAPSS: {"train": engines run to failure, "test": engines stopped early, with the true RUL at the stop}, or
    with `predict_file` {"predict": the engines of that one file, RUL unknown}. --data names the subset."""
    folder, subset = Path(cfg.data).parent, Path(cfg.data).name
    if subset not in cmapss.SUBSETS:
        raise UserError(f"--data {cfg.data} names no C-MAPSS subset; pass one of {', '.join(cmapss.SUBSETS)} or "
                        f"<folder>/FD00x for the files train_FD00x.txt, test_FD00x.txt and RUL_FD00x.txt there")
    if folder == Path("."):
        folder = Path(__file__).resolve().parent / "data" / "cmapss"  # the copy shipped with this repo
    if not folder.is_dir():
        raise UserError(f"data folder {folder} not found; pass --data <folder with the C-MAPSS files>/{subset}")
    if missing := [s for s in cfg.sensors if s > 21]:
        raise UserError(f"--sensors {missing[0]} does not exist; C-MAPSS has sensors 1 to 21")

    def runs(path, name: str, rul=cmapss.cycles_to_last) -> Runs:  # rul(table): each row's RUL
        table = cmapss.read_table(Path(path))
        return Runs(name, [f"sensor {s}" for s in cfg.sensors], table[:, 0], table[:, 1],
                    cmapss.operating_condition(table), table[:, [4 + s for s in cfg.sensors]], rul(table), str(path))

    if predict_file is not None:
        return {"predict": runs(predict_file, f"{predict_file} (C-MAPSS format)", lambda t: np.full(len(t), np.nan))}
    rul_at_stop = cmapss.read_table(cmapss.find_file(folder, f"RUL_{subset}.txt"), columns=1)[:, 0]

    def test_rul(table):  # test engines stop early: RUL_FD00x gives the RUL at their last cycle; earlier rows count up
        units = np.unique(table[:, 0])
        if len(rul_at_stop) != len(units):
            raise UserError(f"RUL_{subset} has {len(rul_at_stop)} rows for {len(units)} test engines; "
                            f"restore the original files")
        return rul_at_stop[np.searchsorted(units, table[:, 0])] + cmapss.cycles_to_last(table)

    train, test = (cmapss.find_file(folder, f"{split}_{subset}.txt") for split in ("train", "test"))
    return {"train": runs(train, f"C-MAPSS {subset}"), "test": runs(test, f"C-MAPSS {subset}", test_rul)}


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
    saved beside the model, so that predict_dual_task.py prepares new data exactly as the training data was."""
    conditions = train.condition if cfg.per_condition_norm else np.zeros_like(train.condition)
    stats = {}
    for c in np.unique(conditions):
        rows = train.sensors[conditions == c]
        stats[str(c)] = {"mean": rows.mean(0).tolist(), "std": np.where(rows.std(0) > 1e-8, rows.std(0), 1.0).tolist()}
    return {"data": train.name, "sensor_names": train.sensor_names, "sensor_stats": stats,
            "cycle_mean": float(train.cycle.mean()), "cycle_std": float(train.cycle.std()),
            **{key: getattr(cfg, key) for key in ("per_condition_norm", "smoothing", "cycle_feature", "window",
                                                  "rul_cap", "health_thresholds")}}


def apply_preprocessing(runs: Runs, prep: dict) -> np.ndarray:
    """(rows, features): the sensors normalised per operating condition, smoothed within each unit; the cycle."""
    conditions = runs.condition if prep["per_condition_norm"] else np.zeros_like(runs.condition)
    features = np.empty(runs.sensors.shape)
    for c in np.unique(conditions):
        if str(c) not in prep["sensor_stats"]:
            raise UserError(f"an operating condition of {runs.name} never occurs in the units trained on, so it cannot "
                            f"be normalised; train with --per_condition_norm false")
        stats = prep["sensor_stats"][str(c)]
        features[conditions == c] = (runs.sensors[conditions == c] - np.array(stats["mean"])) / np.array(stats["std"])
    check_inputs(runs, features)  # finite and within float32, or one line naming the column and row
    if prep["smoothing"] > 0:
        features = smooth_per_unit(features, runs.unit, prep["smoothing"])
    if prep["cycle_feature"]:  # how long the unit has run is known at test time too
        cycle = (runs.cycle - prep["cycle_mean"]) / prep["cycle_std"]
        features = np.concatenate([features, cycle[:, None]], axis=1)
    return check_inputs(runs, features)


def health_state(rul: np.ndarray, thresholds: list[int]) -> np.ndarray:
    """0 for RUL above the first threshold (healthy), one more for each threshold the RUL is at or below."""
    return (rul[:, None] <= np.array(thresholds)[None, :]).sum(1).astype(np.int64)


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
        # No bias: softmax over time ignores a constant, so its gradient is zero, and AdamW would turn that into
        # steps of size lr driven by rounding noise (runs on 1 and 2 processes then drift apart).
        self.attention = nn.Linear(2 * h, 1, bias=False)
        # Both heads see the attention-pooled summary and the last time step (the most recent state).
        def head(outputs):
            return nn.Sequential(nn.Linear(4 * h, h), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(h, outputs))

        self.rul_head, self.health_head = head(1), head(len(cfg.health_thresholds) + 1)  # RUL, one logit per state

    def forward(self, x):  # x: (batch, time, features)
        z = self.conv(x.transpose(1, 2)).transpose(1, 2)
        z, _ = self.gru(z)
        z = self.norm(z)
        weights = torch.softmax(self.attention(z), dim=1)  # (batch, time, 1)
        summary = torch.cat([(weights * z).sum(1), z[:, -1]], dim=-1)
        return self.rul_head(summary).squeeze(-1), self.health_head(summary)  # RUL as a fraction of the cap


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors): decaying them only hurts."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay, "base_weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "base_weight_decay": 0.0},
    ]


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
        self.averages = torch.zeros(2, device=device)  # [rul, health], bias-corrected by the number of updates:
        self.updates = torch.zeros(2, device=device)  # only finite losses count: a skipped one changes neither

    def __call__(self, rul_pred, rul_true, health_logits, health_true):
        # MSE weighted towards failure: errors near the end of life matter most (and cost most in PHM08).
        weight = 1.0 + self.failure_weight * (1.0 - rul_true)
        rul_loss = (weight * (rul_pred - rul_true) ** 2).mean() / weight.mean()
        health_loss = F.cross_entropy(health_logits, health_true)
        losses = torch.stack([rul_loss, health_loss])
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
class TrainState:
    """Everything the loop needs to continue after a restart, beyond model/optimizer/RNG (saved as a dataclass)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batches_done: int = 0  # micro-batches consumed in the current epoch
    best_val_rmse: float = math.inf
    best_epoch: int = -1
    epochs_since_best: int = 0
    plateau_best: float = math.inf  # ReduceLROnPlateau, written out: stateless except for these
    plateau_bad_epochs: int = 0
    plateau_factor: float = 1.0
    train_samples: int = 0  # over finished epochs, all processes: for the throughput in results.json
    train_seconds: float = 0.0
    best_weights: dict = field(default_factory=dict)  # EMA weights at the best epoch, whole (not sharded)


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


def train(cfg, accelerator, model, optimizer, loaders, loss_fn, ema, guard, state: TrainState, run: Run) -> bool:
    """Train until --epochs, --max_steps or early stopping; True if a signal stopped it (a checkpoint is saved)."""
    steps_per_epoch = math.ceil(len(loaders["train"]) / cfg.grad_accum_steps)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    checkpointed = {"train_state": state, "ema": ema, "guard": guard, "amnl": loss_fn}
    warn_if_short(total_steps, steps_per_epoch, cfg.max_steps, "the test set is scored with the initial weights",
                  "no validation runs, and the test set is scored with the last EMA weights")

    def current_lr():
        return lr_at(state.step, cfg, state, steps_per_epoch, total_steps, guard.lr_scale)

    def finished():  # also true for a resumed run that had already finished training
        stopped_early = state.epochs_since_best >= cfg.early_stopping_patience
        return state.epoch >= cfg.epochs or state.step >= total_steps or stopped_early

    set_lr(optimizer, current_lr())
    # The bar shows on the main process's terminal (disable=None: tqdm hides it when the output is not a terminal).
    bar = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_local_main_process or None)
    running = RunningMean(3, accelerator.device)  # total, RUL and health loss since the last log line
    done = preempted = False
    while not done and not finished():
        epoch_start, samples = time.perf_counter(), 0
        loaders["train"].set_epoch(state.epoch)  # a different, reproducible shuffle every epoch
        batches = loaders["train"] if not state.batches_done else \
            accelerator.skip_first_batches(loaders["train"], state.batches_done)  # resumed mid-epoch
        set_weight_decay(optimizer, milestone_factor(state.epoch, cfg.wd_decay_epochs, cfg.wd_decay_factors))
        model.train()
        for x, rul, health in batches:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    rul_pred, health_logits = model(x)
                loss, task_losses = loss_fn(rul_pred.float(), rul / cfg.rul_cap, health_logits.float(), health)
                accelerator.backward(loss)
                guard.record_loss(loss)
                if accelerator.sync_gradients:  # clip only full updates: on other micro-batches the norm is partial
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    guard.mask_nonfinite_update(grad_norm)  # a NaN/Inf update becomes a no-op, on the device
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
            if state.step % cfg.log_every == 0:
                mean = running.pop_mean(accelerator)  # the only per-interval sync
                guard.poll(state.step)  # a NaN/Inf since the last log: fp32 from here on
                lr = optimizer.param_groups[0]["lr"]
                run.log.log({"train/loss": mean[0], "train/rul_loss": mean[1], "train/health_loss": mean[2],
                             "train/grad_norm": grad_norm.item(), "train/lr": lr}, state.step)
                bar.set_postfix(loss=f"{mean[0]:.3f}", lr=f"{lr:.2e}")
            set_lr(optimizer, current_lr())
            preempted = run.preemption.should_stop(accelerator, at_sync_point=state.step % cfg.log_every == 0)
            done = preempted or state.step >= total_steps
            mid_epoch = state.batches_done < len(loaders["train"])  # at an epoch's end, its own checkpoint follows
            if mid_epoch and (done or cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0):
                save_checkpoint(accelerator, run.dir, state.step, checkpointed, cfg.keep_checkpoints, config=cfg)
            if done:
                break
        if done and state.batches_done < len(loaders["train"]):
            break  # stopped mid-epoch by --max_steps: no end-of-epoch evaluation

        # End of epoch: validate with the EMA weights, then best weights, early stopping, plateau.
        guard.poll(state.step)
        seconds = time.perf_counter() - epoch_start
        state.train_samples, state.train_seconds = state.train_samples + samples, state.train_seconds + seconds
        with ema.swapped_in():
            val = {metric: evaluate(model, loaders[name], accelerator, cfg.rul_cap)
                   for metric, name in (("windows", "val"), ("cut", "val_cut"))}
            selected = val[cfg.val_metric]["rmse"]  # --val_metric: the one score that picks, stops and schedules
            improved = selected < state.best_val_rmse
            if improved:
                state.best_weights = gather_trainable(accelerator, model)  # whole: restorable on any processes
        state.epoch, state.batches_done = state.epoch + 1, 0
        state.epochs_since_best = 0 if improved else state.epochs_since_best + 1
        if improved:
            state.best_val_rmse, state.best_epoch = selected, state.epoch
        if cfg.scheduler == "plateau" and state.step >= cfg.warmup_epochs * steps_per_epoch:
            step_plateau(state, selected, cfg)
            set_lr(optimizer, current_lr())
        speed, lr = samples / seconds, optimizer.param_groups[0]["lr"]
        memory = peak_memory_mb(accelerator.device)
        run.log.log({"epoch": state.epoch, "val/rmse": val["windows"]["rmse"], "val/rmse_cut": val["cut"]["rmse"],
                     "val/health_accuracy": val["windows"]["health_accuracy"], "train/samples_per_second": speed,
                     "peak_memory_mb": memory, "train/lr": lr}, state.step)
        accelerator.print(f"epoch {state.epoch:3d} | val RMSE {val['windows']['rmse']:6.2f} cut "
                          f"{val['cut']['rmse']:6.2f} health acc {val['windows']['health_accuracy']:.3f} | best "
                          f"{state.best_val_rmse:6.2f} @ {state.best_epoch} | lr {lr:.2e} | {speed:,.0f} samples/s | "
                          f"{memory:,.0f} MB", flush=True)
        save_checkpoint(accelerator, run.dir, state.step, checkpointed, cfg.keep_checkpoints, best=improved, config=cfg)
        if state.epochs_since_best >= cfg.early_stopping_patience:
            accelerator.print(f"early stopping: no better validation RMSE for {cfg.early_stopping_patience} epochs")
    bar.close()
    return preempted


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, loader, accelerator, rul_cap: int) -> dict:
    """RMSE in cycles, health accuracy and the predictions; every sample counted once across processes."""
    model.eval()
    parts = []
    for x, rul, health in loader:
        with accelerator.autocast():
            rul_pred, health_logits = model(x)
        parts.append(accelerator.gather_for_metrics((rul_pred.float(), rul, health_logits.float().softmax(-1), health)))
    model.train()
    pred, true, prob, health = (torch.cat([p[i] for p in parts]).cpu() for i in range(4))
    pred = (pred * rul_cap).clamp(0, rul_cap)  # the model predicts RUL / cap
    if not torch.isfinite(pred).all():  # weights that overflowed: no result is better than a meaningless one
        raise NonFiniteTrainingError("the model's predictions are not finite (its weights diverged); lower --lr, "
                                     "then resume from a checkpoint before the divergence or start again")
    return prediction_scores(pred, true, prob, health)


def prediction_scores(pred: torch.Tensor, true: torch.Tensor, health_prob: torch.Tensor, health: torch.Tensor) -> dict:
    """RMSE in cycles and health accuracy, with the predictions they came from (a fold ensemble averages those)."""
    return {"rmse": torch.sqrt(((pred - true) ** 2).mean()).item(),
            "health_accuracy": (health_prob.argmax(-1) == health).float().mean().item(), "num_samples": len(true),
            "pred": pred, "true": true, "health_prob": health_prob, "health": health}


def test_results(scores: dict, cfg: Config) -> dict:
    """The test set's numbers for results.json: prediction_scores' and the PHM08 score (--phm08)."""
    score = cmapss.phm08_score(scores["pred"], scores["true"]) if cfg.phm08 else None
    return {"test_rmse": scores["rmse"], "test_score": score, "test_health_accuracy": scores["health_accuracy"],
            "test_units": scores["num_samples"]}


def write_test_outputs(run_dir: Path, test: dict, results: dict, units, label: str, picked: str = "") -> None:
    """results.json, test_predictions.csv and .png, and one console line (main process only)."""
    write_json(run_dir / "results.json", results)
    write_predictions(run_dir / "test_predictions.csv", units, test["pred"], test["health_prob"], test["true"])
    plot_test_predictions(run_dir / "test_predictions.png", test["pred"], test["true"], results["test_rmse"],
                          results["test_score"])
    score = f" | PHM08 score {results['test_score']:.1f}" if results["test_score"] is not None else ""
    print(f"{label}test RMSE {results['test_rmse']:.2f}{score} | health accuracy {results['test_health_accuracy']:.3f}"
          f"{picked} | {results['wall_seconds']:.0f} s | results in {run_dir / 'results.json'}")


# ----------------------------------------------------------------------------------------------
# main: check every input, then fit each fold's model (train, restore the best weights, test once), then average
# ----------------------------------------------------------------------------------------------

RUN_OUTPUTS = ["config.yaml", "results.json", "metrics.jsonl", "model.safetensors", "preprocessing.json", "fold_*",
               "test_predictions.csv", "training_curves.png", "test_predictions.png", "checkpoints",
               "dual_task"]  # what a run writes ("dual_task": tensorboard)


def run_dirs(cfg: Config) -> list[Path]:
    """Where each model trains: --output_dir, or with --folds K its fold_1 ... fold_K."""
    output_dir = Path(cfg.output_dir)
    return [output_dir] if cfg.folds == 1 else [output_dir / f"fold_{k}" for k in range(1, cfg.folds + 1)]


def fit_one(cfg, accelerator, fold: int, splits: dict, prep: dict, resume_paths: list, preemption, started: float):
    """Train fold `fold`'s model (validated on its own units), restore its best weights, test it once, save it.
    Returns its results and its test predictions."""
    run_dir, resume_path = run_dirs(cfg)[fold], resume_paths[fold]
    set_seed(cfg.seed + fold)  # each fold's initialisation, whatever ran before it (a resumed run skips folds)
    loaders = {name: make_loader(splits[name], cfg.batch_size * (1 if name == "train" else 4), name == "train",
                                 cfg.seed) for name in ("train", "val", "val_cut", "test")}
    model = DualTaskNet(num_features=splits["train"].x.shape[-1], cfg=cfg)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=True)
    fit_fsdp_wrapping(accelerator, model)  # FSDP2: one unit per transformer block the model has
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *loaders.values())
    loaders = dict(zip(loaders, prepared))
    loss_fn = AMNLLoss(cfg, accelerator.device, reduce=lambda losses: accelerator.reduce(losses, "mean"))
    ema = EMA(model.parameters(), decay=cfg.ema_decay)
    guard = NonFiniteGuard(accelerator, model, optimizer, cfg.nan_lr_backoff, cfg.max_nonfinite_in_a_row)
    state = TrainState()
    if resume_path is not None:  # the same objects that train() checkpoints
        load_checkpoint(accelerator, resume_path, {"train_state": state, "ema": ema, "guard": guard, "amnl": loss_fn},
                        config=cfg)
    if fold == 0:  # every check has passed: from here on the run writes (an --overwrite'n run's outputs go now)
        start_run(accelerator, cfg, RUN_OUTPUTS, fresh=not any(resume_paths), project="dual_task")
    val_units = sorted(int(u) for u in splits["val"].unit.unique())
    if cfg.folds > 1:
        accelerator.print(f"fold {fold + 1}/{cfg.folds}: validation units {val_units}")
    run = Run(run_dir, MetricsLog(accelerator, run_dir, step_offset=state.step if resume_path else None), preemption)
    if train(cfg, accelerator, model, optimizer, loaders, loss_fn, ema, guard, state, run):
        exit_preempted(accelerator, state.step)

    # The best EMA weights, chosen on validation, are evaluated on the test set once.
    if not state.best_weights:
        ema.copy_to()  # no epoch finished (e.g. a tiny --max_steps): use the current EMA weights
    restore_trainable(accelerator, model, state.best_weights)  # the best on validation (none: nothing to restore)
    test = evaluate(model, loaders["test"], accelerator, cfg.rul_cap)
    save_model_atomically(accelerator, model, run_dir)  # -> run_dir/model.safetensors
    best = state.best_val_rmse if state.best_epoch >= 0 else None
    results = {"data": prep["data"], **test_results(test, cfg), "val_metric": cfg.val_metric, "best_val_rmse": best,
               "best_epoch": state.best_epoch, **run_facts(accelerator, state, guard, cfg.seed, started)}
    results |= {"fold": fold + 1, "val_units": val_units} if cfg.folds > 1 else {}
    if accelerator.is_main_process:
        write_json(run_dir / "preprocessing.json", prep)  # beside model.safetensors: what predict needs
        plot_training_curves(run_dir, cfg.rul_cap)
        picked = f" | best val RMSE ({cfg.val_metric}) {best:.2f} at epoch {state.best_epoch}" if best is not None \
            else " | no epoch finished"
        write_test_outputs(run_dir, test, results, splits["test"].unit, f"fold {fold + 1}: " * (cfg.folds > 1), picked)
    accelerator.free_memory()  # the next fold's objects are prepared and checkpointed alone
    return results, test


def ensemble(cfg: Config, fitted: list[tuple[dict, dict]], wall_seconds: float) -> tuple[dict, dict]:
    """--folds K: the folds' test predictions (RUL and health probabilities) averaged, scored like one model's."""
    fold_results, tests = [r for r, _ in fitted], [t for _, t in fitted]
    pred, prob = (torch.stack([t[key] for t in tests]).mean(0) for key in ("pred", "health_prob"))
    test = prediction_scores(pred, tests[0]["true"], prob, tests[0]["health"])  # the same units, in the same order
    best_vals = [r["best_val_rmse"] for r in fold_results if r["best_val_rmse"] is not None] or [np.nan]
    results = {**test_results(test, cfg), "folds": len(fitted), "best_val_rmse_mean": float(np.mean(best_vals)),
               "fold_test_rmse_mean": float(np.mean([r["test_rmse"] for r in fold_results])),
               "optimizer_steps": sum(r["optimizer_steps"] for r in fold_results), "wall_seconds": wall_seconds,
               "peak_memory_mb": max(r["peak_memory_mb"] for r in fold_results)}
    keep = ("data", "num_processes", "distributed_type", "mixed_precision", "seed", "val_metric")
    return results | {k: fold_results[0][k] for k in keep} | {"per_fold": fold_results}, test


def main(argv=None):
    cfg = parse_config(Config, argv, __doc__.split("\n")[0], moved=MOVED)
    if cfg.num_threads:  # 1 by default: beside another busy process, far faster than one per core (docs/results.md)
        torch.set_num_threads(cfg.num_threads)
    wall_start = time.perf_counter()
    accelerator = make_accelerator(cfg.mixed_precision, cfg.output_dir, cfg.grad_accum_steps, cfg.report_to)
    set_seed(cfg.seed)

    # Check everything that bad input can fail before the first write: the output folder, every fold's checkpoint,
    # the data (whichever reader read it). Nothing on disk changes until start_run(), in the first fold.
    resume_paths = preflight(accelerator, cfg, run_dirs(cfg))
    runs = check_runs(read_runs(cfg))
    folds = [load_splits(cfg, runs, fold) for fold in range(cfg.folds)]  # [(splits, preprocessing)] per fold
    splits, prep = folds[0]
    accelerator.print(f"{prep['data']}: {len(splits['train'].rul):,} training windows, {len(splits['val'].rul):,} "
                      f"validation windows ({len(splits['val_cut'].rul):,} cuts), {len(splits['test'].rul):,} test "
                      f"units; inputs: {', '.join(prep['sensor_names'])}{', cycle number' if cfg.cycle_feature else ''}"
                      + (f"; {cfg.folds} folds" if cfg.folds > 1 else ""))
    # SIGTERM/SIGINT: during training, finish the step, checkpoint and exit 75; after it, finish the short
    # final phase (test, save) and exit 0. A second signal stops at once.
    preemption = Preemption().install()
    fitted = []
    for fold, (splits, prep) in enumerate(folds):  # K models one after another, on every process
        started = wall_start if cfg.folds == 1 else time.perf_counter()
        fitted.append(fit_one(cfg, accelerator, fold, splits, prep, resume_paths, preemption, started))
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
