"""The evaluation end to end on tiny models, and its teacher-forced scores against the engine.

No file from /work/shared is needed: data is the synthetic GSM8K-style corpus.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from drafts.corpus import format_prompt
from measure.evaluation import cli, estimation, pipeline, recipe
from measure.evaluation.correction import fit_corrections
from measure.evaluation.scores import ScoringModels, score_sequence
from server.engine.models import load_causal_lm, load_tokenizer
from server.engine.reference import ReferenceEngine
from server.engine.types import SamplingParams, TokenEvent

pytestmark = pytest.mark.usefixtures("few_threads")  # they train


def test_teacher_forced_eu_equals_the_engines_streamed_eu(tiny_models):
    """The evaluation scores generations teacher-forced; the reference engine computes eu during
    speculative decoding. Same prefixes, same models: the numbers must agree."""
    engine = ReferenceEngine(tiny_models["target"], tiny_models["drafts"], num_speculative_tokens=3)
    tok = engine.tokenizer
    prompt = [
        tok.bos_token_id,
        *tok(
            format_prompt("Ann has 3 pens and buys 4 more. How many pens does Ann have?").rstrip(),
            add_special_tokens=False,
        )["input_ids"],
    ]
    events = [
        e
        for e in engine.stream(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
        if isinstance(e, TokenEvent)
    ]
    ids = prompt + [e.token_id for e in events]
    models = ScoringModels(
        load_causal_lm(tiny_models["target"]),
        [load_causal_lm(tiny_models["target"])],
        {"ours": [load_causal_lm(d) for d in tiny_models["drafts"]]},
    )
    s = score_sequence(models, ids, len(prompt))
    np.testing.assert_allclose(s["ours.eu"], [e.eu for e in events], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s["ours.bias"], [e.bias for e in events], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(-s["nll"], [e.logprob for e in events], rtol=1e-4, atol=1e-5)
    assert np.all(s["ensemble"] == 0)  # one member: no disagreement


def test_eval_cli_on_given_model_folders(tiny_models, tmp_path, monkeypatch):
    """`epispec eval` with model folders given: results.json, report.md, plots, bundle threshold;
    the corrections are fitted on the validation tokens (a spy records what the fit receives)."""
    t, d = tiny_models["target"], tiny_models["drafts"]
    seen = []

    def spy(bias, variance, truth):
        seen.append(np.array(truth))
        return fit_corrections(bias, variance, truth)

    monkeypatch.setattr(pipeline, "fit_corrections", spy)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text(json.dumps({"target": {"path": "t"}, "thresholds": {"eu": 0.5}}))
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(
        [
            "--quick",
            "--out",
            str(out),
            "--data",
            "synthetic",
            "--ensemble",
            t,
            d[0],
            d[1],
            "--drafts",
            *d,
            "--drafts-no-ddd",
            d[1],
            d[2],
            "--drafts-no-osd",
            d[0],
            d[2],
            "--test-questions",
            "4",
            "--val-questions",
            "4",
            "--max-new-tokens",
            "40",
            "--tokur-samples",
            "2",
            "--bootstrap",
            "20",
            "--calibrate-bundle",
            str(bundle),
            "--no-progress",
        ]
    )
    assert cli.run(args) == 0
    r = json.loads((out / "results.json").read_text())
    methods = set(estimation.ESTIMATES) - set(estimation.REFERENCES)  # the references: a bundle run's
    assert set(r["rmse"]) == methods >= {"constant_zero", "constant_val_mean", "ours_fit"}
    for metric in ("rmse_top_decile", "spearman", "pearson", "scale_slope", "scale_intercept"):
        assert set(r[metric]) == methods
    assert r["spearman"]["constant_zero"] is None  # a constant ranks nothing: NaN, written as null
    assert set(r["auroc"]) == {"eu", "bias", "variance", "entropy", "max_prob", "nll", "tokur", "ensemble"}
    assert r["rmse_reduction_vs_best_baseline"] == pytest.approx(
        1 - r["rmse"]["ours"] / min(v for k, v in r["rmse"].items() if k not in estimation.OURS_VARIANTS)
    )
    # RMSE of a constant k is sqrt(std² + (mean − k)²) of EU* on test
    m, sd, k = (
        r["eu_star"]["mean"],
        r["eu_star"]["std"],
        r["constant_baselines"]["constant_val_mean"]["value"],
    )
    assert r["rmse"]["constant_zero"] == pytest.approx(math.sqrt(sd**2 + m**2))
    assert r["rmse"]["constant_val_mean"] == pytest.approx(math.sqrt(sd**2 + (m - k) ** 2))
    # the fit saw exactly the validation tokens, the constant is their mean EU*, nothing came from test
    assert len(seen) == 1 and len(seen[0]) == sum(r["data"]["validation_tokens"].values())
    assert r["constant_baselines"]["constant_val_mean"]["value"] == pytest.approx(float(seen[0].mean()))
    for name in ("ours_offset", "ours_fit"):
        c = r["corrections"][name]
        assert c["fitted_on"] == "validation" and c["validation_tokens"] == len(seen[0])
    assert r["compute"]["per_score"]["tokur"]["target_passes"] == 2
    assert r["compute"]["per_score"]["eu"]["target_passes"] == 0
    assert r["data"]["test_tokens"]["reference"] > 0
    assert (out / "report.md").read_text().startswith("# epispec evaluation")
    assert all((out / f).is_file() for f in ("estimation.png", "deciles.png", "scatter.png"))
    manifest = json.loads((bundle / "bundle.json").read_text())
    if "threshold" in r["calibration"]:
        assert manifest["thresholds"]["eu"] == pytest.approx(r["calibration"]["threshold"], abs=1e-6)
        assert "quantile" in manifest["thresholds_calibration"]["method"]


@pytest.mark.slow
def test_quick_recipe_trains_its_models(tmp_path):
    """The training path: tokenizer, ensemble and the three draft sets from the drafts package."""
    torch.set_num_threads(1)
    rec = recipe.with_overrides(
        recipe.QUICK,
        train_records=120,
        val_questions=3,
        test_questions=3,
        ensemble=2,
        drafts=2,
        target_steps=4,
        draft_steps=2,
        seq_len=64,
        max_new_tokens=16,
        tokur_samples=2,
        tokur_noise=(0.1,),
    )
    opts = pipeline.Options(
        recipe=rec, out=tmp_path, data=None, work=tmp_path / "models", bootstrap=10, progress=False
    )
    r = pipeline.run(opts)
    assert len(r["models"]["ensemble"]) == 2
    assert {k: len(v) for k, v in r["models"]["draft_sets"].items()} == {"ours": 2, "no_ddd": 2, "no_osd": 2}
    rec_ours = json.loads((Path(r["models"]["draft_sets"]["ours"][0]) / "training.json").read_text())
    rec_no_osd = json.loads((Path(r["models"]["draft_sets"]["no_osd"][0]) / "training.json").read_text())
    assert rec_ours["osd"]["mode"] == "ensemble" and rec_ours["ddd"]["enabled"]
    assert rec_no_osd["osd"]["mode"] == "none"
    assert np.isfinite(r["rmse"]["ours"])
    assert load_tokenizer(r["models"]["target"]) is not None


def test_calibrate_only_writes_the_bundle_threshold(tiny_models, tmp_path):
    """A served bundle's own target and drafts: threshold chosen on validation, written to bundle.json,
    the other manifest keys kept."""
    import argparse

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    manifest = {
        "target": {"path": tiny_models["target"]},
        "drafts": [{"path": d} for d in tiny_models["drafts"]],
        "training": {"kept": True},
    }
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        [
            "--quick",
            "--out",
            str(tmp_path / "out"),
            "--data",
            "synthetic",
            "--calibrate-bundle",
            str(bundle),
            "--calibrate-only",
            "--val-questions",
            "4",
            "--test-questions",
            "3",
            "--max-new-tokens",
            "32",
            "--no-progress",
        ]
    )
    assert cli.run(args) == 0
    written = json.loads((bundle / "bundle.json").read_text())
    calib = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert (
        written["thresholds"]["eu"] == pytest.approx(calib["threshold"], abs=1e-6) and calib["threshold"] > 0
    )
    assert written["training"] == {"kept": True}
    rate = calib["validation"].get("false_positive_rate", calib["validation"].get("flag_rate"))
    assert 0 <= rate <= 0.1 + 1e-9
    assert "NaN" not in (bundle / "bundle.json").read_text()
