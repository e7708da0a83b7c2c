"""The README's status box: what the default bundle measures today, generated from the two
committed results files — its benchmark (`epispec bench --json`, docs/bench-smollm2.json), its
evaluation (`epispec eval --bundle`, docs/eval-scale/results.json) and its served check (`epispec
eval --served`, docs/eval-served/smollm2/results.json) — between `<!-- status:start -->`
and `<!-- status:end -->` in README.md.

    python -m measure.status [--bench FILE] [--eval DIR] [--served FILE] [--readme README.md]

prints the block and, with `--readme`, splices it in; tests/measure/test_status.py fails when the
README's block differs from it. The figures are the results files'; the rows say what they mean.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from measure.evaluation.report import _ci, _f
from measure.readme_block import ReadmeBlock

BLOCK = ReadmeBlock("status")
BENCH = "docs/bench-smollm2.json"
EVAL = "docs/eval-scale/results.json"
SERVED = "docs/eval-served/smollm2/results.json"
README = "README.md"


def _runs(doc: dict, config: str) -> dict[int, dict]:
    """A config's greedy (T = 0) runs by concurrency."""
    return {r["concurrency"]: r for r in doc["runs"] if r["config"] == config and not r.get("temperature")}


def _span(lo: float, hi: float, fmt: str) -> str:
    """`lo–hi`, or one figure when they print the same."""
    a, b = format(lo, fmt), format(hi, fmt)
    return a if a == b else f"{a}–{b}"


def _proposed(runs: dict[int, dict], levels: list[int]) -> str:
    """`; tokens proposed per request and step …` where the bench recorded it (adaptive speculation)."""
    got = [runs[c].get("proposed_per_row_step") for c in levels]
    if any(v is None for v in got):
        return ""
    return "; tokens proposed per request and step " + ", ".join(f"{v:.2f}" for v in got) + " (adaptive)"


def serving_rows(doc: dict) -> list[tuple[str, str]]:
    """(what, measured) from a bench JSON: the cost of the uncertainty against plain vLLM."""
    ours, plain = _runs(doc, "epispec"), _runs(doc, "vllm-target-alone")
    levels = sorted(set(ours) & set(plain))
    need = [g["value"] for g in doc["goals"] if g["goal"].startswith("epispec draft passes / speculation")]
    e = doc["eu_error"]
    ratio = ", ".join(
        f"{ours[c]['output_tokens_per_s'] / plain[c]['output_tokens_per_s']:.2f}× at C = {c}" for c in levels
    )
    rss = [ours[c]["peak_rss_bytes"] / plain[c]["peak_rss_bytes"] for c in levels]
    mib = [ours[c]["peak_rss_bytes"] / (1 << 20) for c in levels]
    acceptance = [ours[c]["acceptance_rate"] for c in levels]
    k = doc["workload"]["num_speculative_tokens"]
    return [
        (
            "extra forward passes for the uncertainty",
            f"none: draft passes per token / what speculation needs = {_span(min(need), max(need), '.3f')}"
            if need
            else "n/a",
        ),
        (
            "served eu against exact values (teacher-forced)",
            f"median error {e['median_abs']:.1e} nats, p95 {e['p95_abs']:.1e} "
            f"({e['tokens']} tokens, median eu {e['median_exact_eu']:.2f} nats)",
        ),
        (
            "output tokens/s against plain vLLM, same target",
            f"{ratio} (acceptance {_span(min(acceptance), max(acceptance), '.2f')} at k = {k}{_proposed(ours, levels)})",
        ),
        (
            "peak RSS against plain vLLM",
            f"{_span(min(rss), max(rss), '.2f')}× ({_span(min(mib), max(mib), ',.0f')} MiB)",
        ),
    ]


def quality_rows(r: dict) -> list[tuple[str, str]]:
    """(what, measured) from a bundle evaluation's results.json: does eu find the errors?"""
    au, ci, t = r["auroc"], r["auroc_ci95"], r["token_labels"]
    below = ": it ranks wrong results *below* right ones" if au["eu"] < 0.5 else ""
    c = r["calibration"]
    test = c["test"]
    return [
        (
            f"eu as an error detector: token AUROC on {t['tokens']} calculator-result tokens "
            f"({t['wrong']} wrong; 0.5 = chance)",
            f"eu **{_f(au['eu'])}** {_ci(ci['eu'])}{below}; entropy {_f(au['entropy'])}, "
            f"TokUR {_f(au['tokur'])}",
        ),
        *_p_error_rows(r),
        (
            f"eu alone as the flag (eu > {_f(c['threshold'])} nats, validation false-positive rate 0.1)",
            f"precision **{_f(test['precision'])}**, recall **{_f(test['recall'])}** "
            f"({test['flagged']} of {test['tokens']} tokens flagged)",
        ),
        (
            f"eu against the ground truth EU* (mean {_f(r['eu_star']['mean'])} nats)",
            f"RMSE {_f(r['rmse']['ours'])} (the validation mean as a constant: "
            f"{_f(r['rmse']['constant_val_mean'])}); "
            f"Spearman {_f(r['spearman']['ours'])} (TokUR {_f(r['spearman']['tokur'])})",
        ),
    ]


