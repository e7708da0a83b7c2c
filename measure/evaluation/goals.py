"""Issue #14's goals, judged on the results of `epispec eval --bundle B` (`pretrained.py`): one row
per goal with the measured figure, the bound and whether it is met — the block of
docs/evaluation.md between `<!-- eval-bundle-goals:start -->` and `<!-- eval-bundle-goals:end -->`,
a function of results.json alone (`epispec eval --report DIR --readme docs/evaluation.md` writes
it; a test checks it).

Goals (test split; everything fitted was fitted on validation):
- RMSE against EU*: ours ≥ 37 % below the naive-draft baselines present (single_draft on a
  bundle; no_osd/no_ddd need drafts trained without OSD/DDD, which a bundle does not have), and
  not worse than the best baseline (TokUR, MC dropout where run, the trivial constants), for
  ours and for each validation-fitted correction;
- Spearman(ours, EU*) above TokUR's;
- token AUROC(eu) ≥ AUROC(TokUR) at ≤ 1/10 of TokUR's extra target passes;
- the served flag at the calibrated eu threshold: precision ≥ 0.5 at recall ≥ 0.3 on test.
"""

from __future__ import annotations

from pathlib import Path

from measure.evaluation.report import DOC, _ci, _f
from measure.readme_block import ReadmeBlock

BLOCK = ReadmeBlock("eval-bundle-goals")
NAIVE = ("no_osd", "no_ddd", "single_draft")


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "missed")


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    """(goal, measured, bound, met) for each goal, from a bundle evaluation's results."""
    rmse, sp, au = r["rmse"], r["spearman"], r.get("auroc") or {}
    out = []
    for naive in (n for n in NAIVE if rmse.get(n) is not None):
        red = 1 - rmse["ours"] / rmse[naive]
        out.append(
            (
                f"RMSE ours vs {naive}",
                f"{_f(rmse['ours'])} vs {_f(rmse[naive])}: {_pct(red)}",
                "≥ 37 % lower",
                _met(red >= 0.37),
            )
        )
    best = r["best_baseline"]
    for name, red in r["rmse_reduction_vs_best_baseline_by_variant"].items():
        out.append(
            (
                f"RMSE {name} vs the best baseline ({best})",
                f"{_f(rmse[name])} vs {_f(rmse[best])}: {_pct(red)}",
                "not worse (≥ 0 %)",
                _met(red is not None and red >= 0),
            )
        )
    ci = r.get("spearman_ci95", {})
    out.append(
        (
            "Spearman with EU*: ours vs TokUR",
            f"{_f(sp['ours'])} {_ci(ci.get('ours'))} vs {_f(sp['tokur'])} {_ci(ci.get('tokur'))}",
            "above TokUR's",
            _met(_gt(sp["ours"], sp["tokur"])),
        )
    )
    if au:
        passes = r["compute"]["per_score"]
        ours_p, tokur_p = passes["eu"]["target_passes"], passes["tokur"]["target_passes"]
        aci = r.get("auroc_ci95", {})
        out.append(
            (
                "token AUROC: eu vs TokUR",
                f"{_f(au['eu'])} {_ci(aci.get('eu'))} vs {_f(au['tokur'])} {_ci(aci.get('tokur'))}; "
                f"extra target passes {ours_p:g} vs {tokur_p:g}",
                "≥ TokUR's at ≤ 1/10 its passes",
                _met(_gt(au["eu"], au["tokur"], strict=False) and ours_p <= tokur_p / 10),
            )
        )
    c = r.get("calibration") or {}
    if "test" in c:
        t = c["test"]
        out.append(
            (
                f"flag at eu > {_f(c['threshold'])} nats (validation threshold)",
                f"precision {_f(t['precision'])}, recall {_f(t['recall'])} ({t['flagged']} of {t['tokens']})",
                "precision ≥ 0.5 at recall ≥ 0.3",
                _met(t["precision"] is not None and t["precision"] >= 0.5 and t["recall"] >= 0.3),
            )
        )
    return out


def _pct(fraction) -> str:
    """A reduction (1 − new/old) as a signed percentage."""
    return "n/a" if fraction is None else f"{100 * fraction:+,.1f} %"


def _gt(a, b, strict: bool = True) -> bool | None:
    if a is None or b is None:
        return None
    return a > b if strict else a >= b


def readme_block(r: dict, source: str) -> str:
    """The goal table (docs/evaluation.md) for the bundle evaluation at `source` (its results.json path)."""
    comment = (
        f"<!-- generated from {source} by `epispec eval --report {Path(source).parent} --readme "
        f"{DOC}`; edit measure/evaluation/goals.py, not this block -->"
    )
    title = f"Issue #14's goals, `{r['command']}` ({r['seconds']['total']:.0f} s):"
    return table_block(BLOCK, comment, title, rows(r))


def table_block(
    block: ReadmeBlock, comment: str, title: str, goal_rows: list[tuple[str, str, str, str]]
) -> str:
    """A generated goal table: markers, the generating comment, a title, one row per goal."""
    lines = [
        block.start,
        comment,
        "",
        title,
        "",
        "| goal | measured (test) | bound | |",
        "|---|---|---|---|",
        *(f"| {g} | {m} | {b} | {ok} |" for g, m, b, ok in goal_rows),
        block.end,
    ]
    return "\n".join(lines) + "\n"
