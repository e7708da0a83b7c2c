"""report.md and the generated doc blocks of `epispec eval --bundle B` at scale (`pretrained.py`),
functions of results.json alone (`epispec eval --report DIR --readme PATH` regenerates them):

    <!-- eval-scale-tables:start --> … <!-- eval-scale-tables:end -->   counts, estimation against
        both ground truths side by side, token detection with compute, responses, p_error
    <!-- eval-scale-goals:start --> … <!-- eval-scale-goals:end -->     issue #24's goals, met or
        missed with numbers

Goals (test; everything fitted was fitted on validation):
- token AUROC CI half-width ≤ 0.05 for every score;
- the served flag (p_error > its threshold): precision ≥ 0.5 at recall ≥ 0.3, and p_error's AUROC
  ≥ the best single signal's among those that cost no extra target pass (eu, bias, variance,
  entropy, 1 − max p, −log p);
- p_wrong's Brier score below the validation base rate's on the response set.
"""

from __future__ import annotations

from pathlib import Path

from measure.evaluation.goals import table_block
from measure.evaluation.report import _f, _g, _vci
from measure.readme_block import ReadmeBlock

TABLES = ReadmeBlock("eval-scale-tables")
GOALS = ReadmeBlock("eval-scale-goals")
CHEAP = ("eu", "bias", "variance", "entropy", "max_prob", "nll")


def is_scale_results(r: dict) -> bool:
    return "estimation_truth2" in r


def _half(ci) -> float | None:
    return None if not ci or ci[0] is None or ci[1] is None else (ci[1] - ci[0]) / 2


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "missed")


def goal_rows(r: dict) -> list[tuple[str, str, str, str]]:
    out = []
    halves = {s: _half(ci) for s, ci in (r.get("auroc_ci95") or {}).items()}
    known = {s: h for s, h in halves.items() if h is not None}
    if known:
        worst = max(known, key=known.get)
        out.append(
            (
                "token AUROC CI half-width, every score",
                f"largest {_f(known[worst])} ({worst}); eu {_f(known.get('eu'))}, "
                f"{r['token_labels']['tokens']} tokens of {r['token_labels']['problems']} problems",
                "≤ 0.05",
                _met(known[worst] <= 0.05),
            )
        )
    pe = r.get("p_error", {}).get("test")
    if pe:
        prec, rec = pe["precision"], pe["recall"]
        ok = prec is not None and rec is not None and prec >= 0.5 and rec >= 0.3
        out.append(
            (
                f"flag p_error > {_f(pe['threshold'], 2)}: precision at recall",
                f"precision {_vci(prec, pe['precision_ci95'])}, recall {_vci(rec, pe['recall_ci95'])} "
                f"({pe['flagged']} of {pe['tokens']} flagged)",
                "precision ≥ 0.5 at recall ≥ 0.3",
                _met(ok),
            )
        )
        au = r.get("auroc") or {}
        singles = {s: au[s] for s in CHEAP if au.get(s) is not None}
        if singles and au.get("p_error") is not None:
            best = max(singles, key=singles.get)
            out.append(
                (
                    "p_error AUROC vs the best single signal",
                    f"{_vci(au['p_error'], r['auroc_ci95'].get('p_error'))} vs {best} "
                    f"{_vci(singles[best], r['auroc_ci95'].get(best))}",
                    "≥ the best single signal's",
                    _met(au["p_error"] >= singles[best]),
                )
            )
    test = (r.get("p_wrong", {}).get("fitted_on") or {}).get("test") or {}
    if "brier" in test:
        out.append(
            (
                "p_wrong Brier on the response set",
                f"{_f(test['brier'])} vs {_f(test['brier_constant_base_rate'])} for the base rate "
                f"({test['responses']} answers, {test['wrong']} wrong)",
                "below the base rate's",
                _met(test["brier"] < test["brier_constant_base_rate"]),
            )
        )
    return out


