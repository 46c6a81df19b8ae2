"""Binary classification metrics from scores (train_llava.py, on P(Yes)): threshold metrics, ROC and AUROC, and
WAInjectBench's per-subset view (TPR of each positive subset, FPR of each negative one, at 0.5 and at the threshold
chosen on validation for a target FPR); and the check that a validation set can define the metric that picks the
best checkpoint."""

import csv
from pathlib import Path

import numpy as np

from common.errors import UserError


def roc_curve(scores: np.ndarray, labels: np.ndarray):
    """(fpr, tpr) at every distinct threshold, from the strictest down."""
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_each = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    tps = np.cumsum(labels)[last_of_each]
    fps = last_of_each + 1 - tps
    return np.r_[0, fps] / max(1, len(labels) - labels.sum()), np.r_[0, tps] / max(1, labels.sum())


def classification_metrics(scores, labels, subsets: list[str], target_fpr: float,
                           classes: tuple[str, str] = ("benign", "malicious")) -> dict:
    """Threshold metrics at score >= 0.5 and ranking metrics; None where a metric is undefined (one class, no samples).
    Per subset: the count and TPR of the positive class, the count and FPR of the negative one, keyed by their names
    (`classes`: the names of label 0 and label 1)."""
    if len(labels) == 0:  # every sample of the split was unreadable and skipped
        return {"num_samples": 0, "accuracy": None, "precision": None, "recall": None, "f1": None, "auroc": None,
                f"tpr_at_fpr_{target_fpr:g}": None, "confusion_matrix": {}, "per_subset": {}, "roc": ([0.0], [0.0])}
    pred = (scores >= 0.5).astype(np.int64)
    tp, fp = int(((pred == 1) & (labels == 1)).sum()), int(((pred == 1) & (labels == 0)).sum())
    tn, fn = int(((pred == 0) & (labels == 0)).sum()), int(((pred == 0) & (labels == 1)).sum())
    precision, recall = tp / max(1, tp + fp), tp / max(1, tp + fn)
    both_classes = 0 < labels.sum() < len(labels)
    fpr, tpr = roc_curve(scores, labels)
    per_subset = {}
    for name in sorted(set(subsets)):
        rows = np.array([s == name for s in subsets])
        pos, neg = rows & (labels == 1), rows & (labels == 0)
        positives = {classes[1]: int(pos.sum()), "tpr": float(pred[pos].mean())} if pos.any() else {}
        negatives = {classes[0]: int(neg.sum()), "fpr": float(pred[neg].mean())} if neg.any() else {}
        per_subset[name or "-"] = positives | negatives
    return {
        "num_samples": len(labels),
        "accuracy": float((pred == labels).mean()),
        "precision": precision,
        "recall": recall if labels.any() else None,
        "f1": 2 * precision * recall / max(1e-12, precision + recall) if labels.any() else None,
        "auroc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) if both_classes else None,  # trapezoids
        f"tpr_at_fpr_{target_fpr:g}": float(tpr[fpr <= target_fpr].max()) if both_classes else None,
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "per_subset": per_subset,
        "roc": (fpr.tolist(), tpr.tolist()),
    }


def summary(m: dict) -> str:
    """accuracy, AUROC and F1 in one short string for the console."""
    def show(value):
        return "n/a" if value is None else f"{value:.3f}"

    return f"acc {show(m['accuracy'])} AUROC {show(m['auroc'])} F1 {show(m['f1'])}"


def check_metric_defined(labels: set[int], metric: str, class_words: tuple[str, str], flag: str) -> None:
    """AUROC needs both classes, F1 a positive: a split without them could never choose by that metric."""
    needed = {"auroc": {0, 1}, "f1": {1}, "accuracy": set()}[metric]
    if missing := needed - labels:
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

    def rate(rows, t):
        return None if t is None else float((scores[rows] >= t).mean())

    table, order = [], [(label, subset) for label in (1, 0) for subset in sorted(set(names))]
    for label, subset in order + [(1, None), (0, None)]:  # positive subsets, negative ones, then all (None)
        rows = (labels == label) & (subsets == subset if subset is not None else True)
        if rows.any():
            table.append({"subset": "all" if subset is None else subset or "-", "class": classes[label],
                          "images": int(rows.sum()), "rate": "TPR" if label else "FPR",
                          "at_0.5": rate(rows, 0.5), at_t: rate(rows, threshold)})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)

    def show(value):
        return "n/a" if value is None else f"{value:.3f}"

    t = "n/a" if threshold is None else f"{threshold:.4f}"
    lines = [f"| subset | class | images | rate | at 0.5 | at {t} (val FPR {target_fpr:g}) |", "|" + "---|" * 6]
    lines += [f"| {r['subset']} | {r['class']} | {r['images']} | {r['rate']} | {show(r['at_0.5'])} | "
              f"{show(r[at_t])} |" for r in table]
    flagged = next((r[at_t] for r in table if r["subset"] == "all" and r["rate"] == "TPR"), None)
    lines.append(f"test AUROC {show(test['auroc'])} | F1 {show(test['f1'])} at 0.5 | TPR {show(flagged)} at "
                 f"the threshold chosen on validation for FPR {target_fpr:g} | per subset in {path}")
    return "\n".join(lines)
