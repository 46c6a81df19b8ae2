"""NASA C-MAPSS, for train_dual_task.py: its file format (for `read_runs`: a table of numbers per file, each row's
cycles to its engine's last row, the operating condition from the three settings) and its PHM08 score."""

import warnings
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError

COLUMNS = 26  # unit, cycle, 3 operational settings, 21 sensors
SUBSETS = ["FD001", "FD002", "FD003", "FD004"]


def find_file(folder: Path, name: str) -> Path:
    """name (e.g. train_FD001.txt) in `folder`, or its gzip-compressed copy name.gz (as shipped in data/cmapss)."""
    plain = folder / name
    return plain if plain.is_file() or not (folder / f"{name}.gz").is_file() else folder / f"{name}.gz"


def read_table(path: Path, columns: int = COLUMNS) -> np.ndarray:
    """A whitespace-separated C-MAPSS file (.txt or .txt.gz) as a float array of finite numbers."""
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
    if not np.isfinite(table).all():  # before anything computes with the rows
        row = int(np.argwhere(~np.isfinite(table))[0, 0]) + 1
        raise UserError(f"{path} row {row} holds NaN or Inf; fix or remove that row")
    if columns == 1 and (table < 0).any():  # RUL_FD00x: cycles left, one row per test engine
        raise UserError(f"{path} row {int(np.argmax(table[:, 0] < 0)) + 1} holds a negative RUL; restore the file")
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


def phm08_score(pred: torch.Tensor, true: torch.Tensor) -> float:
    """PHM08 challenge score: late predictions (d > 0) cost more than early ones."""
    d = pred - true
    return torch.where(d < 0, torch.exp(-d / 13) - 1, torch.exp(d / 10) - 1).sum().item()
