"""results.json (NaN written as null) and the Markdown made from it: DIR/report.md, and the block
of tables that docs/evaluation.md carries between `<!-- eval-table:start -->` and
`<!-- eval-table:end -->`.

Both are functions of results.json alone, so `epispec eval --report DIR [--readme
docs/evaluation.md]` regenerates them from a finished run (and a test checks that the block is
current).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from measure.readme_block import ReadmeBlock


def clean(x):
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, list | tuple):
        return [clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item"):  # numpy scalars
        return clean(x.item())
    return x


def write_json(results: dict, path: Path) -> Path:
    path.write_text(json.dumps(clean(results), indent=2) + "\n")
    return path


def _f(x, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _ci(ci) -> str:
    return f"[{_f(ci[0])}, {_f(ci[1])}]" if ci and any(_f(c) != "n/a" for c in ci) else ""


def _vci(x, ci) -> str:
    """A value and its CI, or the value alone when the CI is undefined."""
    return f"{_f(x)} {_ci(ci)}".rstrip()


def _g(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3g}"


BLOCK = ReadmeBlock("eval-table")
START, END = BLOCK.start, BLOCK.end
DOC = "docs/evaluation.md"  # the file that carries the committed results' blocks (this and goals.py's)


def estimation_table(r: dict) -> list[str]:
    """Every method against EU*, test tokens (reference solutions and own generations)."""
    lines = [
        "| method | RMSE [95% CI] | top-decile RMSE [95% CI] | Spearman [95% CI] | Pearson [95% CI] "
        "| slope | intercept |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in r["rmse"]:
        cells = [_vci(r[k][m], r[f"{k}_ci95"][m]) for k in ("rmse", "rmse_top_decile", "spearman", "pearson")]
        lines.append(
            f"| {m} | {' | '.join(cells)} | {_g(r['scale_slope'][m])} | {_g(r['scale_intercept'][m])} |"
        )
    return lines


def estimation_notes(r: dict) -> list[str]:
    red = r["rmse_reduction_vs_best_baseline_by_variant"]
    gap = r["spearman_gap_vs_ours"]
    cb = r["constant_baselines"]["constant_val_mean"]
    corr = "; ".join(
        f"`{m}` ({c['kind']}) "
        + ", ".join(f"{k} = {_g(v)}" for k, v in c["params"].items())
        + f" (validation RMSE {_f(c['validation_rmse']['before'])} → {_f(c['validation_rmse']['after'])})"
        for m, c in r["corrections"].items()
    )
    return [
        f"EU* on these tokens: mean {_f(r['eu_star']['mean'], 4)}, std {_f(r['eu_star']['std'], 4)}, top decile "
        f"≥ {_f(r['eu_star']['top_decile_threshold'], 4)}. slope/intercept: least squares EU* ≈ slope · estimate "
        "+ intercept (1 and 0 for a calibrated scale; n/a for a constant, which ranks nothing).",
        "",
        f"RMSE reduction vs the best baseline ({r['best_baseline']}; every method but ours and its corrections, "
        "the constants included): " + ", ".join(f"{v} **{_f(100 * x, 1)}%**" for v, x in red.items()) + ".",
        "",
        "Spearman(ours) − Spearman(method), paired bootstrap 95% CI: "
        + ", ".join(f"{m} {_vci(g['value'], g['ci95'])}" for m, g in gap.items() if _f(g["value"]) != "n/a")
        + " (undefined for the constants).",
        "",
        f"Fitted on validation ({cb['validation_tokens']} tokens) only, applied to test: `constant_val_mean` = "
        f"{_f(cb['value'], 4)}; {corr}.",
    ]


def detection_table(r: dict, compute: bool = True) -> list[str]:
    head = "| score | AUROC [95% CI] | AUPRC [95% CI] | PRR [95% CI] |"
    lines = [
        head
        + (" added target passes / token | added params / token | decode wall ratio |" if compute else ""),
        "|---|---|---|---|" + ("---|---|---|" if compute else ""),
    ]
    for s in r["auroc"]:
        row = (
            "| "
            + " | ".join([s] + [_vci(r[k][s], r[f"{k}_ci95"][s]) for k in ("auroc", "auprc", "prr")])
            + " |"
        )
        if compute:
            c = r["compute"]["per_score"][s]
            row += (
                f" {c['target_passes']} | {_f(c['parameter_ratio'], 3)} | {_f(c['decode_wall_ratio'], 3)} |"
            )
        lines.append(row)
    return lines


def readme_block(r: dict, source: str) -> str:
    """The eval-table block (docs/evaluation.md) for the results at `source` (a results.json path,
    as written in the block)."""
    d, tl = r["data"], r["token_labels"]
    lines = [
        START,
        f"<!-- generated from {source} by `epispec eval --report {Path(source).parent} --readme "
        f"{DOC}`; edit the code in measure/evaluation/report.py, not this block -->",
        "",
        f"`{r['command']}` — {d['source']} data, {sum(d['test_tokens'].values()):,} test tokens "
        f"({d['test_questions']} questions), {sum(d['validation_tokens'].values()):,} validation tokens "
        f"({d['validation_questions']} questions); {r['seconds']['total']:.0f} s wall.",
        "",
    ]
    lines += estimation_table(r) + [""] + estimation_notes(r) + [""]
    lines += [
        f"Hallucination detection, token level ({tl['tokens']} labelled calculator-result tokens, "
        f"{tl['wrong']} wrong; a constant score has AUROC 0.5, AUPRC {_f(tl['base_rate'])}, PRR 0):",
        "",
    ]
    lines += detection_table(r, compute=False) + ["", END]
    return "\n".join(lines) + "\n"


def splice(text: str, block: str) -> str:
    """`text` with its eval-table block (markers included) replaced by `block`."""
    return BLOCK.splice(text, block)


def current_block(text: str) -> str:
    return BLOCK.current(text)


def markdown(r: dict, command: str, plots: list[str]) -> str:
    lines = [
        f"# epispec evaluation ({r['recipe']['name']})",
        "",
        f"Command: `{command}`",
        "",
        f"Data: {r['data']['source']} — {r['data']['train_documents']} training documents, "
        f"{r['data']['validation_questions']} validation and {r['data']['test_questions']} test questions; "
        f"scored test tokens {r['data']['test_tokens']}. Ensemble N = {len(r['models']['ensemble'])}, "
        f"drafts M = {len(r['models']['draft_sets']['ours'])}; parameters target "
        f"{r['models']['parameters']['target']:,}, draft {r['models']['parameters']['draft']:,.0f}. "
        f"Wall time {r['seconds']['total']:.0f} s.",
        "",
        "## Estimates of EU* (deep-ensemble mutual information), all test tokens",
        "",
    ]
    lines += (
        estimation_table(r)
        + [""]
        + estimation_notes(r)
        + [
            "",
            "RMSE by condition:",
            "",
            "| method | reference solutions | own generations |",
            "|---|---|---|",
        ]
    )
    cond = r["rmse_by_condition"]
    for m in r["rmse"]:
        lines.append(
            f"| {m} | {_f(cond.get('reference', {}).get(m), 4)} | {_f(cond.get('generated', {}).get(m), 4)} |"
        )
    lines += [
        "",
        f"Vs the best perturbation baseline ({r['best_external_baseline']}): "
        f"{_f(100 * r['rmse_reduction_vs_best_external_baseline'], 1)}%.",
        "",
        "## Hallucination detection: wrong calculator results (token level)",
        "",
        f"Labelled tokens {r['token_labels']['tokens']}, wrong {r['token_labels']['wrong']}.",
        "",
    ]
    lines += detection_table(r)
    rl = r["response_level"]
    lines += [
        "",
        f"Response level (final `####` answer; {rl['tokens']} answers, {rl['wrong']} wrong; "
        "score = mean over the solution's tokens):",
        "",
        "| score | AUROC | AUPRC | PRR |",
        "|---|---|---|---|",
    ]
    for s in rl["auroc"]:
        lines.append(f"| {s} | {_f(rl['auroc'][s])} | {_f(rl['auprc'][s])} | {_f(rl['prr'][s])} |")
    t = r["tokur"]
    lines += [
        "",
        f"TokUR-style baseline: S = {t['samples']} low-rank (r = {t['rank']}) perturbations, σ = "
        f"{t['chosen_noise']} chosen by {t['rule']} among {t['noise_candidates']}.",
        "",
        "Compute: eu/bias/variance use the M drafts' passes, which speculative decoding runs anyway "
        "(0 extra target passes); the ratios above are what they would cost beside plain decoding.",
        "",
        "## Calibrated flag threshold",
        "",
    ]
    c = r["calibration"]
    if "error" in c:
        lines.append(f"Not calibrated: {c['error']}")
    else:
        lines += [
            f"eu > {_f(c['threshold'], 4)} — {c['method']}.",
            "",
            f"Test: precision {_f(c['test']['precision'])}, recall {_f(c['test']['recall'])}, "
            f"false-positive rate {_f(c['test']['false_positive_rate'])} "
            f"({c['test']['flagged']} of {c['test']['tokens']} tokens flagged).",
        ]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def bundle_markdown(r: dict) -> str:
    """report.md of `epispec eval --bundle B` (`pretrained.py`'s results)."""
    d, g, tl = r["data"], r["ground_truth"], r["token_labels"]
    lines = [
        f"# epispec evaluation of a bundle ({r['recipe']['name']})",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Bundle `{r['models']['bundle']}`: target {r['models']['parameters']['target']:,} parameters"
        f"{' (chat prompts)' if r['models']['chat'] else ''}, {len(r['models']['drafts'])} drafts of "
        f"{r['models']['parameters']['draft']:,.0f}. Data: {d['source']} — {d['split_rule']}: "
        f"{d['validation_questions']} validation and {d['test_questions']} test questions. "
        f"Wall time {r['seconds']['total']:.0f} s.",
        "",
        f"EU* = mutual information of the target's posterior over S = {g['samples']} instances (low-rank "
        f"r = {g['rank']} noise σ = {g['noise']} in the last K = {g['layers']} layers; seeds "
        f"[{g['seeds'][0]}, {g['seeds'][1]}), disjoint from every OSD training draw): "
        f"{_f(g['target_passes_per_token'], 2)} target passes per token ({g['rule']}).",
        "",
        f"## Estimates of EU*: {d['test_tokens']} test tokens (reference solutions, forced results)",
        "",
    ]
    lines += estimation_table(r) + [""] + estimation_notes(r)
    lines += ["", "## Hallucination detection: the target's results after `<<expr=` (token level)", ""]
    if r["auroc"]:
        lines += [
            f"{tl['tokens']} labelled tokens ({tl['wrong']} wrong) of {tl['results']} results "
            f"({tl['results_wrong']} wrong); a constant score has AUROC 0.5, AUPRC {_f(tl['base_rate'])}.",
            "",
        ]
        lines += detection_table(r)
    else:
        lines.append("No labelled tokens.")
    rl = r["response_level"]
    lines += ["", f"Response level ({rl['responses']} responses; {rl['aggregation']}):", ""]
    if rl.get("auroc"):
        lines += ["| score | AUROC [95% CI] | AUPRC [95% CI] |", "|---|---|---|"]
        for s in rl["auroc"]:
            lines.append(
                f"| {s} | {_vci(rl['auroc'][s], rl['auroc_ci95'][s])} | {_vci(rl['auprc'][s], rl['auprc_ci95'][s])} |"
            )
    lines += ["", "## p_wrong (validation fit, scored on test)", ""] + _p_wrong_lines(r["p_wrong"])
    c = r["calibration"]
    lines += ["", "## Calibrated flag threshold", ""]
    if "error" in c:
        lines.append(f"Not calibrated: {c['error']}")
    else:
        lines.append(
            f"eu > {_f(c['threshold'], 4)} — {c['method']}. Test: precision {_f(c['test']['precision'])}, "
            f"recall {_f(c['test']['recall'])} ({c['test']['flagged']} of {c['test']['tokens']} flagged)."
        )
    t = r["tokur"]
    lines += [
        "",
        f"TokUR: S = {t['samples']}, σ = {t['noise']} (fixed by the recipe), rank {t['rank']}, every layer.",
    ]
    return "\n".join(lines) + "\n"


def _p_wrong_lines(pw: dict) -> list[str]:
    if "error" in pw:
        return [f"No fit: {pw['error']}."]
    fo = pw["fitted_on"]
    lines = [
        f"{fo['method']}: coef {pw['features']} = {[_g(c) for c in pw['coef']]}, intercept {_g(pw['intercept'])}.",
        "",
        "| split | responses | wrong | Brier | Brier of the base rate | log loss | AUROC |",
        "|---|---|---|---|---|---|---|",
    ]
    for split in ("validation", "test"):
        s = fo.get(split, {})
        lines.append(
            f"| {split} | {s.get('responses', 0)} | {s.get('wrong', 'n/a')} | {_f(s.get('brier'))} | "
            f"{_f(s.get('brier_constant_base_rate'))} | {_f(s.get('log_loss'))} | {_f(s.get('auroc'))} |"
        )
    return lines
