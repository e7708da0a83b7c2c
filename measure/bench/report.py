"""The benchmark's outputs: a markdown table, the goal ratios, the JSON document and a PNG plot.

JSON shape: {"command", "machine", "models", "workload", "runs": [{config, concurrency,
output_tokens_per_s, ttft_p50_s, itl_p50_s, itl_p99_s, acceptance_rate,
draft_passes_per_token, peak_rss_bytes, ...}], "eu_error": {k, median_abs, p95_abs,
median_rel, p95_rel, ...} | null, "goals": [...], "skipped": [{config, reason}]}.
"""

from __future__ import annotations

import os
import platform

import psutil

from measure.readme_block import ReadmeBlock

MiB = 1 << 20

# (name, numerator config, denominator config, metric, bound, concurrencies or None = all);
# issue 28's bounds under load
THROUGHPUT_GOALS = (
    ("epispec / vllm-target-alone tok/s at C=1", "epispec", "vllm-target-alone", 1.0, (1,)),
    ("epispec / vllm-target-alone tok/s at C=8", "epispec", "vllm-target-alone", 0.95, (8,)),
    ("epispec / vllm-target-alone tok/s at C=32", "epispec", "vllm-target-alone", 0.85, (32,)),
    ("epispec / vllm-draft-model tok/s", "epispec", "vllm-draft-model", 0.95, None),
)
MEMORY_BOUND = 1.15
DRAFT_PASS_SLACK = 0.05
EU_MEDIAN_REL, EU_P95_REL = 0.01, 0.05


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(logical=True),
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average_at_start": list(load) if load else None,
    }


def _kib(v):
    return None if v is None else v / 1024


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def labels(runs: list[dict]) -> list[str]:
    """Each run's config, with its vLLM dtype where the runs hold more than one."""
    several = len({r.get("dtype") for r in runs} - {None}) > 1
    return [f"{r['config']} ({r['dtype']})" if several and r.get("dtype") else r["config"] for r in runs]


def runs_table(runs: list[dict]) -> str:
    head = (
        "| config | T | C | out tok/s | TTFT p50 (ms) | ITL p50 (ms) | ITL p99 (ms) | acceptance "
        "| draft passes/token | proposed/row/step | EU share | peak RSS (MiB) | draft KV/request (KiB) "
        "| draft KV / tokens held |"
        "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [
        f"| {label} | {r.get('temperature', 0.0):g} | {r['concurrency']} "
        f"| {_fmt(r['output_tokens_per_s'], '.1f')} "
        f"| {_fmt(_ms(r['ttft_p50_s']), '.1f')} | {_fmt(_ms(r['itl_p50_s']), '.2f')} "
        f"| {_fmt(_ms(r['itl_p99_s']), '.1f')} | {_fmt(r['acceptance_rate'], '.2f')} "
        f"| {_fmt(r['draft_passes_per_token'], '.2f')} | {_fmt(r.get('proposed_per_row_step'), '.2f')} "
        f"| {_fmt(r.get('eu_share'), '.3f')} | {r['peak_rss_bytes'] / MiB:.0f} "
        f"| {_fmt(_kib(r.get('draft_kv_bytes_per_request')), '.0f')} "
        f"| {_fmt(r.get('draft_kv_over_tokens_held'), '.2f')} |"
        for r, label in zip(runs, labels(runs), strict=True)
    ]
    return "\n".join([head, *rows])


def dtype_table(runs: list[dict]) -> str | None:
    """Each vLLM config's output tok/s in every dtype against the first dtype it ran in, at the
    same temperature and concurrency (None when the runs hold one dtype)."""
    dtypes = list(dict.fromkeys(r["dtype"] for r in runs if r.get("dtype")))
    if len(dtypes) < 2:
        return None
    lines = [
        f"| config | T | C | {' | '.join(f'{d} tok/s' for d in dtypes)} "
        f"| {' | '.join(f'{d} / {dtypes[0]}' for d in dtypes[1:])} |",
        "|---|---:|---:|" + "---:|" * (2 * len(dtypes) - 1),
    ]
    keys = dict.fromkeys(
        (r["config"], r.get("temperature", 0.0), r["concurrency"]) for r in runs if r.get("dtype")
    )
    for config, t, c in keys:
        tps = [
            next(
                (
                    r["output_tokens_per_s"]
                    for r in runs
                    if (r["config"], r.get("temperature", 0.0), r["concurrency"], r.get("dtype"))
                    == (config, t, c, d)
                ),
                None,
            )
            for d in dtypes
        ]
        ratios = [None if v is None or not tps[0] else v / tps[0] for v in tps[1:]]
        lines.append(
            f"| {config} | {t:g} | {c} | {' | '.join(_fmt(v, '.1f') for v in tps)} "
            f"| {' | '.join(_fmt(v, '.2f') for v in ratios)} |"
        )
    return "\n".join(lines)


