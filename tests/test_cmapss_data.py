"""Loading the real C-MAPSS files shipped in data/cmapss/."""

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import UserError
from train_dual_task import Config, health_state, load_splits, read_runs, smooth_per_unit

DATA = Path(__file__).resolve().parents[1] / "data" / "cmapss"


def load(cfg: Config, fold: int = 0):
    """The script's data parts wired as it wires them: the train/val/val_cut/test windows."""
    return load_splits(cfg, read_runs(cfg), fold)[0]


@pytest.fixture(scope="module")
def fd001():
    return load(Config(data=f"{DATA}/FD001", smoothing=0.0, cycle_feature=False))


def test_fd001_shapes_caps_and_engine_split(fd001):
    train, val, test = fd001["train"], fd001["val"], fd001["test"]
    # 100 engines, 20631 rows: every engine gives (cycles - 29) windows of 30 cycles.
    assert len(train.rul) + len(val.rul) == 20631 - 100 * 29
    assert train.x.shape[1:] == (30, 14) and test.x.shape == (100, 30, 14)
    train_units, val_units = set(train.unit.tolist()), set(val.unit.tolist())
    assert len(train_units) == 80 and len(val_units) == 20 and not train_units & val_units  # split by engine
    assert train.rul.max() == 125 and train.rul.min() == 0  # piecewise-linear cap, run to failure
    assert test.rul.max() <= 125 and test.rul.min() == 7  # RUL_FD001 spans 7..145, capped at 125
    assert torch.isfinite(train.x).all() and torch.isfinite(test.x).all()


def test_the_cycle_feature_is_the_cycle_number_scaled_by_the_training_engines(fd001):
    data = load(Config(data=f"{DATA}/FD001", smoothing=0.0))
    assert data["train"].x.shape[2] == 15
    torch.testing.assert_close(data["train"].x[..., :14], fd001["train"].x)  # the sensors are unchanged
    train = np.loadtxt(DATA / "train_FD001.txt.gz")
    train_cycles = train[np.isin(train[:, 0], fd001["train"].unit.unique().numpy()), 1]
    mean, std = train_cycles.mean(), train_cycles.std()
    # The first training window of engine 1 ends at cycle 30; the test windows end at each engine's last cycle.
    first = data["train"].x[data["train"].unit == 1][0, :, 14]
    torch.testing.assert_close(first, torch.tensor((np.arange(1, 31) - mean) / std, dtype=torch.float32))
    test = np.loadtxt(DATA / "test_FD001.txt.gz")
    last_cycle = np.array([test[test[:, 0] == u, 1].max() for u in range(1, 101)])
    torch.testing.assert_close(data["test"].x[:, -1, 14], torch.tensor((last_cycle - mean) / std, dtype=torch.float32))


def test_validation_split_depends_on_the_seed():
    a = load(Config(data=f"{DATA}/FD001", seed=1))["val"].unit.unique()
    b = load(Config(data=f"{DATA}/FD001", seed=2))["val"].unit.unique()
    assert not torch.equal(a, b)


def test_normalisation_uses_training_engines_only(fd001, tmp_path):
    # Distort every validation engine and the whole test file: the training features must not move.
    val_units = set(fd001["val"].unit.tolist())
    for name in ["RUL_FD001.txt.gz"]:
        shutil.copy(DATA / name, tmp_path / name)
    train = np.loadtxt(DATA / "train_FD001.txt.gz")
    train[np.isin(train[:, 0], list(val_units)), 5:] *= 3.0
    np.savetxt(tmp_path / "train_FD001.txt", train, fmt="%.4f")
    test = np.loadtxt(DATA / "test_FD001.txt.gz")
    test[:, 5:] += 100.0
    np.savetxt(tmp_path / "test_FD001.txt", test, fmt="%.4f")
    distorted = load(Config(data=f"{tmp_path}/FD001", smoothing=0.0, cycle_feature=False))
    torch.testing.assert_close(distorted["train"].x, fd001["train"].x, atol=1e-3, rtol=0)
    assert not torch.allclose(distorted["val"].x, fd001["val"].x)
    # and the training rows are standardised by their own statistics: mean ~0, std ~1 per sensor
    rows = torch.unique(fd001["train"].x.reshape(-1, 14), dim=0)  # every training cycle once
    assert len(rows) == (fd001["train"].x.shape[0] + 29 * 80)
    assert rows.mean(0).abs().max() < 0.1 and (rows.std(0) - 1).abs().max() < 0.1


def test_fd002_pads_short_test_engines_instead_of_dropping_them():
    data = load(Config(data=f"{DATA}/FD002"))
    test = data["test"]
    # 14 sensors + the cycle number; all 259 test engines, 6 of them shorter than 30 cycles
    assert test.x.shape == (259, 30, 15)
    raw = np.loadtxt(DATA / "test_FD002.txt.gz")
    lengths = np.bincount(raw[:, 0].astype(int))[1:]
    short = np.flatnonzero(lengths < 30)
    assert len(short) == 6
    for i in short:  # front-padded by repeating the first cycle
        pad = 30 - lengths[i]
        assert torch.equal(test.x[i, :pad], test.x[i, pad:pad + 1].expand(pad, -1))


def test_fd002_is_normalised_per_operating_condition():
    per_condition = load(Config(data=f"{DATA}/FD002"))["train"].x[:, -1, :]
    pooled = load(Config(data=f"{DATA}/FD002", per_condition_norm=False))["train"].x[:, -1, :]
    # Pooled statistics leave the six regimes as clusters: the sensor spread is dominated by them.
    assert per_condition.std(0).mean() < 1.1 and pooled.std(0).mean() < 1.1
    assert not torch.allclose(per_condition, pooled)


