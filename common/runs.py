"""The dual-task data in and out, for train_dual_task.py and predict_dual_task.py: `Runs` (what a reader returns),
`check_runs` (the checks every reader's output passes) and `write_predictions` (the per-unit CSV).

`read_runs` (C-MAPSS, or a reader of your own) turns files into Runs; `check_runs` then refuses what would train
on nonsense (a broken unit/cycle layout, values that are not finite or beyond float32, a negative RUL) with one
line, whichever reader produced them.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError

FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class Runs:
    """Units observed cycle by cycle: one row per unit and cycle, each unit's rows together and in cycle order."""

    name: str  # what the data is, for the console and results.json
    sensor_names: list[str]  # the columns of `sensors`
    unit: np.ndarray  # (rows,) unit id, a whole number
    cycle: np.ndarray  # (rows,) cycles run so far
    condition: np.ndarray  # (rows,) operating-condition id: normalisation statistics are fitted per condition
    sensors: np.ndarray  # (rows, sensors)
    rul: np.ndarray  # (rows,) cycles left until failure; NaN where unknown (units to predict)
    source: str = ""  # where the rows came from (a file), for error messages

    def select(self, rows: np.ndarray) -> "Runs":
        return dataclasses.replace(self, unit=self.unit[rows], cycle=self.cycle[rows], condition=self.condition[rows],
                                   sensors=self.sensors[rows], rul=self.rul[rows])


def check_runs(runs: dict[str, Runs]) -> dict[str, Runs]:
    """Refuse a split whose rows break the layout, hold a value that is not finite or beyond float32's range, or
    (where the RUL is known: every split but "predict") a negative or unknown RUL. Returns `runs`."""
    for split, r in runs.items():
        where = f"{r.source or r.name} ({split})"
        rows = len(r.unit)
        if rows == 0:
            raise UserError(f"{where} holds no rows; check the data files")
        shapes = [len(r.cycle), len(r.condition), len(r.rul), r.sensors.shape[0]]
        if shapes != [rows] * 4 or r.sensors.ndim != 2 or r.sensors.shape[1] != len(r.sensor_names):
            raise UserError(f"{where}: the reader returned columns of different lengths or {r.sensors.shape[-1]} "
                            f"sensor columns for {len(r.sensor_names)} names; fix read_runs")
        columns = {"unit": r.unit, "cycle": r.cycle, "condition": r.condition,
                   **{name: r.sensors[:, i] for i, name in enumerate(r.sensor_names)}}
        if split != "predict":
            columns["RUL"] = r.rul
        for column, values in columns.items():
            bad = ~np.isfinite(values) | (np.abs(values) > FLOAT32_MAX)
            if bad.any():
                row = int(np.argmax(bad)) + 1
                raise UserError(f"{where} row {row} holds NaN or Inf or a value beyond float32 ({values[row - 1]:g}) "
                                f"in {column}; fix or remove that row")
        same_unit = r.unit[1:] == r.unit[:-1]
        bad = np.r_[False, same_unit & (r.cycle[1:] <= r.cycle[:-1])] | (r.unit != np.round(r.unit)) | (r.cycle < 0)
        starts = np.r_[0, np.nonzero(~same_unit)[0] + 1]
        _, first_start = np.unique(r.unit[starts], return_index=True)
        bad[np.delete(starts, first_start)] = True  # a unit whose rows are split in two
        if split != "predict":
            bad |= r.rul < 0
        if bad.any():
            row = int(np.argmax(bad)) + 1
            raise UserError(f"{where} row {row} (unit {r.unit[row - 1]:g}, cycle {r.cycle[row - 1]:g}) breaks the "
                            f"layout; each unit's rows together, whole unit numbers, cycles rising from 0 or more, "
                            f"RUL 0 or more: fix the data or read_runs")
    return runs


def check_inputs(runs: Runs, features: np.ndarray) -> np.ndarray:
    """The model inputs made from `runs` (its sensors normalised, then maybe the cycle number) must be finite and
    within float32: a value far outside the training statistics (a sensor in other units) is refused by name and row.
    Returns `features`."""
    bad = ~np.isfinite(features) | (np.abs(features) > FLOAT32_MAX)
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        name = (runs.sensor_names + ["cycle number"])[column]
        raise UserError(f"{runs.source or runs.name} row {row + 1}: {name} becomes {features[row, column]:g} once "
                        f"normalised by the training statistics, beyond what float32 holds; fix that row (a unit or "
                        f"sentinel error?) or train on data like it")
    return features


def write_predictions(path: Path, units, pred, health_prob, true=None) -> None:
    """CSV, one row per unit: predicted RUL, the most likely health state and each state's probability (and the
    true RUL, where known). Written atomically: a reader never sees half a file."""
    header = ["unit", "rul", "health_state", *[f"p_state_{k}" for k in range(health_prob.shape[1])]]
    rows = [[int(u), f"{r:.4f}", int(p.argmax()), *[f"{q:.6f}" for q in p.tolist()]]
            for u, r, p in zip(units, pred.tolist(), health_prob)]
    if true is not None:
        header.append("true_rul")
        rows = [row + [f"{t:g}"] for row, t in zip(rows, true.tolist())]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(",".join(map(str, row)) for row in [header, *rows]) + "\n")
    tmp.replace(path)