def goals_block(r: dict, source: str) -> str:
    comment = (
        f"<!-- generated from {source} by `epispec eval --report {Path(source).parent} --readme PATH`; "
        "edit measure/evaluation/scale_report.py, not this block -->"
    )
    title = f"Issue #24's goals, `{r['command']}` ({r['seconds']['total']:.0f} s):"
    return table_block(GOALS, comment, title, goal_rows(r))


def counts_lines(r: dict) -> list[str]:
    d, rl = r["data"], r["response_level"]
    te, va = d["test"], d["validation"]
    return [
        f"Test: {te['problems']} GSM8K test problems ({te['problems_with_results']} with results), {te['results']} "
        f"results ({te['results_wrong']} wrong), {te['tokens']} labelled tokens ({te['wrong']} wrong, error rate "
        f"{_f(te['error_rate'])}), {te['scored_tokens']} scored tokens; {_f(te['seconds_per_problem'], 1)} s per problem. "
        f"Validation: {va['problems']} GSM8K train problems, {va['tokens']} labelled tokens ({va['wrong']} wrong). "
        f"Responses: {rl['responses']} test answers ({rl['wrong']} wrong, error rate {_f(rl['error_rate'])}), "
        f"{rl['validation']['responses']} validation ({rl['validation']['wrong']} wrong). "
        f"Wall time {r['seconds']['total']:.0f} s.",
    ]


def estimation_table(r: dict) -> list[str]:
    """Every method against both ground truths, side by side (CIs by problem)."""
    e2 = r["estimation_truth2"]
    methods = [m for m in dict.fromkeys([*r["spearman"], *e2["spearman"]])]
    lines = [
        "| method | Spearman vs EU* | Spearman vs truth 2 | Pearson vs EU* | Pearson vs truth 2 | RMSE vs EU* |",
        "|---|---|---|---|---|---|",
    ]
    for m in methods:
        cells = [
            _vci(r["spearman"].get(m), r["spearman_ci95"].get(m)) if m in r["spearman"] else "(truth)",
            _vci(e2["spearman"].get(m), e2["spearman_ci95"].get(m)) if m in e2["spearman"] else "(truth)",
            _vci(r["pearson"].get(m), r["pearson_ci95"].get(m)) if m in r["pearson"] else "(truth)",
            _vci(e2["pearson"].get(m), e2["pearson_ci95"].get(m)) if m in e2["pearson"] else "(truth)",
            _vci(r["rmse"].get(m), r["rmse_ci95"].get(m)) if m in r["rmse"] else "(truth)",
        ]
        lines.append(f"| {m} | {' | '.join(cells)} |")
    return lines


def detection_table(r: dict) -> list[str]:
    lines = [
        "| score | AUROC [95% CI] | AUPRC [95% CI] | PRR [95% CI] | extra target passes / token | wall ratio |",
        "|---|---|---|---|---|---|",
    ]
    comp = r["compute"]["per_score"]
    for s in r["auroc"]:
        c = comp.get(s, {})
        cells = [_vci(r[k][s], r[f"{k}_ci95"][s]) for k in ("auroc", "auprc", "prr")]
        lines.append(
            f"| {s} | {' | '.join(cells)} | {_g(c.get('target_passes'))} | {_f(c.get('decode_wall_ratio'), 2)} |"
        )
    return lines


def response_table(r: dict) -> list[str]:
    rl = r["response_level"]
    if not rl.get("auroc"):
        return ["No response-level detection (one class, or no answers)."]
    lines = ["| response score | AUROC [95% CI] | AUPRC [95% CI] | PRR [95% CI] |", "|---|---|---|---|"]
    for s in rl["auroc"]:
        lines.append(
            f"| {s} | "
            + " | ".join(_vci(rl[k][s], rl[f"{k}_ci95"][s]) for k in ("auroc", "auprc", "prr"))
            + " |"
        )
    return lines


