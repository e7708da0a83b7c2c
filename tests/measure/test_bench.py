"""`epispec bench`: the harness's pure parts (statistics, memory, table/JSON shapes, EU error)
and one short end-to-end run of the `reference` config (no vLLM start-up, so it stays fast)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import psutil
import pytest
import torch

from drafts.corpus import format_prompt as drafts_format_prompt
from measure.bench import report
from measure.bench.eu_error import REL_FLOOR, error_summary, exact_eu
from measure.bench.measure import RequestTiming, latency_summary, percentile, tree_rss
from measure.bench.runners import level_row
from measure.bench.workload import (
    Workload,
    fit_prompt,
    format_prompt,
    load_questions,
    prompt_budget,
)
from server.engine.reference import ReferenceEngine
from server.engine.types import Finished, SamplingParams, TokenEvent

# --- workload


def test_prompt_format_equals_the_drafts_training_format():
    for q in ["Ann has 3 apples.", "  How many?  \n", "Ünïcode ✓ question"]:
        assert format_prompt(q) == drafts_format_prompt(q)


def test_load_questions_reads_jsonl_in_order_and_names_a_missing_file(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": "a"}) for i in range(5)) + "\n")
    assert load_questions(f, 3) == [format_prompt(f"q{i}") for i in range(3)]
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_questions(tmp_path / "nope.jsonl")


def test_every_level_has_at_least_concurrency_requests_from_the_same_prompts():
    w = Workload(["a", "b", "c"], 8, (1, 8), 4, 0)
    assert w.level_prompts(1) == ["a", "b", "c", "a"]
    assert w.level_prompts(8) == ["a", "b", "c"] * 2 + ["a", "b"]
    assert Workload.from_dict(w.as_dict()) == w


def test_long_prompts_keep_their_end_and_leave_room_for_every_config():
    assert prompt_budget(256, 32, 3) == 256 - 32 - 7 - 1
    assert fit_prompt([1, 2, 3, 4], 2) == [3, 4] and fit_prompt([1, 2], 5) == [1, 2]
    with pytest.raises(ValueError, match="budget"):
        fit_prompt([1], 0)


# --- statistics


def test_percentile_interpolates_linearly():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)


def test_latency_summary_from_token_times():
    # request 1: sent at 0, tokens at 1, 1 (one delta of two), 3; request 2: sent at 1, token at 2
    a, b = RequestTiming(0.0), RequestTiming(1.0)
    a.add(2, 1.0)
    a.add(1, 3.0)
    b.add(1, 2.0)
    s = latency_summary([a, b], wall_s=4.0)
    assert s["output_tokens"] == 4 and s["output_tokens_per_s"] == 1.0
    assert s["ttft_p50_s"] == 1.0  # TTFTs 1 and 1
    assert s["itl_p50_s"] == 1.0  # ITLs 0 and 2
    assert s["itl_p99_s"] == pytest.approx(1.98)


def test_level_row_derives_acceptance_and_passes_per_token():
    t = RequestTiming(0.0)
    t.add(10, 1.0)
    counters = {"proposed": 12, "accepted": 6, "draft_passes": 12, "spec_rounds": 4, "rounds": 4}
    counters["eu_seconds"] = 0.02
    row = level_row("epispec", 1, [t], counters, 1.0, 123, k=3)
    assert row["acceptance_rate"] == 0.5
    assert row["draft_passes_per_token"] == 1.2 and row["spec_draft_passes_per_token"] == 1.2
    assert row["target_passes_per_token"] == 0.4 and row["peak_rss_bytes"] == 123
    assert row["eu_ms_per_token"] == pytest.approx(2.0)
    plain = level_row("vllm-target-alone", 1, [t], {"proposed": 0, "accepted": 0}, 1.0, 1, k=3)
    assert plain["acceptance_rate"] is None and plain["draft_passes_per_token"] == 0
    assert plain["eu_ms_per_token"] is None


def test_tree_rss_counts_child_processes():
    code = "b = bytearray(200 << 20); import sys; sys.stdout.write('ready\\n'); sys.stdout.flush(); input()"
    before = tree_rss(psutil.Process())
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"ready"
        assert tree_rss(psutil.Process()) - before > 150 << 20
    finally:
        child.kill()
        child.wait()


# --- report


def _run(config, c, tps, rss, passes=0.0, spec_passes=0.0):
    return {
        "config": config,
        "concurrency": c,
        "output_tokens_per_s": tps,
        "ttft_p50_s": 0.01,
        "itl_p50_s": 0.002,
        "itl_p99_s": 0.02,
        "acceptance_rate": None,
        "draft_passes_per_token": passes,
        "spec_draft_passes_per_token": spec_passes,
        "peak_rss_bytes": rss,
    }


def test_goals_are_ratios_of_the_same_concurrency():
    runs = [_run("vllm-target-alone", c, 100.0, 1000) for c in (1, 32)]
    runs += [_run("vllm-draft-model", c, 50.0, 1100) for c in (1, 32)]
    runs += [_run("epispec", 1, 100.0, 1100, 1.0, 1.0), _run("epispec", 32, 80.0, 1200, 1.1, 1.0)]
    eu = {"k": 20, "median_rel": 0.005, "p95_rel": 0.2}
    g = {x["goal"]: x for x in report.goals(runs, eu)}
    assert g["epispec / vllm-target-alone tok/s at C=1"]["met"]
    assert g["epispec / vllm-target-alone tok/s at C=32"]["value"] == 0.8
    assert not g["epispec / vllm-target-alone tok/s at C=32"]["met"]
    assert g["epispec / vllm-draft-model tok/s at C=32"]["value"] == 1.6
    assert g["epispec / vllm-target-alone peak RSS at C=1"]["met"]
    assert not g["epispec / vllm-target-alone peak RSS at C=32"]["met"]  # 1.2 > 1.15
    assert not g["epispec draft passes / speculation's need at C=32"]["met"]  # 1.1 > 1.05
    assert g["EU median relative error"]["met"] and not g["EU p95 relative error"]["met"]
    table = report.runs_table(runs)
    assert len(table.splitlines()) == 2 + len(runs)
    assert "| epispec | 0 | 32 | 80.0 |" in table  # T 0 (greedy: runs without a temperature)


def test_several_dtypes_are_labelled_and_compared_to_the_first():
    runs = [
        {**_run("vllm-target-alone", c, tps, 1000), "dtype": d}
        for d, tps in (("bfloat16", 100.0), ("float32", 70.0))
        for c in (1, 8)
    ]
    runs.append({**_run("reference", 1, 5.0, 900), "dtype": None})
    table = report.runs_table(runs)
    assert "| vllm-target-alone (float32) | 0 | 8 | 70.0 |" in table and "| reference | 0 | 1 |" in table
    by_dtype = report.dtype_table(runs)
    assert "| vllm-target-alone | 0 | 8 | 100.0 | 70.0 | 0.70 |" in by_dtype
    assert "reference" not in by_dtype
    assert report.dtype_table([r for r in runs if r["dtype"] != "float32"]) is None  # one dtype: no table
    assert "(bfloat16)" not in report.runs_table(runs[:2])


def test_error_summary_pairs_tokens_and_floors_the_relative_error():
    s = error_summary([1.1, 0.002, None], [1.0, 0.0, 0.5], k=20)
    assert s["tokens"] == 2 and s["missing"] == 1 and s["k"] == 20
    assert s["median_abs"] == pytest.approx((0.1 + 0.002) / 2)
    assert s["p95_rel"] == pytest.approx(0.1 + 0.95 * (0.002 / REL_FLOOR - 0.1))


@pytest.mark.parametrize("kind", ["llama", "feature"])
def test_exact_eu_by_teacher_forcing_equals_the_reference_engine(tiny_models, kind, request):
    """The reference engine's eu is exact (full vocabulary, float32) on its own tokens: teacher
    forcing those tokens must give the same numbers, which pins the position alignment; for
    either kind of draft."""
    drafts = tiny_models["drafts"] if kind == "llama" else request.getfixturevalue("feature_drafts")
    engine = ReferenceEngine(tiny_models["target"], drafts, num_speculative_tokens=2)
    prompt = engine.tokenizer("Question: Ann has 3 apples.\nAnswer: ")["input_ids"]
    events = [
        e
        for e in engine.stream(prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        if isinstance(e, TokenEvent)
    ]
    seq = {"prompt_ids": prompt, "tokens": [e.token_id for e in events]}
    vocab = engine.vocab_size
    full, top5 = (exact_eu(tiny_models["target"], drafts, [seq], k)[0] for k in (vocab, 5))
    assert torch.allclose(torch.tensor(full["eu"]), torch.tensor([e.eu for e in events]), atol=1e-4)
    # at k = V the top-k bound is exact; below, a lower bound with less than all the mass
    assert torch.allclose(torch.tensor(full["eu_topk"]), torch.tensor(full["eu"]), atol=1e-4)
    assert all(t <= e + 1e-5 for t, e in zip(top5["eu_topk"], top5["eu"], strict=True))
    assert all(m < 1.0 for m in top5["topk_mass"])


# --- end to end (reference config only: no vLLM start-up)


def test_bench_reference_config_writes_table_json_and_plot(tiny_models, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps({"question": f"Ann has {i} apples."}) for i in range(4)))
    drafts = [a for d in tiny_models["drafts"] for a in ("--draft", d)]
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "bench",
        "--target",
        tiny_models["target"],
        *drafts,
        "--configs",
        "reference",
        "--prompts",
        str(questions),
        "--max-tokens",
        "6",
        "--requests",
        "2",
        "--concurrency",
        "1",
        "2",
        "--temperatures",
        "0",
        "1",
        "--json",
        str(out),
        "--plot",
        str(png),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert [(x["config"], x["temperature"], x["concurrency"]) for x in doc["runs"]] == [
        ("reference", 0.0, 1),
        ("reference", 0.0, 2),
        ("reference", 1.0, 1),
        ("reference", 1.0, 2),
    ]
    keys = {
        "config",
        "concurrency",
        "output_tokens_per_s",
        "ttft_p50_s",
        "itl_p50_s",
        "itl_p99_s",
        "acceptance_rate",
        "draft_passes_per_token",
        "peak_rss_bytes",
    }
    assert all(keys <= set(x) for x in doc["runs"])
    assert all(x["output_tokens"] == max(2, x["concurrency"]) * 6 for x in doc["runs"])
    assert doc["eu_error"] is None and doc["skipped"] == []
    assert "| reference | 0 | 2 |" in r.stdout and "| reference | 1 | 2 |" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_engine_request_counts_stats_from_finished():
    from measure.bench.runners import engine_request, level_row
    from server.engine.types import EngineStats

    class Scripted:
        async def generate(self, rid, ids, params):
            for tok in (5, 6):
                yield TokenEvent(tok, "x", -0.1, 0.1, 0.2, 0.3, False)
            yield TokenEvent(7, "x", -0.1, None, None, None, False)  # a token without its eu
            yield Finished("length", len(ids), 3, EngineStats(2, 6, 6, 1, eu_seconds=0.5))

    events: list = []
    timing, counters = asyncio.run(engine_request(Scripted(), "r", [1, 2], 3, events=events))
    assert len(timing.token_times) == 3 and [e.token_id for e in events] == [5, 6, 7]
    assert counters == {
        "rounds": 2,
        "draft_passes": 6,
        "proposed": 6,
        "accepted": 1,
        "spec_rounds": 2,
        "eu_seconds": 0.5,
        "tokens": 3,
        "uncertain_tokens": 2,
    }
    row = level_row("epispec", 1, [timing], counters, 1.0, 0, 3)
    assert row["proposed_per_row_step"] == 3.0 and row["eu_share"] == 2 / 3
    goal = report.goals([{**row, "eu_share": 2 / 3}], None)
    assert {
        "goal": "epispec share of tokens with uncertainty at C=1",
        "value": 2 / 3,
        "bound": ">= 1.0",
        "met": False,
    } in goal


# --- docs/benchmark.md's tables come from a committed results file


def test_readme_bench_block_equals_the_report_of_the_committed_results():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    source = "docs/bench-smollm2.json"
    expected = report.readme_block(json.loads((root / source).read_text()), source)
    assert report.BLOCK.current((root / report.DOC).read_text()) == expected, (
        f"{report.DOC}'s bench-table block is stale: run `epispec bench --report {source} --readme {report.DOC}`"
    )


def test_report_regenerates_the_block_and_names_a_bad_file(tmp_path, capsys):
    from server.cli import main

    doc = {
        "command": "epispec bench --quick",
        "revision": "abc1234",
        "machine": {"cpu": "x86_64", "cores": 2, "memory_gib": 23.5, "load_average_at_start": [1.0]},
        "models": {"target_name": "t", "target_parameters": 10, "draft_parameters": [2, 2]},
        "workload": {"num_speculative_tokens": 1, "prompts": 4, "max_tokens": 8, "requests_per_level": 4},
        "runs": [],
        "eu_error": None,
        "goals": [],
        "skipped": [],
        "wall_s": 12.0,
    }
    source = tmp_path / "bench.json"
    source.write_text(json.dumps(doc))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.BLOCK.start}\nstale\n{report.BLOCK.end}\n\ntail\n")
    assert main(["bench", "--report", str(source), "--readme", str(readme)]) == 0
    block = report.readme_block(doc, str(source))
    assert "k = 1" in block and "2 drafts of 2" in block and "12 s wall" in block
    assert readme.read_text() == f"# x\n\n{block}\ntail\n" and capsys.readouterr().out == block
    assert main(["bench", "--report", str(tmp_path / "missing.json")]) == 2
    assert "--report" in capsys.readouterr().err
    readme.write_text("no markers\n")
    assert main(["bench", "--report", str(source), "--readme", str(readme)]) == 2
    assert "bench-table" in capsys.readouterr().err


def test_feature_drafts_skip_vllms_draft_model_with_a_reason(tiny_models, feature_drafts):
    """vLLM's draft_model cannot run a draft that reads the target's hidden states: that config
    is skipped with its reason (the bench goes on), epispec is not."""
    from measure.bench.cli import skip_reason

    reason = skip_reason("vllm-draft-model", feature_drafts)
    assert reason is not None and "feature drafts" in reason
    assert skip_reason("vllm-draft-model", tiny_models["drafts"]) is None


def test_unseeded_requests_carry_no_seed():
    from measure.bench.runners import engine_request, engine_submit
    from server.engine.types import EngineStats

    seen = []

    class Scripted:
        async def generate(self, rid, ids, params):
            seen.append(params.seed)
            yield Finished("length", len(ids), 0, EngineStats(1, 0, 0, 0))

    asyncio.run(engine_request(Scripted(), "r", [1], 1, temperature=1.0))
    asyncio.run(engine_submit(Scripted(), seeded=False)("r", [1], 1, 1.0))
    assert seen[0] is not None and seen[1] is None