def _p_error_rows(r: dict) -> list[tuple[str, str]]:
    """The served flag, p_error > threshold, where the evaluation fitted p_error."""
    pe = (r.get("p_error") or {}).get("test")
    if not pe:
        return []
    return [
        (
            f"the served flag: p_error > {_f(pe['threshold'])} (a logistic fit of eu, bias, variance "
            f"and the target's log-prob on validation tokens)",
            f"AUROC **{_f(pe['auroc'])}** {_ci(pe['auroc_ci95'])}; precision **{_f(pe['precision'])}**, "
            f"recall **{_f(pe['recall'])}** ({pe['flagged']} of {pe['tokens']} flagged; "
            f"base rate {_f(r['token_labels']['base_rate'])}: flagging every token gives that precision)",
        )
    ]


def served_rows(sv: dict) -> list[tuple[str, str]]:
    """(what, measured) from `epispec eval --served` results: the black-box check."""
    au, ci = sv["auroc"], sv["auroc_ci95"]
    below = ": it ranks wrong answers *below* right ones" if au["mean_eu"] < 0.5 else ""
    kinds = " and ".join(sv["by_kind"])
    return [
        (
            f"served, black box: a response's mean eu as a detector of wrong answers ({sv['responses']} "
            f"{kinds} questions through the chat endpoint at T = 0, {sv['wrong']} wrong)",
            f"AUROC **{_f(au['mean_eu'])}** {_ci(ci['mean_eu'])}{below}; the target's own mean "
            f"negative log-prob {_f(au['mean_nll'])} {_ci(ci['mean_nll'])}",
        )
    ]


def block(
    doc: dict,
    bench_source: str,
    r: dict,
    eval_source: str,
    served: dict | None = None,
    served_source: str | None = None,
) -> str:
    """The status block for a bench JSON, a bundle evaluation's results.json and, optionally, a
    served check's results.json (paths as written)."""
    m, models = doc["machine"], doc["models"]
    drafts = models.get("draft_parameters") or [0]
    rows = [
        (w, v, "" if i else "[benchmark](docs/benchmark.md)") for i, (w, v) in enumerate(serving_rows(doc))
    ]
    rows += [
        (w, v, "" if i else "[evaluation](docs/evaluation-at-scale.md)")
        for i, (w, v) in enumerate(quality_rows(r))
    ]
    if served is not None:
        rows += [(w, v, "[served check](docs/evaluation-at-scale.md)") for w, v in served_rows(served)]
    sources = (
        f"{bench_source} and {eval_source}"
        if served is None
        else f"{bench_source}, {eval_source} and {served_source}"
    )
    lines = [
        BLOCK.start,
        f"<!-- generated from {sources} by `python -m measure.status --readme "
        f"{README}`; edit measure/status.py, not this block -->",
        "",
        f"The default bundle ({models.get('target_name')}, {models.get('target_parameters', 0):,} "
        f"parameters, and {len(drafts)} drafts of {drafts[0]:,}) on {m['cpu']}, {m['cores']} CPU cores:",
        "",
        "| | measured | |",
        "|---|---|---|",
        *(f"| {w} | {v} | {d} |" for w, v, d in rows),
        "",
        f"From `{doc['command']}` ({doc.get('wall_s', 0):.0f} s), `{r['command']}` "
        f"({r['seconds']['total']:.0f} s)"
        + ("." if served is None else f" and `{served['command']}` ({served['seconds']:.0f} s)."),
        BLOCK.end,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m measure.status", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", default=BENCH, metavar="FILE", help=f"a bench JSON (default {BENCH})")
    ap.add_argument(
        "--eval", default=str(Path(EVAL).parent), metavar="DIR", help="a bundle evaluation's folder"
    )
    ap.add_argument(
        "--served", default=SERVED, metavar="FILE", help=f"a served check's results.json (default {SERVED})"
    )
    ap.add_argument("--readme", metavar="FILE", help="replace FILE's status block (README.md)")
    args = ap.parse_args(argv)
    eval_source = str(Path(args.eval) / "results.json")
    try:
        doc, r = json.loads(Path(args.bench).read_text()), json.loads(Path(eval_source).read_text())
        sv = json.loads(Path(args.served).read_text())
    except (OSError, ValueError) as exc:
        print(f"measure.status: {exc}", file=sys.stderr)
        return 2
    text = block(doc, args.bench, r, eval_source, sv, args.served)
    if args.readme:
        try:
            BLOCK.write_into(args.readme, text)
        except (OSError, ValueError) as exc:
            print(f"measure.status: --readme {args.readme}: {exc}", file=sys.stderr)
            return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