def p_error_lines(r: dict) -> list[str]:
    pe = r["p_error"]
    if "error" in pe:
        return [f"No p_error fit: {pe['error']}."]
    t = pe["test"]
    coef = ", ".join(f"{f} {_g(c)}" for f, c in zip(pe["features"], pe["coef"], strict=True))
    return [
        f"p_error = logistic({_g(pe['intercept'])} + {coef}), fitted on {pe['fitted_on']['tokens']} validation tokens; "
        f"test: AUROC {_vci(t['auroc'], t['auroc_ci95'])}, at p_error > {_f(t['threshold'], 2)} precision "
        f"{_vci(t['precision'], t['precision_ci95'])}, recall {_vci(t['recall'], t['recall_ci95'])}; Brier "
        f"{_f(t['brier'])} (base rate {_f(t['brier_constant_base_rate'])}), ECE {_f(t['ece'])}.",
    ]


def tables_block(r: dict, source: str) -> str:
    g, g2, ub = r["ground_truth"], r["truth2"], r["upper_bound"]
    lines = [
        TABLES.start,
        f"<!-- generated from {source} by `epispec eval --report {Path(source).parent} --readme PATH`; "
        "edit measure/evaluation/scale_report.py, not this block -->",
        "",
        f"`{r['command']}`",
        "",
        *counts_lines(r),
        "",
        f"Ground truths: EU* = MI of S = {g['samples']} instances, low-rank r = {g['rank']}, σ = {g['noise']} "
        f"in the last {g['layers']} layers (the drafts' OSD family); truth 2 = MI of S = {g2['samples']} "
        f"instances, r = {g2['rank']}, σ = {g2['noise']} on the attention projections of every layer (no draft "
        f"is distilled from it). Upper bound: M = {ub['samples']} instances of EU*'s family, other seeds, "
        f"{_f(ub['target_passes_per_token'], 2)} extra target passes per token. CIs: bootstrap over problems.",
        "",
        *estimation_table(r),
        "",
        f"Token detection ({r['token_labels']['tokens']} labelled result tokens, {r['token_labels']['wrong']} wrong):",
        "",
        *detection_table(r),
        "",
        f"Responses ({r['response_level']['responses']} arithmetic answers, {r['response_level']['wrong']} wrong):",
        "",
        *response_table(r),
        "",
        *p_error_lines(r),
        TABLES.end,
    ]
    return "\n".join(lines) + "\n"


def markdown(r: dict, plots: list[str]) -> str:
    """report.md of a scale run: the two blocks' content, p_wrong, calibration, plots."""
    from measure.evaluation.report import _p_wrong_lines

    c = r["calibration"]
    lines = [
        f"# epispec evaluation of a bundle at scale ({r['recipe']['name']})",
        "",
        tables_block(r, "results.json"),
        goals_block(r, "results.json"),
        "## p_wrong (validation answers, scored on test answers)",
        "",
        *_p_wrong_lines(r["p_wrong"]),
        "",
        "## Response error rate by level",
        "",
        "| level | answers | wrong |",
        "|---|---|---|",
        *(f"| {lv} | {v['responses']} | {v['wrong']} |" for lv, v in r["response_level"]["by_level"].items()),
        "",
        "## eu threshold (thresholds.eu)",
        "",
        c.get("error")
        or f"eu > {_f(c['threshold'], 4)} — {c['method']}. Test: precision {_f(c['test']['precision'])}, "
        f"recall {_f(c['test']['recall'])} ({c['test']['flagged']} of {c['test']['tokens']} flagged).",
        "",
        "## Seconds",
        "",
        ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items())
        + "; by score (all splits): "
        + ", ".join(f"{k} {v:.0f}" for k, v in r["compute"].get("seconds", {}).items())
        + "; per scored token: "
        + ", ".join(f"{k} {v:.4f}" for k, v in r["compute"]["seconds_per_scored_token"].items()),
        "",
        "## Plots",
        "",
        *(f"![{p}]({p})" for p in plots),
    ]
    return "\n".join(lines) + "\n"
