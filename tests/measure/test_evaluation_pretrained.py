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
    for split, seed in (("test", 7), ("train", 8)):
        (data / f"{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in synthetic_records(12, seed=seed))
        )
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
    argv += ["--test-questions", "4", "--val-questions", "6", "--max-new-tokens", "12"]
    argv += ["--responses-val", "6", "--responses-test", "6", "--posterior-samples", "3"]
    argv += ["--posterior-layers", "1", "--truth2-samples", "2", "--tokur-samples", "2", "--bootstrap", "20"]
    assert main([*argv, "--calibrate-bundle", str(bundle), "--no-progress"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert (out / "report.md").read_text().startswith("# epispec evaluation of a bundle at scale")
    assert r["ground_truth"]["samples"] == 3 and r["ground_truth"]["seeds"][0] == 1 << 62
    assert r["upper_bound"]["samples"] == 3 and r["upper_bound"]["seeds"][0] > r["ground_truth"]["seeds"][1]
    assert r["truth2"]["modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"] and r["truth2"]["layers"] == 0
    both = {"ours", "ours_offset", "ours_fit", "single_draft", "variance_only", "tokur", "upper_bound"}
    assert set(r["rmse"]) == both | {"constant_zero", "constant_val_mean", "truth2"}
    assert set(r["estimation_truth2"]["spearman"]) == both | {"constant_zero", "constant_val_mean", "eu_star"}
    d = r["data"]["test"]
    assert (
        d["problems"] == 4 and d["tokens"] == r["token_labels"]["tokens"] > 0 and d["seconds_per_problem"] > 0
    )
    assert r["compute"]["per_score"]["tokur"]["target_passes"] == 2
    assert r["compute"]["per_score"]["truth2"]["target_passes"] > 0
    assert r["response_level"]["responses"] + 0 <= 6 and r["data"]["validation"]["problems"] == 6
    for name in ("estimation.png",):
        assert (out / name).is_file()
    # the fits in the bundle are the ones reported, and the server reads them back
    manifest = read_manifest(bundle)
    assert manifest.p_wrong is not None and manifest.p_wrong.coef == r["p_wrong"]["coef"]
    if "error" not in r["p_error"]:
        assert manifest.p_error.coef == r["p_error"]["coef"] and (out / "reliability.png").is_file()
        assert set(r["auroc"]) >= {"eu", "tokur", "eu_star", "upper_bound", "truth2", "p_error"} or r[
            "token_labels"
        ]["wrong"] in (0, r["token_labels"]["tokens"])
    # --report regenerates the same report and both doc blocks
    doc = tmp_path / "doc.md"
    doc.write_text(
        "x\n<!-- eval-scale-tables:start -->\n<!-- eval-scale-tables:end -->\ny\n"
        "<!-- eval-scale-goals:start -->\n<!-- eval-scale-goals:end -->\n"
    )
    before = (out / "report.md").read_text()
    assert main(["eval", "--report", str(out), "--readme", str(doc)]) == 0
    assert (out / "report.md").read_text() == before
    text = doc.read_text()
    assert "| ours |" in text and "Issue #24's goals" in text and text.startswith("x\n")


def test_a_tree_split_labels_and_scores_every_generated_token(tiny_models):
    """The scores of one split, taken apart: one row per generated token of every result, the
    labels those of the results, each token's problem id, and estimation on the arrays is the
    metric of the arrays."""
    from measure.evaluation import estimation

    recipe = pretrained.with_overrides(
        pretrained.BUNDLE_QUICK, posterior_samples=2, posterior_layers=1, truth2_samples=2, tokur_samples=2
    )
    bundle = {"target": tiny_models["target"], "drafts": tiny_models["drafts"]}
    models, fams, _ = pretrained.load_models(_write_bundle(bundle), recipe)
    split = pretrained.token_split(models, synthetic_records(3, seed=3), recipe, baselines=True, desc="t")
    t = split.tokens
    n = sum(len(f.pieces) for f in split.results)
    assert all(len(v) == n for v in t.values()) and {"eu_star", "upper_bound", "truth2", "tokur"} <= set(t)
    labels = [lab for f in split.results for lab in f.labels]
    assert [None if np.isnan(x) else int(x) for x in t["label"]] == labels
    assert sorted(set(t["question"].tolist())) == sorted({f.question for f in split.results})
    lab_tokens, y = pretrained.labelled(t)
    assert len(y) == sum(lab is not None for lab in labels) == len(lab_tokens["ours.eu"])
    np.testing.assert_allclose(t["logprob"], -t["nll"])
    estimation.add_derived(t, {}, 0.25)
    est = estimation.estimation(t, 5, truth="eu_star", groups=t["question"])
    assert est["rmse"]["ours"] == metrics.rmse(t["ours.eu"], t["eu_star"])
    assert "eu_star" not in est["rmse"] and est["spearman"]["truth2"] == metrics.spearman(
        t["truth2"], t["eu_star"]
    )
    assert fams["upper_bound"].family.samples == len(tiny_models["drafts"])


def _write_bundle(models: dict) -> str:
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    manifest = {
        "schema_version": 1,
        "target": {"path": models["target"]},
        "drafts": [{"path": d, "training": {"settings": {"seed": 0}}} for d in models["drafts"]],
    }
    (folder / "bundle.json").write_text(json.dumps(manifest))
    return str(folder)
