"""The default flag threshold: chosen on validation tokens for a target false-positive rate, then
written into a bundle manifest so `epispec serve` flags with it (`thresholds.eu` in bundle.json).

A token is flagged when eu > threshold. For a target FPR α the threshold is the (1 − α)
quantile of eu over the validation tokens whose calculator result was correct, so that about
α of correct tokens get flagged; the test split then reports precision and recall there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from measure.evaluation.metrics import precision_recall_at
from measure.evaluation.report import clean
from server.bundle import Thresholds, read_manifest, write_manifest


def threshold_for_fpr(scores, labels, fpr: float) -> float:
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    correct = s[y == 0]
    if not len(correct):
        raise ValueError("No correct validation tokens: cannot choose a threshold for a false-positive rate.")
    return float(np.quantile(correct, 1.0 - fpr, method="higher"))


def calibrate(val_scores, val_labels, test_scores, test_labels, fpr: float) -> dict:
    t = threshold_for_fpr(val_scores, val_labels, fpr)
    return {
        "score": "eu",
        "threshold": t,
        "method": f"(1 - {fpr}) quantile of eu over correct calculator-result tokens of the validation split "
        f"(target false-positive rate {fpr})",
        "validation": {**precision_recall_at(val_scores, val_labels, t), "tokens": len(val_labels)},
        "test": {**precision_recall_at(test_scores, test_labels, t), "tokens": len(test_labels)},
    }


def write_threshold(bundle_dir: str | Path, calibration: dict) -> Path:
    """Set thresholds.eu (and thresholds_calibration) in bundle_dir/bundle.json, other keys kept."""
    manifest = read_manifest(bundle_dir)
    manifest.thresholds = Thresholds(
        **{**manifest.thresholds.as_dict(), "eu": round(calibration["threshold"], 6)}
    )
    manifest.calibrated = True
    manifest.thresholds_calibration = clean(
        {  # NaN (undefined precision/recall) -> null
            "method": calibration["method"],
            "validation": calibration["validation"],
            "test": calibration["test"],
        }
    )
    return write_manifest(bundle_dir, manifest)
