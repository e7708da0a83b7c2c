"""`epispec eval --bundle B` end to end on a tiny bundle (plain prompts; the real run uses the
chat template of a target named by source): results.json, report.md, and the threshold and
p_wrong written into the bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from drafts.corpus import synthetic_records
from measure.evaluation import metrics, pretrained
from server.bundle import read_manifest
from server.cli import main

pytestmark = pytest.mark.usefixtures("few_threads")


@pytest.fixture
def bundle_and_data(tiny_models, tmp_path):
    data = tmp_path / "gsm8k"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(12, seed=7)))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    manifest = {
        "schema_version": 1,
        "target": {"path": tiny_models["target"]},
        "drafts": [{"path": d, "training": {"settings": {"seed": 0}}} for d in tiny_models["drafts"]],
    }
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    return bundle, data


def test_bundle_evaluation_writes_its_tables_and_calibrates_the_bundle(bundle_and_data, tmp_path, capsys):
    bundle, data = bundle_and_data
    out = tmp_path / "out"
    argv = ["eval", "--bundle", str(bundle), "--data", str(data), "--out", str(out), "--quick"]
    argv += [
        "--test-questions",
        "3",
        "--val-questions",
        "3",
        "--max-new-tokens",
        "24",
        "--reference-tokens",
        "12",
    ]
    argv += [
        "--posterior-samples",
        "3",
        "--posterior-layers",
        "1",
        "--tokur-samples",
        "2",
        "--bootstrap",
        "20",
    ]
    assert main([*argv, "--calibrate-bundle", str(bundle), "--no-progress"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert (out / "report.md").read_text().startswith("# epispec evaluation of a bundle")
    assert r["ground_truth"]["samples"] == 3 and r["ground_truth"]["seeds"][0] == 1 << 62
    assert set(r["rmse"]) == {
        "ours",
        "ours_offset",
        "ours_fit",
        "single_draft",
        "variance_only",
        "tokur",
        "constant_zero",
        "constant_val_mean",
    }
    tl = r["token_labels"]
    assert tl["tokens"] > 0 and tl["results"] > 0 and 0 <= tl["wrong"] <= tl["tokens"]
    if 0 < tl["wrong"] < tl["tokens"]:
        assert set(r["auroc"]) == set(pretrained.TOKEN_SCORES)
    assert r["compute"]["per_score"]["tokur"]["target_passes"] == 2
    assert r["response_level"]["responses"] == 3
    # the fit in the bundle is the one reported, and the server reads it back
    fit = read_manifest(bundle).p_wrong
    assert fit is not None and fit.coef == r["p_wrong"]["coef"]
    assert fit.fitted_on["responses"] == 3 and r["p_wrong"]["written_to"].endswith("bundle.json")
    assert "eu" in read_manifest(bundle).thresholds.as_dict() or "error" in r["calibration"]


def test_estimation_on_the_bundle_s_arrays_is_the_metric_of_the_arrays(tiny_models, bundle_and_data):
    """The scores of one split, taken apart: EU* present on estimation tokens only, labels only on
    result tokens, and the RMSE table equals metrics.rmse of the concatenated arrays."""
    from measure.evaluation import estimation
    from measure.evaluation.posterior import TargetPosterior
    from measure.evaluation.tokur import PerturbedTarget
    from server.engine.models import load_causal_lm, load_draft, load_tokenizer

    bundle, data = bundle_and_data
    target = load_causal_lm(tiny_models["target"])
    tok = load_tokenizer(tiny_models["target"])
    models = pretrained.Models(
        tok,
        target,
        [load_draft(d) for d in tiny_models["drafts"]],
        TargetPosterior(target, 2, layers=1),
        PerturbedTarget(target, 2),
        chat=False,
        stop_ids={tok.eos_token_id},
    )
    recipe = pretrained.with_overrides(pretrained.BUNDLE_QUICK, max_new_tokens=8, reference_tokens=6)
    split = pretrained.run_split(models, synthetic_records(2, seed=3), recipe, tokur=True, desc="t")
    assert all(len(s["eu_star"]) == 6 for s in split.reference)
    tokens = pretrained.estimation_tokens(split)["both"]
    n = 12 + sum(len(f.pieces) for f, _ in split.results)
    assert len(tokens["eu_star"]) == n
    estimation.add_derived(tokens, {}, 0.25)
    est = estimation.estimation(tokens, 5, truth="eu_star")
    assert est["rmse"]["ours"] == metrics.rmse(tokens["ours.eu"], tokens["eu_star"])
    assert est["rmse"]["constant_val_mean"] == pytest.approx(
        np.sqrt(np.mean((tokens["eu_star"] - 0.25) ** 2))
    )
    lab_tokens, labels = pretrained.labelled(split)
    assert len(labels) == sum(lab is not None for f, _ in split.results for lab in f.labels)
    assert len(lab_tokens["ours.eu"]) == len(labels)
