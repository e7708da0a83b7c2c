"""The at-scale evaluation's doc blocks: generated from the results file each block names (so
docs/evaluation-at-scale.md is current wherever its blocks are regenerated from), and issue
#24's goal verdicts follow their bounds on both sides."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from measure.evaluation import scale_report

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "evaluation-at-scale.md"


@pytest.mark.parametrize(
    ("block", "make"),
    [(scale_report.TABLES, scale_report.tables_block), (scale_report.GOALS, scale_report.goals_block)],
)
def test_doc_blocks_equal_the_tables_of_the_results_they_name(block, make):
    current = block.current(DOC.read_text())
    source = re.search(r"generated from (\S+) by", current).group(1)
    results = json.loads((ROOT / source).read_text())
    assert scale_report.is_scale_results(results)
    assert current == make(results, source), (
        f"{DOC.name}'s {block.name} block is stale: run `epispec eval --report {Path(source).parent} "
        f"--readme {DOC.relative_to(ROOT)}`"
    )


def _results(half: float, precision: float, recall: float, pe_auroc: float, brier: float) -> dict:
    return {
        "auroc": {"eu": 0.6, "entropy": 0.7, "p_error": pe_auroc},
        "auroc_ci95": {"eu": [0.6 - half, 0.6 + half], "entropy": [0.66, 0.74], "p_error": [0.66, 0.74]},
        "token_labels": {"tokens": 900, "problems": 300},
        "p_error": {
            "test": {
                "threshold": 0.5,
                "precision": precision,
                "recall": recall,
                "precision_ci95": [0, 1],
                "recall_ci95": [0, 1],
                "flagged": 10,
                "tokens": 900,
            }
        },
        "p_wrong": {
            "fitted_on": {
                "test": {"brier": brier, "brier_constant_base_rate": 0.25, "responses": 240, "wrong": 120}
            }
        },
    }


def _verdicts(r: dict) -> list[str]:
    return [ok for *_, ok in scale_report.goal_rows(r)]


def test_goal_verdicts_follow_the_bounds():
    assert _verdicts(_results(0.049, 0.5, 0.3, 0.7, 0.24)) == ["**met**"] * 4
    assert _verdicts(_results(0.051, 0.49, 0.3, 0.69, 0.25)) == ["missed"] * 4
    assert _verdicts(_results(0.01, 0.9, 0.29, 0.8, 0.1))[1] == "missed"
