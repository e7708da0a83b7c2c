"""PNG plots of an evaluation: RMSE per method, estimate vs EU*, ROC curves, eu of correct vs
wrong tokens. Matplotlib's Agg backend (no display)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp, fp = np.cumsum(y)[last], np.cumsum(1 - y)[last]
    return np.r_[0, fp / max(1, fp[-1])], np.r_[0, tp / max(1, tp[-1])]


def write_plots(results: dict, out: Path) -> list[str]:
    from measure.evaluation.pipeline import DETECTION_SCORES, RMSE_METHODS

    plt = _plt()
    arrays = results["_arrays"]
    files = []

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(results["rmse"])
    vals = [results["rmse"][n] for n in names]
    lo = [v - results["rmse_ci95"][n][0] for n, v in zip(names, vals, strict=True)]
    hi = [results["rmse_ci95"][n][1] - v for n, v in zip(names, vals, strict=True)]
    ax.bar(names, vals, yerr=[lo, hi], color=["tab:green"] + ["tab:gray"] * (len(names) - 1))
    ax.set_ylabel("RMSE vs EU* (nats)")
    ax.set_title("Token EU estimate against the deep ensemble's mutual information")
    ax.tick_params(axis="x", rotation=30)
    files.append(_save(fig, out / "rmse.png"))

    both = arrays["both"]
    shown = ["ours", "no_ddd", "no_osd", "tokur"]
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 4), sharey=True)
    for ax, name in zip(axes, shown, strict=True):
        x, y = both[RMSE_METHODS[name]], both["ensemble"]
        ax.scatter(y, x, s=3, alpha=0.3)
        top = float(max(x.max(), y.max(), 1e-6))
        ax.plot([0, top], [0, top], "k--", lw=1)
        ax.set_xlabel("EU* (ensemble MI)")
        ax.set_title(f"{name}: RMSE {results['rmse'][name]:.3f}")
    axes[0].set_ylabel("estimate")
    files.append(_save(fig, out / "scatter.png"))

    labels = arrays["labels"]
    if 0 < labels.sum() < len(labels):
        fig, ax = plt.subplots(figsize=(5, 5))
        for name, key in DETECTION_SCORES.items():
            fpr, tpr = roc_curve(arrays["generated"][key], labels)
            ax.plot(fpr, tpr, label=f"{name} ({results['auroc'][name]:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.set_title("Wrong calculator results: ROC")
        ax.legend(fontsize=8)
        files.append(_save(fig, out / "roc.png"))

        fig, ax = plt.subplots(figsize=(6, 3.5))
        eu = arrays["generated"]["ours.eu"]
        bins = np.linspace(0, float(eu.max()) or 1.0, 30)
        ax.hist(eu[labels == 0], bins=bins, alpha=0.6, density=True, label="correct")
        ax.hist(eu[labels == 1], bins=bins, alpha=0.6, density=True, label="wrong")
        thr = results.get("calibration", {}).get("threshold")
        if thr is not None:
            ax.axvline(thr, color="k", ls="--", label="calibrated threshold")
        ax.set_xlabel("eu (nats)")
        ax.set_title("eu of calculator-result tokens")
        ax.legend()
        files.append(_save(fig, out / "eu_distributions.png"))
    return files


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name
