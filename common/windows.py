"""From rows to model inputs, for train_dual_task.py and predict_dual_task.py: causal smoothing within each unit,
sliding windows (every one to train on, the last one to test and predict), validation units cut like test units,
and the windows as a batched Dataset (`Split`) and its DataLoader."""

import math
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import UserError


def smooth_per_unit(features: np.ndarray, units: np.ndarray, alpha: float) -> np.ndarray:
    """Causal exponential smoothing within each unit (s_t = a x_t + (1-a) s_t-1): damps sensor noise, uses no future."""
    out = features.copy()
    for t in range(1, len(out)):
        if units[t] == units[t - 1]:
            out[t] = alpha * features[t] + (1 - alpha) * out[t - 1]
    return out


def windows_per_unit(features: np.ndarray, rul: np.ndarray, units: np.ndarray, window: int, last_only: bool):
    """Cut sliding windows per unit (all of them, or the last); short units are front-padded. Returns (windows,
    the RUL at the end of each window, the unit of each window)."""
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


@dataclass
class Split(torch.utils.data.Dataset):
    """Windows held as tensors; `__getitems__` lets the DataLoader fetch a whole batch by one index op."""

    x: torch.Tensor  # (N, window, features) float32
    rul: torch.Tensor  # (N,) float32, capped
    health: torch.Tensor  # (N,) int64
    unit: torch.Tensor  # (N,) unit id of each window

    def __len__(self):
        return len(self.rul)

    def __getitem__(self, i):  # one index, or a list of them (a batch)
        return self.x[i], self.rul[i], self.health[i]

    __getitems__ = __getitem__


def make_loader(split: Split, batch_size: int, shuffle: bool, seed: int):
    return torch.utils.data.DataLoader(split, batch_size=batch_size, shuffle=shuffle, collate_fn=keep_batch,
                                       generator=torch.Generator().manual_seed(seed) if shuffle else None)


def keep_batch(batch):
    return batch  # __getitems__ already returns batched tensors
