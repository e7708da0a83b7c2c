"""`epispec generate` end to end in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys


def _generate(*args):
    cmd = [sys.executable, "-m", "server.cli", "generate", "--engine", "reference", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_jsonl_has_every_token_field_and_a_summary(tiny_models):
    drafts = [a for d in tiny_models["drafts"] for a in ("--draft", d)]
    r = _generate(
        "--target",
        tiny_models["target"],
        *drafts,
        "--prompt",
        "Question: Ann has",
        "--max-tokens",
        "12",
        "--jsonl",
        "--num-speculative-tokens",
        "2",
    )
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    tokens, summary = lines[:-1], lines[-1]["summary"]
    assert tokens and all(
        set(t) == {"token_id", "text", "logprob", "bias", "variance", "eu", "flagged"} for t in tokens
    )
    assert all(abs(t["eu"] - t["bias"] - t["variance"]) < 1e-5 for t in tokens)
    assert summary["tokens"] >= len(tokens)
    assert {"target_forward_passes", "draft_forward_passes", "proposed", "accepted"} <= set(summary)
    assert summary["proposed"] <= 2 * summary["target_forward_passes"]


def test_plain_text_marks_flagged_tokens_and_errors_are_clear(tiny_models):
    r = _generate(
        "--target",
        tiny_models["target"],
        "--draft",
        tiny_models["drafts"][0],
        "--prompt",
        "Question: Bob",
        "--max-tokens",
        "8",
        "--eu-threshold",
        "0",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("[[") >= 1 and "]]" in r.stdout
    bad = _generate("--target", tiny_models["target"], "--draft", "/nonexistent/draft", "--prompt", "x")
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    neg = _generate("--target", tiny_models["target"], "--prompt", "x", "--temperature", "-1")
    assert neg.returncode == 2 and "temperature" in neg.stderr
