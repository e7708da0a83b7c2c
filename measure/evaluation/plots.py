"""PNG plots of an evaluation: every estimate of EU* against it (metrics per method, mean estimate
per EU* decile, scatter on shared axes), ROC curves, eu of correct vs wrong tokens. Ours and its
corrections are drawn in green, the baselines in other colours, all on the same axes.
Matplotlib's Agg backend (no display)."""

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


def _colours(names: list[str]) -> dict[str, str]:
    from measure.evaluation.estimation import OURS_VARIANTS

    greens = iter(["tab:green", "yellowgreen", "darkgreen"])
    others = iter(
        [
            "tab:blue",
            "tab:orange",
            "tab:red",
            "tab:purple",
            "tab:brown",
            "tab:pink",
            "tab:cyan",
            "tab:gray",
            "tab:olive",
            "black",
        ]
        * 2
    )
    return {n: next(greens) if n in OURS_VARIANTS else next(others) for n in names}


def decile_means(estimate: np.ndarray, truth: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(mean EU*, mean estimate) over the tokens of each EU* quantile bin, lowest first."""
    order = np.argsort(truth, kind="mergesort")
    parts = np.array_split(order, bins)
    parts = [p for p in parts if len(p)]
    return np.array([truth[p].mean() for p in parts]), np.array([estimate[p].mean() for p in parts])


def write_plots(results: dict, out: Path) -> list[str]:
    from measure.evaluation.estimation import ESTIMATES
    from measure.evaluation.pipeline import DETECTION_SCORES

    plt = _plt()
    arrays = results["_arrays"]
    files = []
    names = [n for n in ESTIMATES if n in results["rmse"]]
    colour = _colours(names)

    panels = [
        ("rmse", "RMSE vs EU* (nats)"),
        ("rmse_top_decile", "RMSE, top decile of EU* (nats)"),
        ("spearman", "Spearman with EU*"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (metric, label) in zip(axes, panels, strict=True):
        vals = np.array(
            [np.nan if results[metric][n] is None else results[metric][n] for n in names], dtype=float
        )
        ci = np.array(
            [[np.nan if c is None else c for c in results[f"{metric}_ci95"][n]] for n in names], dtype=float
        )
        err = np.nan_to_num(np.abs(np.stack([vals - ci[:, 0], ci[:, 1] - vals])))
        ax.barh(names, np.nan_to_num(vals), xerr=err, color=[colour[n] for n in names])
        ax.invert_yaxis()
        ax.set_xlabel(label)
    axes[0].set_title("Token EU estimates against the deep ensemble's MI (EU*), 95% CIs", loc="left")
    files.append(_save(fig, out / "estimation.png"))

    both = arrays["both"]
    truth = both["ensemble"]
    fig, ax = plt.subplots(figsize=(7, 5))
    for n in names:
        x, y = decile_means(both[ESTIMATES[n]], truth)
        ax.plot(x, y, marker="o", ms=3, color=colour[n], label=n, lw=2 if n == "ours" else 1)
    top = float(x.max()) or 1.0
    ax.plot([0, top], [0, top], "k--", lw=1, label="estimate = EU*")
    ax.set_xscale("symlog", linthresh=1e-3)  # one scale on both axes: the diagonal stays straight
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("EU* (mean over a decile of test tokens, nats, symlog)")
    ax.set_ylabel("mean estimate (nats, symlog)")
    ax.set_title("Estimate vs EU* per EU* decile")
    ax.legend(fontsize=7, ncol=2)
    files.append(_save(fig, out / "deciles.png"))

    cols = 4
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), sharex=True, sharey=True)
    for ax, n in zip(axes.flat, names, strict=False):
        ax.scatter(truth, both[ESTIMATES[n]], s=3, alpha=0.3, color=colour[n])
        ax.plot([0, top], [0, top], "k--", lw=1)  # top = max EU*, from the decile plot
        ax.set_title(f"{n}: RMSE {results['rmse'][n]:.3f}", fontsize=9)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("EU* (ensemble MI)")
    for ax in axes[:, 0]:
        ax.set_ylabel("estimate")
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
