"""The plots a run saves at its end (the only module that imports matplotlib, and only when a plot is drawn).

train_dual_task.py: `plot_training_curves` (from metrics.jsonl) and `plot_test_predictions`; train_llava.py: `plot_roc`.
"""

import json
import math
from pathlib import Path


def _pyplot():
    import matplotlib  # imported here: only the main process plots, at the very end

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(run_dir: Path, rul_cap: int) -> None:
    """run_dir/training_curves.png: the task losses, both validation RMSEs and the LR, by optimizer step."""
    plt = _pyplot()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in records if "train/rul_loss" in r]
    epochs = [r for r in records if "val/rmse" in r]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    # The task losses, not the AMNL total: that divides each loss by its own falling average, so it hovers near
    # 1 and rises as the model learns, which reads as divergence. The RUL loss in cycles sits beside validation.
    axes[0].plot([r["step"] for r in steps], [math.sqrt(max(r["train/rul_loss"], 0)) * rul_cap for r in steps],
                 label="training: √(failure-weighted MSE)")
    axes[0].plot([r["step"] for r in epochs], [r["val/rmse"] for r in epochs], "o-",
                 label="validation RMSE, all windows")
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
    fig.savefig(run_dir / "training_curves.png", dpi=100)
    plt.close(fig)


def plot_test_predictions(path: Path, pred, true, rmse: float, score: float | None) -> None:
    """Each test unit's predicted RUL against the true one, units sorted by the true RUL."""
    plt = _pyplot()
    order = sorted(range(len(true)), key=lambda i: float(true[i]))
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot([float(true[i]) for i in order], "k-", label="true RUL (capped)")
    ax.plot([float(pred[i]) for i in order], "o", markersize=3, label="predicted RUL")
    phm08 = f", PHM08 score {score:.0f}" if score is not None else ""
    ax.set(title=f"test units, last cycle: RMSE {rmse:.2f}{phm08}", xlabel="test unit (sorted by true RUL)",
           ylabel="cycles")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_roc(path: Path, curves: dict[str, tuple[list, list, float | None]], classes: tuple[str, str]) -> None:
    """One ROC curve per split: {split: (false-positive rates, true-positive rates, AUROC or None)}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (fpr, tpr, auroc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUROC {'n/a' if auroc is None else format(auroc, '.3f')})")
    ax.plot([0, 1], [0, 1], "k:", linewidth=1)
    ax.set(xlabel=f"false-positive rate ({classes[0]} flagged)", ylabel=f"true-positive rate ({classes[1]} caught)",
           title="ROC")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
