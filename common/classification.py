"""Binary classification metrics from scores (train_llava.py, on P(Yes)): threshold metrics, ROC and AUROC, and
WAInjectBench's per-subset view (TPR of each positive subset, FPR of each negative one); and the check that a
validation set can define the metric that picks the best checkpoint."""

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
