"""`epispec load --plot FILE.png`: the server's RSS over the run, the warm-up shaded, the slope of
each window after it written on the plot (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path


def rss_plot(report: dict, path: str | Path) -> Path:
    """Write the PNG of `report["memory"]` (`probe.memory_report`) to `path`; ValueError without
    samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem = report["memory"]
    if not mem.get("series"):
        raise ValueError("no RSS samples to plot (the server's memory could not be read)")
    t = [p[0] / 60 for p in mem["series"]]  # minutes
    rss = [p[1] for p in mem["series"]]  # MiB
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot(t, rss, lw=1, c="tab:blue", label="RSS of the server's process tree")
    ax.axvspan(0, mem["warmup_s"] / 60, color="grey", alpha=0.15, label="warm-up")
    for w in mem.get("windows", []):
        ax.annotate(
            f"{w['slope_mib_per_min']:+.2f}",
            ((w["from_s"] + w["to_s"]) / 120, w["mean_mib"]),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    cfg = report["config"]
    slope = mem.get("slope_mib_per_min")
    ax.set(
        xlabel="minutes",
        ylabel="MiB",
        title=f"epispec load: {cfg['concurrency']} clients, {cfg['duration_s'] / 60:.0f} min\n"
        f"slope after warm-up {'n/a' if slope is None else f'{slope:+.2f}'} MiB/min "
        "(numbers: each window's)",
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
