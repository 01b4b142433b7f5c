"""The figures every evaluation reports: per-run metrics (accuracy, macro F1, AUC,
sensitivity, specificity), their summary over runs, GLaD's cross-architecture figure and the
share of saturated pixels in a set. numpy only (scikit-learn when metrics are computed)."""

from __future__ import annotations

from typing import Any

import numpy as np

METRICS = ("acc", "f1", "auc", "sensitivity", "specificity")


def metrics(y_true: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """Accuracy, macro F1, one-vs-rest AUC, sensitivity and specificity (scikit-learn).

    ``prob`` is (N, C) class probabilities. Binary: AUC of the positive class (index 1),
    sensitivity its recall and specificity the negative class's recall. Multi-class: macro
    averages over classes present in ``y_true`` (one-vs-rest AUC, per-class recall and
    TN / (TN + FP)).
    """
    # imported here: scikit-learn costs a second to import, in every job that imports this module
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

    y_true = np.asarray(y_true)
    n_classes = prob.shape[1]
    labels = list(range(n_classes))
    pred = prob.argmax(1)
    cm = confusion_matrix(y_true, pred, labels=labels).astype(np.float64)
    tp = np.diag(cm)
    fn, fp = cm.sum(1) - tp, cm.sum(0) - tp
    tn = cm.sum() - tp - fn - fp
    present = cm.sum(1) > 0
    sens = tp / np.maximum(tp + fn, 1)
    spec = tn / np.maximum(tn + fp, 1)
    if n_classes == 2:
        auc = roc_auc_score(y_true, prob[:, 1]) if present.all() else float("nan")
        sensitivity, specificity = sens[1], spec[1]
    else:
        seen = [c for c in labels if present[c]]
        auc = (roc_auc_score(y_true, prob[:, seen] / prob[:, seen].sum(1, keepdims=True),
                             multi_class="ovr", average="macro", labels=seen)
               if len(seen) > 1 else float("nan"))
        sensitivity, specificity = sens[present].mean(), spec[present].mean()
    return {"acc": float(accuracy_score(y_true, pred)),
            "f1": float(f1_score(y_true, pred, average="macro", labels=labels, zero_division=0)),
            "auc": float(auc), "sensitivity": float(sensitivity), "specificity": float(specificity)}


def summarise_runs(runs: list[dict[str, float]], epoch_times: list[float],
                   curves: list[dict[str, list[float]]] | None = None) -> dict[str, Any]:
    """Mean, std and per-run values of each metric, the mean seconds per epoch, and (when
    given) the training curves (loss and accuracy per epoch) averaged over runs."""
    out: dict[str, Any] = {}
    for key in METRICS:
        values = [r[key] for r in runs]
        out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "runs": values}
    out["epoch_time_s"] = float(np.mean(epoch_times))
    out["train_time_s"] = float(np.sum(epoch_times) / max(len(runs), 1))
    if curves is not None:
        out["curve"] = {key: np.mean([c[key] for c in curves], axis=0).tolist()
                        for key in ("loss", "acc")}
    return out


def cross_arch(patch: dict[str, dict[str, Any]], used: str | None) -> dict[str, Any]:
    """GLaD's cross-architecture figure: per metric, the mean over the evaluated architectures
    other than the one the set was distilled with (``used``) of their mean and of their std."""
    others = [a for a in patch if a != used]
    out: dict[str, Any] = {"excluded": used, "archs": others}
    for key in METRICS:
        out[key] = {"mean": float(np.mean([patch[a][key]["mean"] for a in others])),
                    "std": float(np.mean([patch[a][key]["std"] for a in others]))}
    return out


def saturated_fraction(images: np.ndarray) -> float:
    """Share of pixels (N, 3, H, W uint8) at 0 or 255 in any channel."""
    return float(((images == 0) | (images == 255)).any(1).mean())
