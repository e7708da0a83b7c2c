"""Issue #14's goal table: generated from the committed bundle results (docs/evaluation.md's block
must be current), and its met/missed verdicts follow the bounds (checked on both sides of each)."""

from __future__ import annotations

import json
from pathlib import Path

from measure.evaluation import goals, report
from measure.evaluation.cli import is_bundle_results

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = "docs/eval-bundle/results.json"  # docs/evaluation.md's goal block is generated from this file


def test_readme_goal_block_equals_the_table_of_the_committed_results():
    results = json.loads((ROOT / COMMITTED).read_text())
    assert is_bundle_results(results)
    expected = goals.readme_block(results, COMMITTED)
    assert goals.BLOCK.current((ROOT / report.DOC).read_text()) == expected, (
        f"{report.DOC}'s eval-bundle-goals block is stale: run `epispec eval --report "
        f"{Path(COMMITTED).parent} --readme {report.DOC}`"
    )


def _results(ours_rmse, spearman, auroc_eu, precision, recall):
    return {
        "rmse": {"ours": ours_rmse, "single_draft": 1.0, "tokur": 0.5, "ours_fit": 0.4},
        "best_baseline": "tokur",
        "rmse_reduction_vs_best_baseline_by_variant": {"ours": 1 - ours_rmse / 0.5, "ours_fit": 0.2},
        "spearman": {"ours": spearman, "tokur": 0.6},
        "auroc": {"eu": auroc_eu, "tokur": 0.7},
        "compute": {"per_score": {"eu": {"target_passes": 0}, "tokur": {"target_passes": 5}}},
        "calibration": {
            "threshold": 1.0,
            "test": {"precision": precision, "recall": recall, "flagged": 3, "tokens": 10},
        },
    }


def test_verdicts_follow_the_bounds():
    met = [row[3] for row in goals.rows(_results(0.5, 0.61, 0.7, 0.5, 0.3))]
    # ours 0.5 vs single 1.0: 50 % lower; ours = best baseline (0 %); fit 20 % better; Spearman and
    # AUROC at or above TokUR's with 0 of 5 passes; precision and recall at their bounds
    assert met == ["**met**"] * 6
    missed = [row[3] for row in goals.rows(_results(0.64, 0.6, 0.69, 0.49, 0.3))]
    # 36 % lower; worse than the best baseline; fit still met; Spearman equal is not above; AUROC below
    assert missed == ["missed", "missed", "**met**", "missed", "missed", "missed"]