def _ms(s):
    return None if s is None else 1000 * s


def _find(runs: list[dict], config: str, c: int, temperature: float = 0.0) -> dict | None:
    """The run of `config` at concurrency c and this temperature (goals are judged greedy)."""
    return next(
        (
            r
            for r in runs
            if r["config"] == config and r["concurrency"] == c and r.get("temperature", 0.0) == temperature
        ),
        None,
    )


def goals(runs: list[dict], eu_error: dict | None) -> list[dict]:
    """Every goal of issues #8 and #28 that this run's data can decide: {goal, value, bound, met}."""
    out = []
    concurrencies = sorted({r["concurrency"] for r in runs})
    for name, num, den, bound, cs in THROUGHPUT_GOALS:
        for c in cs or concurrencies:
            a, b = _find(runs, num, c), _find(runs, den, c)
            if a and b and b["output_tokens_per_s"]:
                v = a["output_tokens_per_s"] / b["output_tokens_per_s"]
                label = name if cs else f"{name} at C={c}"
                out.append({"goal": label, "value": v, "bound": f">= {bound}", "met": v >= bound})
    for c in concurrencies:
        a, b = _find(runs, "epispec", c), _find(runs, "vllm-target-alone", c)
        if a and b:
            v = a["peak_rss_bytes"] / b["peak_rss_bytes"]
            out.append(
                {
                    "goal": f"epispec / vllm-target-alone peak RSS at C={c}",
                    "value": v,
                    "bound": f"<= {MEMORY_BOUND}",
                    "met": v <= MEMORY_BOUND,
                }
            )
        if a and a.get("eu_share") is not None:
            out.append(
                {
                    "goal": f"epispec share of tokens with uncertainty at C={c}",
                    "value": a["eu_share"],
                    "bound": ">= 1.0",
                    "met": a["eu_share"] >= 1.0,
                }
            )
        if a and a.get("spec_draft_passes_per_token"):
            v = a["draft_passes_per_token"] / a["spec_draft_passes_per_token"]
            out.append(
                {
                    "goal": f"epispec draft passes / speculation's need at C={c}",
                    "value": v,
                    "bound": f"<= {1 + DRAFT_PASS_SLACK}",
                    "met": v <= 1 + DRAFT_PASS_SLACK,
                }
            )
    if eu_error and eu_error.get("median_rel") is not None:
        out.append(
            {
                "goal": "EU median relative error",
                "value": eu_error["median_rel"],
                "bound": f"<= {EU_MEDIAN_REL}",
                "met": eu_error["median_rel"] <= EU_MEDIAN_REL,
            }
        )
        out.append(
            {
                "goal": "EU p95 relative error",
                "value": eu_error["p95_rel"],
                "bound": f"<= {EU_P95_REL}",
                "met": eu_error["p95_rel"] <= EU_P95_REL,
            }
        )
    return out


def goals_table(rows: list[dict]) -> str:
    lines = ["| goal | value | bound | met |", "|---|---:|---|---|"]
    lines += [
        f"| {g['goal']} | {g['value']:.3f} | {g['bound']} | {'yes' if g['met'] else 'no'} |" for g in rows
    ]
    return "\n".join(lines)


