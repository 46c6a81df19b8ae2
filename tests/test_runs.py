"""dual_task_checks.py: `check_runs` and `check_inputs` refuse, whichever reader produced the data, rows that would
train on nonsense (a broken unit/cycle layout, a value that is not finite or beyond float32, a negative RUL), with
one line that names the data, the row and the column; and train_dual_task.py runs them on what any `read_runs`
returns."""

import gzip
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import train_dual_task
from common.errors import UserError
from dual_task_checks import FLOAT32_MAX, check_inputs, check_runs
from train_dual_task import Runs

DATA = Path(__file__).resolve().parents[1] / "data" / "cmapss"


def runs(units=(1, 1, 1, 2, 2), cycles=(1, 2, 3, 1, 2), sensors=None, rul=None, name="pumps") -> Runs:
    n = len(units)
    sensors = np.arange(2.0 * n).reshape(n, 2) if sensors is None else np.asarray(sensors, dtype=float)
    rul = np.array([2.0, 1, 0, 1, 0])[:n] if rul is None else np.asarray(rul, dtype=float)
    return Runs(name, ["temperature", "pressure"], np.asarray(units, dtype=float), np.asarray(cycles, dtype=float),
                np.zeros(n, np.int64), sensors, rul, source=f"{name}.csv")


def with_value(array, row, value, column=None):
    array = np.array(array, dtype=float)
    if column is None:
        array[row] = value
    else:
        array[row, column] = value
    return array


GOOD = runs()


@pytest.mark.parametrize("broken, message", [
    (runs(sensors=with_value(GOOD.sensors, 2, np.nan, 1)), r"pumps.csv \(train\) row 3 holds NaN .* in pressure"),
    (runs(sensors=with_value(GOOD.sensors, 1, 1e308, 0)), r"row 2 .* beyond float32 \(1e\+308\) in temperature"),
    (runs(sensors=with_value(GOOD.sensors, 4, -np.inf, 0)), r"row 5 holds NaN or Inf .* in temperature"),
    (runs(cycles=(1, 2, np.inf, 1, 2)), r"row 3 .* in cycle"),
    (runs(rul=(2, 1, np.nan, 1, 0)), r"row 3 .* in RUL"),
    (runs(cycles=(1, 3, 2, 1, 2)), r"row 3 \(unit 1, cycle 2\) breaks the layout"),
    (runs(units=(1, 1, 2, 1, 2)), r"row 4 \(unit 1, cycle 1\) breaks the layout"),  # unit 1's rows split in two
    (runs(units=(1, 1, 1, 2.5, 2.5)), r"row 4 \(unit 2.5, cycle 1\) breaks the layout"),
    (runs(rul=(2, 1, -1, 1, 0)), r"row 3 \(unit 1, cycle 3\) breaks the layout"),
    (runs(cycles=(-1, 2, 3, 1, 2)), r"row 1 \(unit 1, cycle -1\) breaks the layout"),
    (runs(units=(), cycles=(), sensors=np.zeros((0, 2)), rul=()), r"holds no rows"),
    (Runs("pumps", ["temperature"], GOOD.unit, GOOD.cycle, GOOD.condition, GOOD.sensors, GOOD.rul),
     r"2 sensor columns for 1 names; fix read_runs"),
])
def test_check_runs_names_the_row_and_column_of_every_kind_of_break(broken, message):
    with pytest.raises(UserError, match=message) as err:
        check_runs({"test": GOOD, "train": broken})
    assert "\n" not in str(err.value) and "; " in str(err.value)


def test_units_to_predict_may_have_no_rul_and_good_data_passes():
    unknown = runs(rul=np.full(5, np.nan))
    assert check_runs({"predict": unknown})["predict"] is unknown
    with pytest.raises(UserError, match=r"\(test\) row 1 .* in RUL"):
        check_runs({"test": unknown})
    assert check_runs({"train": GOOD, "test": GOOD})["train"] is GOOD


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=5), data=st.data())
def test_any_well_formed_runs_pass_and_one_value_beyond_float32_anywhere_is_named(lengths, data):
    units = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    cycles = np.concatenate([np.sort(data.draw(st.lists(st.integers(0, 500), min_size=n, max_size=n, unique=True)))
                             for n in lengths])
    rows = len(units)
    values = data.draw(st.lists(st.floats(-1e30, 1e30), min_size=2 * rows, max_size=2 * rows))
    sensors = np.array(values).reshape(rows, 2)
    good = runs(units, cycles, sensors, rul=np.zeros(rows))
    check_runs({"train": good})
    row, column = data.draw(st.integers(0, rows - 1)), data.draw(st.integers(0, 1))
    value = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e39, -3.5e38, 1e308]))
    with pytest.raises(UserError, match=rf"row {row + 1} .* in {['temperature', 'pressure'][column]}; "):
        check_runs({"train": runs(units, cycles, with_value(sensors, row, value, column), rul=np.zeros(rows))})


def test_check_inputs_names_a_normalised_value_beyond_float32():
    features = np.zeros((5, 3))
    assert check_inputs(GOOD, features) is features
    features[3, 2] = 1e39  # the third column: the cycle number after the two sensors
    with pytest.raises(UserError, match=r"^pumps.csv row 4: cycle number becomes 1e\+39 once normalised"):
        check_inputs(GOOD, features)
    assert FLOAT32_MAX == pytest.approx(3.4028e38, rel=1e-4)


def copy_fd001(folder: Path) -> Path:
    for f in DATA.glob("*FD001*"):
        shutil.copy(f, folder / f.name)
    return folder


def test_a_sensor_value_of_1e308_in_the_training_file_is_refused_by_row_and_column(tmp_path):
    """A unit or sentinel error in an export: before, it overflowed the normalisation and the run exited 0."""
    folder = copy_fd001(tmp_path)
    with gzip.open(folder / "train_FD001.txt.gz", "rt") as f:
        lines = f.read().splitlines()
    values = lines[6].split()
    values[6] = "1e308"  # column 7: sensor 2 (unit, cycle, 3 settings, sensors 1..21)
    lines[6] = " ".join(values)
    with gzip.open(folder / "train_FD001.txt.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    cfg = train_dual_task.Config(data=f"{folder}/FD001")
    with pytest.raises(UserError, match=re.escape(f"{folder / 'train_FD001.txt.gz'} (train) row 7 holds NaN or Inf or "
                                                  f"a value beyond float32 (1e+308) in sensor 2; fix or remove")):
        check_runs(train_dual_task.read_runs(cfg))


def test_a_test_value_far_outside_the_training_statistics_is_refused_once_normalised(tmp_path):
    """Within float32 as read, but a nearly constant training sensor turns it into an overflow."""
    folder = copy_fd001(tmp_path)
    test = np.loadtxt(DATA / "test_FD001.txt.gz")
    test[4, 4 + 2] = 3e38  # sensor 2, whose training std is about 0.5
    np.savetxt(folder / "test_FD001.txt", test, fmt="%.6g")
    (folder / "test_FD001.txt.gz").unlink()
    cfg = train_dual_task.Config(data=f"{folder}/FD001")
    with pytest.raises(UserError, match=r"test_FD001.txt row 5: sensor 2 becomes [0-9.e+]+ once normalised"):
        train_dual_task.load_splits(cfg, check_runs(train_dual_task.read_runs(cfg)))
