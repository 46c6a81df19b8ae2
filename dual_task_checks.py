"""What train_dual_task.py and predict_dual_task.py refuse, whichever `read_runs` made the rows: a broken unit/cycle
layout, values that are not finite or beyond float32, a negative RUL (`check_runs`), and model inputs beyond float32
once normalised (`check_inputs`); one line each, naming the data, the row and the column."""

import numpy as np

from common.errors import UserError

FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_runs(runs: dict) -> dict:
    """Refuse, whichever reader made them, rows that break the layout, values not finite or beyond
    float32, or (where the RUL is known: all but "predict") a negative RUL. Returns `runs`."""
    for split, r in runs.items():
        where = f"{r.source or r.name} ({split})"
        if len(r.unit) == 0:
            raise UserError(f"{where} holds no rows; check the data files")
        lengths = {len(r.unit), len(r.cycle), len(r.condition), len(r.rul), len(r.sensors)}
        if len(lengths) > 1 or r.sensors.ndim != 2 or r.sensors.shape[1] != len(r.sensor_names):
            raise UserError(f"{where}: columns of different lengths, or {r.sensors.shape[-1]} sensor "
                            f"columns for {len(r.sensor_names)} names; fix read_runs")
        columns = {"unit": r.unit, "cycle": r.cycle, "condition": r.condition,
                   **dict(zip(r.sensor_names, r.sensors.T))} | ({"RUL": r.rul} if split != "predict" else {})
        for column, values in columns.items():
            if (bad := ~np.isfinite(values) | (np.abs(values) > FLOAT32_MAX)).any():
                row = int(np.argmax(bad)) + 1
                raise UserError(f"{where} row {row} holds NaN or Inf or a value beyond float32 "
                                f"({values[row - 1]:g}) in {column}; fix or remove that row")
        same_unit = r.unit[1:] == r.unit[:-1]
        bad = np.r_[False, same_unit & (r.cycle[1:] <= r.cycle[:-1])]  # cycles rise in a unit
        bad |= (r.unit != np.round(r.unit)) | (r.cycle < 0) | (r.rul < 0) & (split != "predict")
        starts = np.r_[0, np.nonzero(~same_unit)[0] + 1]
        _, first = np.unique(r.unit[starts], return_index=True)
        bad[np.delete(starts, first)] = True  # a unit whose rows are split in two
        if bad.any():
            row = int(np.argmax(bad)) + 1
            raise UserError(f"{where} row {row} (unit {r.unit[row - 1]:g}, cycle {r.cycle[row - 1]:g}) "
                            f"breaks the layout; each unit's rows together, whole unit numbers, cycles "
                            f"rising from 0 or more, RUL 0 or more: fix the data or read_runs")
    return runs


def check_inputs(runs, features: np.ndarray) -> np.ndarray:
    """Inputs must be finite and within float32: a value far outside the training statistics (a
    sensor in other units) is refused by name and row. Returns `features`."""
    if (bad := ~np.isfinite(features) | (np.abs(features) > FLOAT32_MAX)).any():
        row, column = np.argwhere(bad)[0]
        name = (runs.sensor_names + ["cycle number"])[column]
        raise UserError(f"{runs.source or runs.name} row {row + 1}: {name} becomes "
                        f"{features[row, column]:g} once normalised, beyond float32; fix that row "
                        f"(a unit or sentinel error?) or train on data like it")
    return features