def eu_line(e: dict | None) -> str:
    if not e:
        return "EU error: not measured (epispec skipped, or --eu-prompts 0)."
    return (
        f"EU error of epispec against exact values ({e['tokens']} tokens, target_logprobs {e['k']}, "
        f"median exact eu {e['median_exact_eu']:.4f} nats): median {e['median_abs']:.2e} nats "
        f"/ {100 * e['median_rel']:.2f}%, p95 {e['p95_abs']:.2e} nats / {100 * e['p95_rel']:.2f}% "
        f"(relative to max(eu*, {e['rel_floor']})). For context, a bias from the target's "
        f"top-{e['k']} log-probs alone (tail-bucket bound) would be off by median "
        f"{100 * e['topk_bound']['median_rel']:.2f}%, p95 {100 * e['topk_bound']['p95_rel']:.2f}% "
        f"(median target top-{e['k']} mass {e['median_target_topk_mass']:.3f})."
    )


def markdown(doc: dict) -> str:
    parts = [runs_table(doc["runs"])]
    if (by_dtype := dtype_table(doc["runs"])) is not None:
        parts += ["", by_dtype]
    parts += ["", eu_line(doc["eu_error"])]
    if doc["goals"]:
        parts += ["", goals_table(doc["goals"])]
    for s in doc["skipped"]:
        parts.append(f"\nskipped {s['config']}: {s['reason']}")
    return "\n".join(parts)


BLOCK = ReadmeBlock("bench-table")
DOC = "docs/benchmark.md"  # the file that carries the committed results' block


def readme_block(doc: dict, source: str) -> str:
    """The bench-table block (docs/benchmark.md) for the results at `source` (a bench JSON path,
    as written in the block): what ran, on what, and `markdown(doc)`."""
    m, w, models = doc["machine"], doc["workload"], doc["models"]
    drafts = models.get("draft_parameters") or []
    lines = [
        BLOCK.start,
        f"<!-- generated from {source} by `epispec bench --report {source} --readme {DOC}`; "
        "edit the code in measure/bench/report.py, not this block -->",
        "",
        f"`{doc['command']}` at commit {doc.get('revision') or '?'}: target {models.get('target_name')} "
        f"({models.get('target_parameters', 0):,} parameters), {len(drafts)} drafts of "
        f"{(drafts or [0])[0]:,}; k = {w['num_speculative_tokens']}, {w['prompts']} "
        f"{'chat' if w.get('chat') else 'plain'} prompts, {w['max_tokens']} tokens each, "
        f"{w['requests_per_level']} requests per level; {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB, load average {m['load_average_at_start'][0]:.1f} at the start; "
        f"{doc.get('wall_s', 0):.0f} s wall.",
        "",
        markdown(doc),
        BLOCK.end,
    ]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = labels(doc["runs"])
    series = list(
        dict.fromkeys((n, r.get("temperature", 0.0)) for n, r in zip(names, doc["runs"], strict=True))
    )
    styles = {t: ls for t, ls in zip(sorted({t for _, t in series}), ("-", "--", ":", "-."), strict=False)}
    colors = {cfg: f"C{i}" for i, cfg in enumerate(dict.fromkeys(c for c, _ in series))}
    panels = (
        ("output_tokens_per_s", "output tokens/s", 1, "log"),
        ("ttft_p50_s", "TTFT p50 (ms)", 1000, "log"),
        ("peak_rss_bytes", "peak RSS (MiB)", 1 / MiB, "linear"),
    )
    for ax, (key, label, scale, yscale) in zip(axes, panels, strict=True):
        for cfg, t in series:
            rs = [
                r
                for n, r in zip(names, doc["runs"], strict=True)
                if (n, r.get("temperature", 0.0)) == (cfg, t) and r[key] is not None
            ]
            ax.plot(
                [r["concurrency"] for r in rs],
                [r[key] * scale for r in rs],
                marker="o",
                linestyle=styles.get(t, "-"),
                color=colors[cfg],
                label=f"{cfg} T={t:g}" if len(styles) > 1 else cfg,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale(yscale)
        ax.set_xlabel("concurrency")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    m = doc["models"]
    drafts = m["draft_parameters"]
    fig.suptitle(
        f"epispec bench — target {m['target_parameters'] / 1e6:.2f}M parameters, "
        f"{len(drafts)} drafts of {(drafts[0] if drafts else 0) / 1e6:.2f}M; "
        f"{doc['machine']['cores']} CPU cores",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
