"""`epispec eval --served [URL] --out DIR`: the black-box check of a served bundle. Short questions
with known answers (`served_questions.py`) go through the chat endpoint of a running server (or
one it spawns) with the `openai` client at temperature 0, exactly as a user's client would; each
response's uncertainty is what the server streamed. Does a response's mean eu rank wrong answers
above right ones, and how does it compare with the target's own mean negative log-prob?

Writes DIR/results.json, DIR/report.md and DIR/roc_served.png. The goal (issue 30): AUROC(mean eu)
≥ 0.6 and within 0.05 of AUROC(mean nll). CIs: bootstrap over responses (one per question).
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import numpy as np

from measure.evaluation.metrics import auroc, with_ci
from measure.evaluation.report import _f, write_json
from measure.evaluation.served_questions import Question, questions

SCORES = ("mean_eu", "max_eu", "mean_bias", "mean_variance", "mean_p_error", "mean_nll", "max_nll")
GOAL_AUROC, GOAL_GAP = 0.6, 0.05


async def ask(client, model: str, q: Question, max_tokens: int) -> dict:
    """One chat completion at T = 0 -> {text, wrong, tokens: [{logprob, eu, bias, variance, p_error}]}."""
    r = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": q.prompt}],
        temperature=0,
        max_tokens=max_tokens,
        logprobs=True,
    )
    choice = r.choices[0]
    text = choice.message.content or ""
    tokens = []
    for t in choice.logprobs.content if choice.logprobs else []:
        u = (t.model_extra or {}).get("uncertainty") or {}
        tokens.append({"logprob": t.logprob, **{k: u.get(k) for k in ("eu", "bias", "variance", "p_error")}})
    return {
        **q.as_dict(),
        "text": text,
        "wrong": q.wrong(text),
        "finish_reason": choice.finish_reason,
        "tokens": tokens,
    }


def _mean(xs: list) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(xs)) if xs else float("nan")


def _max(xs: list) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.max(xs)) if xs else float("nan")


def response_scores(rows: list[dict]) -> dict[str, np.ndarray]:
    """{score: [R]} per response; NaN where a response has no such value (e.g. no p_error rule)."""
    col = {k: [[t[k] for t in r["tokens"]] for r in rows] for k in ("eu", "bias", "variance", "p_error")}
    nll = [[-t["logprob"] if t["logprob"] is not None else None for t in r["tokens"]] for r in rows]
    out = {
        "mean_eu": [_mean(x) for x in col["eu"]],
        "max_eu": [_max(x) for x in col["eu"]],
        "mean_bias": [_mean(x) for x in col["bias"]],
        "mean_variance": [_mean(x) for x in col["variance"]],
        "mean_p_error": [_mean(x) for x in col["p_error"]],
        "mean_nll": [_mean(x) for x in nll],
        "max_nll": [_max(x) for x in nll],
    }
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def summarize(rows: list[dict], bootstrap: int = 1000) -> dict:
    """AUROC of each response score for `wrong` (with CIs), the paired gap mean_eu − mean_nll, the
    share of tokens with uncertainty, and the goal verdict."""
    y = np.asarray([r["wrong"] for r in rows], dtype=np.float64)
    scores = response_scores(rows)
    res: dict = {"auroc": {}, "auroc_ci95": {}}
    both = 0 < y.sum() < len(y)  # AUROC needs right and wrong answers
    for name in SCORES if both else ():
        s = scores[name]
        if np.isnan(s).any():  # a score some responses lack (no tokens, or no p_error rule)
            continue
        m = with_ci(auroc, s, y, n=bootstrap)
        res["auroc"][name], res["auroc_ci95"][name] = m["value"], m["ci95"]
    tokens = [t for r in rows for t in r["tokens"]]
    with_eu = sum(t["eu"] is not None for t in tokens)
    res |= {
        "responses": len(rows),
        "wrong": int(y.sum()),
        "error_rate": float(y.mean()) if len(y) else float("nan"),
        "by_kind": {
            k: {
                "responses": sum(r["kind"] == k for r in rows),
                "wrong": sum(r["wrong"] for r in rows if r["kind"] == k),
            }
            for k in sorted({r["kind"] for r in rows})
        },
        "tokens": len(tokens),
        "tokens_with_eu": with_eu,
        "mean_eu": _mean([t["eu"] for t in tokens]),
    }
    if "mean_eu" in res["auroc"] and "mean_nll" in res["auroc"]:
        gap = with_ci(
            lambda e, n, yy: auroc(e, yy) - auroc(n, yy),
            scores["mean_eu"],
            scores["mean_nll"],
            y,
            n=bootstrap,
        )
        a = res["auroc"]["mean_eu"]
        res["gap_mean_eu_minus_mean_nll"] = gap
        res["goal"] = {
            "rule": f"AUROC(mean eu) >= {GOAL_AUROC} and >= AUROC(mean nll) - {GOAL_GAP}",
            "met": bool(a >= GOAL_AUROC and a >= res["auroc"]["mean_nll"] - GOAL_GAP),
        }
    return res


async def run_questions(
    url: str, api_key: str | None, qs: list[Question], max_tokens: int, concurrency: int, progress: bool
) -> tuple[str, list[dict]]:
    """(served model id, one row per question, in order)."""
    import openai
    from tqdm import tqdm

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key or "unused", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(qs), desc="served questions", disable=not progress)

    async def one(q: Question) -> dict:
        async with sem:
            row = await ask(client, model, q, max_tokens)
        bar.update()
        return row

    try:
        rows = await asyncio.gather(*(one(q) for q in qs))
    finally:
        bar.close()
        await client.close()
    return model, list(rows)


def is_served_results(results: dict) -> bool:
    """Whether results.json is from `epispec eval --served`."""
    return "by_kind" in results and "rows" in results


def markdown(res: dict, command: str) -> str:
    kinds = ", ".join(f"{k}: {v['wrong']} wrong of {v['responses']}" for k, v in res["by_kind"].items())
    lines = [
        "# Served black-box check",
        "",
        f"`{command}`",
        "",
        f"Model `{res['model']}`; {res['responses']} responses at T = 0 through `/v1/chat/completions` "
        f"({kinds}; "
        f"error rate {_f(res['error_rate'])}); {res['tokens_with_eu']} of {res['tokens']} tokens carry eu; "
        f"mean eu {_f(res['mean_eu'])} nats; {_f(res['seconds'], 0)} s.",
        "",
        "| response score | AUROC [95% CI] |",
        "|---|---|",
    ]
    for k, v in res["auroc"].items():
        lo, hi = res["auroc_ci95"][k]
        lines.append(f"| {k} | {_f(v)} [{_f(lo)}, {_f(hi)}] |")
    if "goal" in res:
        g = res["gap_mean_eu_minus_mean_nll"]
        lines += [
            "",
            f"AUROC(mean eu) − AUROC(mean nll) = {_f(g['value'])} [{_f(g['ci95'][0])}, {_f(g['ci95'][1])}] "
            f"(paired bootstrap). Goal, {res['goal']['rule']}: **{'met' if res['goal']['met'] else 'missed'}**.",
        ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], res: dict, out: Path) -> str:
    from measure.evaluation.plots import _plt, _save, roc_curve

    plt = _plt()
    y = np.asarray([r["wrong"] for r in rows], dtype=np.float64)
    scores = response_scores(rows)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name in res["auroc"]:
        fpr, tpr = roc_curve(scores[name], y)
        ax.plot(fpr, tpr, label=f"{name} {res['auroc'][name]:.3f}", lw=2.5 if name == "mean_eu" else 1.2)
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(
        xlabel="false-positive rate",
        ylabel="true-positive rate",
        title=f"wrong answers, served ({res['model']})",
    )
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, out / "roc_served.png")


def run(
    url: str,
    api_key: str | None,
    out: Path,
    *,
    n: int,
    seed: int,
    max_tokens: int,
    concurrency: int,
    bootstrap: int,
    progress: bool,
    command: str,
) -> dict:
    """Ask, grade, score and write DIR/results.json, report.md and roc_served.png; returns the results."""
    qs = questions(n, seed)
    t0 = time.monotonic()
    model, rows = asyncio.run(run_questions(url, api_key, qs, max_tokens, concurrency, progress))
    res = {"model": model, "command": command, "seconds": time.monotonic() - t0, **summarize(rows, bootstrap)}
    res["config"] = {
        "questions": n,
        "seed": seed,
        "max_tokens": max_tokens,
        "concurrency": concurrency,
        "temperature": 0,
    }
    out.mkdir(parents=True, exist_ok=True)
    res["plots"] = [plot(rows, res, out)] if res["auroc"] else []
    write_json({**res, "rows": rows}, out / "results.json")
    (out / "report.md").write_text(markdown(res, command))
    return res
