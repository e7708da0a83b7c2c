"""results.json (NaN written as null) and a Markdown report of an evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path


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
    return f"[{_f(ci[0])}, {_f(ci[1])}]" if ci else ""


def markdown(r: dict, command: str, plots: list[str]) -> str:
    lines = [f"# epispec evaluation ({r['recipe']['name']})", "", f"Command: `{command}`", "",
             f"Data: {r['data']['source']} — {r['data']['train_documents']} training documents, "
             f"{r['data']['validation_questions']} validation and {r['data']['test_questions']} test questions; "
             f"scored test tokens {r['data']['test_tokens']}. Ensemble N = {len(r['models']['ensemble'])}, "
             f"drafts M = {len(r['models']['draft_sets']['ours'])}; parameters target "
             f"{r['models']['parameters']['target']:,}, draft {r['models']['parameters']['draft']:,.0f}. "
             f"Wall time {r['seconds']['total']:.0f} s.", "",
             "## RMSE against EU* (deep-ensemble mutual information), all test tokens", "",
             "| method | RMSE | 95% CI | reference solutions | own generations |", "|---|---|---|---|---|"]
    for m, v in r["rmse"].items():
        cond = r["rmse_by_condition"]
        lines.append(f"| {m} | {_f(v, 4)} | {_ci(r['rmse_ci95'][m])} | "
                     f"{_f(cond.get('reference', {}).get(m), 4)} | {_f(cond.get('generated', {}).get(m), 4)} |")
    lines += ["", f"EU* mean {_f(r['eu_star']['mean'], 4)} (std {_f(r['eu_star']['std'], 4)}). "
              f"Reduction of ours vs the best other method ({r['best_baseline']}): "
              f"**{_f(100 * r['rmse_reduction_vs_best_baseline'], 1)}%**; vs the best perturbation baseline "
              f"({r['best_external_baseline']}): {_f(100 * r['rmse_reduction_vs_best_external_baseline'], 1)}%.", "",
              "## Hallucination detection: wrong calculator results (token level)", "",
              f"Labelled tokens {r['token_labels']['tokens']}, wrong {r['token_labels']['wrong']}.", "",
              "| score | AUROC | AUPRC | PRR | added target passes / token | added params / token | decode wall ratio |",
              "|---|---|---|---|---|---|---|"]
    comp = r["compute"]["per_score"]
    for s in r["auroc"]:
        c = comp[s]
        lines.append(f"| {s} | {_f(r['auroc'][s])} {_ci(r['auroc_ci95'][s])} | {_f(r['auprc'][s])} "
                     f"{_ci(r['auprc_ci95'][s])} | {_f(r['prr'][s])} {_ci(r['prr_ci95'][s])} | "
                     f"{c['target_passes']} | {_f(c['parameter_ratio'], 3)} | {_f(c['decode_wall_ratio'], 3)} |")
    rl = r["response_level"]
    lines += ["", f"Response level (final `####` answer; {rl['tokens']} answers, {rl['wrong']} wrong; "
              "score = mean over the solution's tokens):", "", "| score | AUROC | AUPRC | PRR |", "|---|---|---|---|"]
    for s in rl["auroc"]:
        lines.append(f"| {s} | {_f(rl['auroc'][s])} | {_f(rl['auprc'][s])} | {_f(rl['prr'][s])} |")
    t = r["tokur"]
    lines += ["", f"TokUR-style baseline: S = {t['samples']} low-rank (r = {t['rank']}) perturbations, σ = "
              f"{t['chosen_noise']} chosen by {t['rule']} among {t['noise_candidates']}.", "",
              "Compute: eu/bias/variance use the M drafts' passes, which speculative decoding runs anyway "
              "(0 extra target passes); the ratios above are what they would cost beside plain decoding.", "",
              "## Calibrated flag threshold", ""]
    c = r["calibration"]
    if "error" in c:
        lines.append(f"Not calibrated: {c['error']}")
    else:
        lines += [f"eu > {_f(c['threshold'], 4)} — {c['method']}.", "",
                  f"Test: precision {_f(c['test']['precision'])}, recall {_f(c['test']['recall'])}, "
                  f"false-positive rate {_f(c['test']['false_positive_rate'])} "
                  f"({c['test']['flagged']} of {c['test']['tokens']} tokens flagged)."]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"
