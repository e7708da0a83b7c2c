"""PNG plots of `epispec eval --bundle B` at scale, every score on the same axes:

roc_tokens.png      ROC of every token score (p_error included) on the labelled result tokens
estimation.png      Spearman of every method with EU* and with truth 2, 95% CIs by problem
reliability.png     p_error's reliability diagram on test (mean p_error vs rate of wrong
                    tokens per bin, marker area ∝ tokens)
roc_responses.png   ROC of every response score on the arithmetic answers
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from measure.evaluation.plots import _plt, _save, roc_curve


def _roc(ax, scores: dict[str, np.ndarray], labels: np.ndarray, auroc: dict, title: str) -> None:
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"].colors
    colours = tab20[::2] + tab20[1::2]  # 20 distinct colours, the strong ones first
    for (name, s), colour in zip(scores.items(), colours, strict=False):
        fpr, tpr = roc_curve(np.asarray(s, dtype=float), labels)
        bold = name in ("eu", "p_error", "mean_eu")
        ax.plot(
            fpr, tpr, color=colour, lw=2 if bold else 1, label=f"{name} ({auroc.get(name, float('nan')):.3f})"
        )
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title)
    ax.legend(fontsize=7)


def write(results: dict, out: Path) -> list[str]:
    from measure.evaluation.pretrained import TOKEN_SCORES

    plt = _plt()
    a = results["_arrays"]
    tokens, labels, files = a["tokens"], a["labels"], []
    if 0 < labels.sum() < len(labels):
        fig, ax = plt.subplots(figsize=(6, 6))
        keys = {**TOKEN_SCORES, "p_error": "p_error"}
        _roc(
            ax,
            {n: tokens[k] for n, k in keys.items() if k in tokens},
            labels,
            results["auroc"],
            "Wrong calculator results (test): ROC",
        )
        files.append(_save(fig, out / "roc_tokens.png"))

    fig, ax = plt.subplots(figsize=(7, 5))
    e1, e2 = results, results["estimation_truth2"]

    def ranked(e: dict, n: str) -> bool:  # a constant ranks nothing: no bar
        v = e["spearman"].get(n)
        return v is not None and bool(np.isfinite(v))

    names = [n for n in dict.fromkeys([*e1["spearman"], *e2["spearman"]]) if ranked(e1, n) or ranked(e2, n)]
    y = np.arange(len(names))
    for off, e, label in ((-0.2, e1, "vs EU*"), (0.2, e2, "vs truth 2")):
        v = np.array(
            [np.nan if e["spearman"].get(n) is None else e["spearman"][n] for n in names], dtype=float
        )
        ci = np.array(
            [[np.nan if c is None else c for c in e["spearman_ci95"].get(n, [None, None])] for n in names],
            dtype=float,
        )
        err = np.nan_to_num(np.abs(np.stack([v - ci[:, 0], ci[:, 1] - v])))
        ax.barh(y + off, np.nan_to_num(v), height=0.4, xerr=err, label=label)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("Spearman with the ground truth (test result tokens), 95% CI by problem")
    ax.legend()
    files.append(_save(fig, out / "estimation.png"))

    rel = results["p_error"].get("test", {}).get("reliability")
    if rel:
        files.append(_reliability(plt, rel, results["p_error"]["test"]["ece"], out))
    r = a["responses"]
    if 0 < r["labels"].sum() < len(r["labels"]):
        fig, ax = plt.subplots(figsize=(6, 6))
        _roc(
            ax,
            r["scores"],
            r["labels"],
            results["response_level"]["auroc"],
            "Wrong arithmetic answers (test): ROC",
        )
        files.append(_save(fig, out / "roc_responses.png"))
    return files


def _reliability(plt, rel: list[dict], ece: float, out: Path) -> str:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    n = np.array([b["tokens"] for b in rel], dtype=float)
    ax.scatter(
        [b["mean_p_error"] for b in rel], [b["rate_wrong"] for b in rel], s=20 + 400 * n / n.max(), zorder=3
    )
    ax.plot([b["mean_p_error"] for b in rel], [b["rate_wrong"] for b in rel], lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean p_error in the bin")
    ax.set_ylabel("rate of wrong tokens")
    ax.set_title(f"p_error reliability (test, ECE {ece:.3f})")
    ax.legend()
    return _save(fig, out / "reliability.png")