def test_health_states_from_rul_thresholds():
    rul = np.array([0, 15, 16, 50, 51, 125])
    assert health_state(rul, Config().health_thresholds).tolist() == [2, 2, 1, 1, 0, 0]  # 50, 15
    assert health_state(rul, [100, 0]).tolist() == [2, 1, 1, 1, 1, 0]
    assert health_state(rul, [60, 40, 15, 5]).tolist() == [4, 3, 2, 1, 1, 0]  # five states from four thresholds


def write_gz(path, text):
    with gzip.open(path, "wt") as f:
        f.write(text)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: (d / "train_FD001.txt.gz").unlink(), "missing data file"),
        (lambda d: write_gz(d / "train_FD001.txt.gz", "1 1 0.1 abc\n"), "is malformed"),
        (lambda d: write_gz(d / "train_FD001.txt.gz", ""), "is empty"),
        (lambda d: write_gz(d / "train_FD001.txt.gz", "1 2 3\n4 5 6\n"), "has 3 columns, expected 26"),
        (lambda d: write_gz(d / "train_FD001.txt.gz", " ".join(["1"] * 25 + ["nan"]) + "\n"), "holds NaN or Inf"),
        (lambda d: write_gz(d / "RUL_FD001.txt.gz", "10\n20\n"), "has 2 rows for 100 test engines"),
    ],
)
def test_bad_data_files_give_a_clear_error(tmp_path, corrupt, message):
    for f in DATA.glob("*FD001*"):
        shutil.copy(f, tmp_path / f.name)
    corrupt(tmp_path)
    with pytest.raises(UserError, match=message):
        load(Config(data=f"{tmp_path}/FD001"))


def test_a_training_engine_shorter_than_the_window_is_named(tmp_path):
    for f in DATA.glob("*FD001*"):
        shutil.copy(f, tmp_path / f.name)
    train = np.loadtxt(DATA / "train_FD001.txt.gz")
    train = train[(train[:, 0] != 7) | (train[:, 1] <= 12)]  # engine 7 keeps 12 cycles
    np.savetxt(tmp_path / "train_FD001.txt", train, fmt="%.4f")
    (tmp_path / "train_FD001.txt.gz").unlink()
    with pytest.raises(UserError, match="training unit 7 has 12 cycles, fewer than --window 30"):
        load(Config(data=f"{tmp_path}/FD001"))


def test_smoothing_is_causal_and_stays_within_each_engine():
    features = np.arange(12, dtype=float).reshape(6, 2)
    units = np.array([1, 1, 1, 2, 2, 2])
    smoothed = smooth_per_unit(features, units, alpha=0.5)
    assert smoothed[1].tolist() == [0.5 * 2 + 0.5 * 0, 0.5 * 3 + 0.5 * 1]
    assert smoothed[3].tolist() == features[3].tolist()  # a new engine starts afresh
    changed = features.copy()
    changed[2] += 100  # a later cycle never changes an earlier smoothed value
    assert np.array_equal(smooth_per_unit(changed, units, 0.5)[:2], smoothed[:2])
    default = load(Config(data=f"{DATA}/FD001"))  # smoothing 0.05 by default: the same windows, less noise
    raw = load(Config(data=f"{DATA}/FD001", smoothing=0.0))
    assert default["train"].x.shape == raw["train"].x.shape
    assert default["train"].x.diff(dim=1).abs().mean() < 0.5 * raw["train"].x.diff(dim=1).abs().mean()


def test_validation_engines_cut_like_test_engines_match_a_hand_computation(fd001):
    """--val_metric cut: each validation engine is cut at 10 seeded points, observed for 20%..(life - 1 cycle); a
    cut is scored by its last window and the capped RUL at the cut, exactly as a test engine is."""
    from accelerate import Accelerator

    from train_dual_task import DualTaskNet, evaluate, make_loader

    cfg = Config(data=f"{DATA}/FD001", smoothing=0.0, cycle_feature=False)
    val, cut = fd001["val"], fd001["val_cut"]
    rng = np.random.default_rng([cfg.seed, 1])
    windows, targets = [], []
    for unit in sorted(set(val.unit.tolist())):
        engine = val.unit == unit  # windows ending at cycles 30, 31, ..., life: RUL life - 30, ..., 0 (capped)
        life = int(engine.sum()) + cfg.window - 1
        for length in rng.integers(int(np.ceil(0.2 * life)), life - 1, size=cfg.val_cuts, endpoint=True):
            assert int(np.ceil(0.2 * life)) <= length <= life - 1
            targets.append(min(life - length, cfg.rul_cap))
            if length >= cfg.window:  # the all-windows split holds the very window that ends at the cut
                windows.append(val.x[engine][length - cfg.window])
            else:  # shorter than a window: front-padded with the first cycle, as short test engines are
                first = val.x[engine][0]
                windows.append(torch.cat([first[:1].expand(cfg.window - length, -1), first[:length]]))
    assert len(cut.rul) == 20 * 10 and cut.rul.tolist() == targets
    assert torch.equal(cut.x, torch.stack(windows))

    torch.manual_seed(0)
    model = DualTaskNet(num_features=14, cfg=cfg)
    accelerator = Accelerator(cpu=True)
    scored = evaluate(model, make_loader(cut, 64, shuffle=False, seed=0), accelerator, cfg.rul_cap)
    with torch.no_grad():  # evaluate() leaves the model in training mode
        by_hand = (model.eval()(torch.stack(windows))[0] * cfg.rul_cap).clamp(0, cfg.rul_cap)
    rmse = torch.sqrt(((by_hand - torch.tensor(targets, dtype=torch.float32)) ** 2).mean()).item()
    assert scored["rmse"] == pytest.approx(rmse, rel=1e-5) and scored["num_samples"] == 200
