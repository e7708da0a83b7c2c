"""The served black-box check (`epispec eval --served`): grading, per-response scores, AUROCs, and
one run against a real server (uvicorn on loopback, the tiny models) through the openai client."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from measure.evaluation.metrics import auroc
from measure.evaluation.served import response_scores, summarize
from measure.evaluation.served_questions import CAPITALS, Question, questions
from server.app import create_app
from server.cli import main
from server.config import Settings
from tests.server.api.live import LiveServer


def test_questions_are_half_capitals_distinct_and_seeded():
    qs = questions(40, seed=3)
    assert sum(q.kind == "capital" for q in qs) == 20
    assert len({q.prompt for q in qs}) == 40
    assert qs == questions(40, seed=3) and qs != questions(40, seed=4)
    with pytest.raises(ValueError, match="at most"):
        questions(2 * len(CAPITALS) + 2, seed=0)


@pytest.mark.parametrize(
    ("question", "response", "wrong"),
    [
        (Question("arithmetic", "What is 7 + 8?", "15", 3), "15", 0),
        (Question("arithmetic", "What is 7 + 8?", "15", 3), "7 + 8 = 16", 1),
        (Question("arithmetic", "What is 7 + 8?", "15", 3), "I don't know", 1),
        (Question("capital", "capital of Ukraine?", "Kyiv", 0), "The capital is Kiev.", 0),
        (Question("capital", "capital of France?", "Paris", 0), "paris", 0),
        (Question("capital", "capital of France?", "Paris", 0), "Parisian", 1),
        (Question("capital", "capital of Peru?", "Lima", 0), "Cusco", 1),
    ],
)
def test_grading(question, response, wrong):
    assert question.wrong(response) == wrong


def _row(wrong: int, eus: list[float], logprobs: list[float], kind: str = "arithmetic") -> dict:
    tokens = [
        {"logprob": lp, "eu": e, "bias": e and e / 2, "variance": e and e / 2, "p_error": None}
        for e, lp in zip(eus, logprobs, strict=True)
    ]
    return {"kind": kind, "wrong": wrong, "tokens": tokens}


def test_scores_and_aurocs_are_exact_on_a_hand_made_set():
    rows = [
        _row(1, [3.0, 1.0], [-0.1, -0.1]),  # mean eu 2.0, mean nll 0.1
        _row(1, [1.0, None], [-2.0, -1.0]),  # a token without eu is left out of the mean: 1.0
        _row(0, [0.5, 0.5], [-0.5, -0.3], "capital"),  # 0.5, 0.4
        _row(0, [1.5, 0.5], [-0.05, -0.05], "capital"),  # 1.0, 0.05
    ]
    s = response_scores(rows)
    assert s["mean_eu"].tolist() == [2.0, 1.0, 0.5, 1.0]
    assert s["max_eu"].tolist() == [3.0, 1.0, 0.5, 1.5]
    assert np.allclose(s["mean_nll"], [0.1, 1.5, 0.4, 0.05])
    res = summarize(rows, bootstrap=50)
    # mean eu: wrong {2, 1} vs right {0.5, 1}: pairs (2>0.5, 2>1, 1>0.5, 1=1 -> ½) = 3.5 / 4
    assert res["auroc"]["mean_eu"] == pytest.approx(0.875)
    assert res["auroc"]["mean_nll"] == pytest.approx(auroc(s["mean_nll"], np.array([1, 1, 0, 0])))
    assert "mean_p_error" not in res["auroc"]  # no response has p_error: not scored
    assert res["tokens"] == 8 and res["tokens_with_eu"] == 7
    assert res["by_kind"] == {
        "arithmetic": {"responses": 2, "wrong": 2},
        "capital": {"responses": 2, "wrong": 0},
    }
    gap = res["gap_mean_eu_minus_mean_nll"]
    assert gap["value"] == pytest.approx(0.875 - res["auroc"]["mean_nll"])
    assert res["goal"]["met"] == (0.875 >= 0.6 and 0.875 >= res["auroc"]["mean_nll"] - 0.05)


def test_a_run_against_a_real_server(engine, tmp_path):
    with LiveServer(create_app(Settings(), engine)) as live:
        code = main(
            [
                "eval",
                "--served",
                live.url,
                "--out",
                str(tmp_path),
                "--questions",
                "8",
                "--max-tokens",
                "4",
                "--bootstrap",
                "20",
                "--no-progress",
            ]
        )
    assert code == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["model"] == "tiny" and res["responses"] == 8 and len(res["rows"]) == 8
    # every token a real server returns carries its uncertainty, and the grade is the question's own
    assert res["tokens"] == sum(len(r["tokens"]) for r in res["rows"]) and res["tokens"] >= 8
    assert res["tokens_with_eu"] == res["tokens"]
    for r in res["rows"]:
        assert r["wrong"] == Question(r["kind"], r["prompt"], r["answer"], r["level"]).wrong(r["text"])
        assert all(t["eu"] >= -1e-6 and math.isfinite(t["logprob"]) for t in r["tokens"])
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Served black-box check")
    (tmp_path / "report.md").unlink()  # --report regenerates it from results.json alone
    assert main(["eval", "--report", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text() == report
    if 0 < res["wrong"] < res["responses"]:  # both classes: AUROCs and the plot exist
        assert 0 <= res["auroc"]["mean_eu"] <= 1 and (tmp_path / "roc_served.png").stat().st_size > 0


def test_an_unreachable_server_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--served", "http://127.0.0.1:9", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "epispec eval --served" in capsys.readouterr().err
