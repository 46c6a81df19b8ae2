"""The detector's scores as metrics, for train_llava.py (on P(Yes)): threshold metrics, ROC and AUROC, WAInjectBench's
per-subset view (TPR of each positive subset, FPR of each negative one, at 0.5 and at the threshold chosen on
validation for a target FPR), the ROC plot, and the check that a validation set can define the metric that
picks the best adapter."""

import csv
from pathlib import Path

import numpy as np

from common.errors import UserError


def roc_curve(scores: np.ndarray, labels: np.ndarray):
    """(fpr, tpr) at every distinct threshold, from the strictest down."""
    order = np.argsort(-scores, kind="stable")
    scores = scores[order]
    labels = labels[order]
    last_of_each = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    tps = np.cumsum(labels)[last_of_each]
    fps = last_of_each + 1 - tps
    return np.r_[0, fps] / max(1, len(labels) - labels.sum()), np.r_[0, tps] / max(1, labels.sum())


def classification_metrics(scores, labels, subsets: list[str], target_fpr: float,
                           classes: tuple[str, str] = ("benign", "malicious")) -> dict:
    """Threshold metrics at score >= 0.5 and ranking metrics; None where undefined (one class, no samples). Per
    subset: the count and TPR of the positive class, the count and FPR of the negative one, keyed by their names
    (`classes`: the names of label 0 and label 1)."""
    if len(labels) == 0:  # every sample of the split was unreadable and skipped
        return {"num_samples": 0, "accuracy": None, "precision": None, "recall": None, "f1": None, "auroc": None,
                f"tpr_at_fpr_{target_fpr:g}": None, "confusion_matrix": {}, "per_subset": {}, "roc": ([0.0], [0.0])}
    pred = (scores >= 0.5).astype(np.int64)
    matrix = {name: int(((pred == p) & (labels == t)).sum()) for name, p, t in
              (("tn", 0, 0), ("fp", 1, 0), ("fn", 0, 1), ("tp", 1, 1))}
    precision = matrix["tp"] / max(1, matrix["tp"] + matrix["fp"])
    recall = matrix["tp"] / max(1, matrix["tp"] + matrix["fn"])
    both_classes = 0 < labels.sum() < len(labels)
    fpr, tpr = roc_curve(scores, labels)
    per_subset = {}
    for name in sorted(set(subsets)):
        rows = np.array([s == name for s in subsets])
        pos = rows & (labels == 1)
        neg = rows & (labels == 0)
        positives = {classes[1]: int(pos.sum()), "tpr": float(pred[pos].mean())} if pos.any() else {}
        negatives = {classes[0]: int(neg.sum()), "fpr": float(pred[neg].mean())} if neg.any() else {}
        per_subset[name or "-"] = positives | negatives
    return {"num_samples": len(labels), "accuracy": float((pred == labels).mean()), "precision": precision,
            "recall": recall if labels.any() else None,
            "f1": 2 * precision * recall / max(1e-12, precision + recall) if labels.any() else None,
            "auroc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) if both_classes else None,  # trapezoids
            f"tpr_at_fpr_{target_fpr:g}": float(tpr[fpr <= target_fpr].max()) if both_classes else None,
            "confusion_matrix": matrix, "per_subset": per_subset, "roc": (fpr.tolist(), tpr.tolist())}


def show(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary(m: dict) -> str:
    """accuracy, AUROC and F1 in one short string for the console."""
    return f"acc {show(m['accuracy'])} AUROC {show(m['auroc'])} F1 {show(m['f1'])}"


def check_metric_defined(labels: set[int], metric: str, class_words: tuple[str, str], flag: str) -> None:
    """AUROC needs both classes, F1 a positive: a split without them could never choose by that metric."""
    if missing := {"auroc": {0, 1}, "f1": {1}, "accuracy": set()}[metric] - labels:
        kind = class_words[min(missing)].replace(" ", "-")  # an adjective: "prompt-injection images"
        raise UserError(f"the validation set has no {kind} images, so its {metric} is undefined and could never "
                        f"choose the best adapter; add some to {flag}, or pass --best_metric accuracy")


def threshold_at_fpr(scores: np.ndarray, labels: np.ndarray, target_fpr: float) -> float | None:
    """The lowest threshold (a score at or above it is flagged) whose false-positive rate on these labelled scores is
    at most `target_fpr`: chosen on validation, then applied to the test set. None without negatives."""
    negatives = np.sort(scores[labels == 0])[::-1]
    if not len(negatives):
        return None
    allowed = int(np.floor(target_fpr * len(negatives) + 1e-9))  # negatives that may be flagged
    return 0.0 if allowed >= len(negatives) else float(np.nextafter(negatives[allowed], np.inf))


def benchmark_table(path: Path, val: dict, test: dict, target_fpr: float, classes: tuple[str, str]) -> str:
    """WAInjectBench's view of the test set, written to `path` (CSV) and returned as console text: per subset and
    class its count and flag rate (TPR of the positive class, FPR of the negative one) at 0.5 and at the threshold
    that gives `target_fpr` on validation; then the overall AUROC, F1 and TPR at that threshold. `val` and `test`:
    their `classification_metrics` with "kept", the (scores, labels, subsets) of the readable images."""
    threshold = threshold_at_fpr(*val["kept"][:2], target_fpr)
    scores, labels, names = test["kept"]
    subsets = np.array(names, dtype=object)
    at_t = f"at_val_fpr_{target_fpr:g}"  # the column of the threshold chosen on validation
    table = []
    for label, subset in [(label, s) for label in (1, 0) for s in sorted(set(names))] + [(1, None), (0, None)]:
        rows = (labels == label) & (subsets == subset if subset is not None else True)
        if rows.any():  # positive subsets, negative ones, then all (None)
            rates = {t: None if t is None else float((scores[rows] >= t).mean()) for t in (0.5, threshold)}
            table.append({"subset": "all" if subset is None else subset or "-", "class": classes[label],
                          "images": int(rows.sum()), "rate": "TPR" if label else "FPR", "at_0.5": rates[0.5],
                          at_t: rates[threshold]})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    t = "n/a" if threshold is None else f"{threshold:.4f}"
    lines = [f"| subset | class | images | rate | at 0.5 | at {t} (val FPR {target_fpr:g}) |", "|" + "---|" * 6]
    lines += [f"| {r['subset']} | {r['class']} | {r['images']} | {r['rate']} | {show(r['at_0.5'])} | "
              f"{show(r[at_t])} |" for r in table]
    flagged = next((r[at_t] for r in table if r["subset"] == "all" and r["rate"] == "TPR"), None)
    lines.append(f"test AUROC {show(test['auroc'])} | F1 {show(test['f1'])} at 0.5 | TPR {show(flagged)} at the "
                 f"threshold chosen on validation for FPR {target_fpr:g} | per subset in {path}")
    return "\n".join(lines)


def plot_roc(path: Path, curves: dict[str, tuple[list, list, float | None]], classes: tuple[str, str]) -> None:
    """One ROC curve per split: {split: (false-positive rates, true-positive rates, AUROC or None)}."""
    import matplotlib  # here: only the main process plots, at the very end

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (fpr, tpr, auroc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUROC {show(auroc)})")
    ax.plot([0, 1], [0, 1], "k:", linewidth=1)
    ax.set(xlabel=f"false-positive rate ({classes[0]} flagged)", ylabel=f"true-positive rate ({classes[1]} caught)",
           title="ROC")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
