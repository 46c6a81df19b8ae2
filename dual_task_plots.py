"""The plots of a train_dual_task.py run, drawn by the main process at the end (matplotlib is imported only here and
in llava_metrics.py, and only when a plot is drawn)."""

import json
import math
from pathlib import Path

import torch


def pyplot():
    import matplotlib  # here: only the main process plots, at the very end

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(run_dir: Path, rul_cap: int) -> None:
    """run_dir/training_curves.png: the task losses, both validation RMSEs and the LR, by step."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]

    def series(key, scale=lambda value: value):  # (steps, values) of the records that hold `key`
        return [r["step"] for r in records if key in r], [scale(r[key]) for r in records if key in r]

    plt = pyplot()
    fig, (rul, health, lr) = plt.subplots(1, 3, figsize=(16, 4))
    # The task losses, not the AMNL total: that divides each loss by its own falling average, so it
    # hovers near 1 and rises as the model learns, which reads as divergence.
    cycles = series("train/rul_loss", lambda v: math.sqrt(max(v, 0)) * rul_cap)
    rul.plot(*cycles, label="training: √(failure-weighted MSE)")
    rul.plot(*series("val/rmse"), "o-", label="validation RMSE, all windows")
    rul.plot(*series("val/rmse_cut"), "s-", label="validation RMSE, cut like test")
    rul.set(title="RUL error (validation: EMA weights)", xlabel="optimizer step", ylabel="cycles")
    rul.legend()
    health.plot(*series("train/health_loss"))
    health.set(title="health-state loss", xlabel="optimizer step", ylabel="cross-entropy")
    total = health.twinx()
    total.plot(*series("train/loss"), color="0.7", linewidth=0.8)
    total.set_ylabel("AMNL total (about 1 by construction)", color="0.5")
    lr.plot(*series("train/lr"))
    lr.set(title="learning rate", xlabel="optimizer step")
    fig.tight_layout()
    fig.savefig(run_dir / "training_curves.png", dpi=100)
    plt.close(fig)


def plot_test_predictions(path: Path, pred, true, rmse: float, score: str) -> None:
    """Each test unit's predicted RUL against the true one, the units sorted by the true RUL."""
    plt = pyplot()
    order = torch.argsort(true)
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(true[order], "k-", label="true RUL (capped)")
    ax.plot(pred[order], "o", markersize=3, label="predicted RUL")
    ax.set(title=f"test units, last cycle: RMSE {rmse:.2f}{score}", xlabel="test unit (sorted by true RUL)",
           ylabel="cycles")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
