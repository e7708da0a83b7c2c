"""The evaluation, end to end (`epispec eval`):

1) data       train / validation / test questions (GSM8K, or synthetic when absent)
2) models     tokenizer, deep ensemble (member 0 = served target), drafts: ours, no-DDD, no-OSD
3) sequences  reference solutions and the target's greedy generations, with labels
4) scores     every estimate and baseline per token, teacher-forced (`scores.py`)
5) choices    on validation only: the TokUR noise scale σ (best AUROC), the eu threshold, the
              corrections of eu (`correction.py`) and the constant baseline's mean EU*
6) metrics    every estimate against EU* (`estimation.py`: RMSE, top-decile RMSE, Spearman,
              Pearson, scale fit), token/answer-level AUROC/AUPRC/PRR with bootstrap CIs,
              compute per score, calibration precision/recall on test
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from drafts.corpus import describe_corpus, record_text
from measure.evaluation import estimation, metrics, sequences
from measure.evaluation import recipe as recipes
from measure.evaluation.calibrate import calibrate
from measure.evaluation.correction import fit_corrections
from measure.evaluation.scores import ScoringModels, decode_seconds, score_sequence
from measure.evaluation.tokur import PerturbedTarget
from server.engine.models import count_parameters, load_causal_lm, load_draft, load_tokenizer

# hallucination detection: score -> per-token key
DETECTION_SCORES = {
    "eu": "ours.eu",
    "bias": "ours.bias",
    "variance": "ours.variance",
    "entropy": "entropy",
    "max_prob": "max_prob",
    "nll": "nll",
    "tokur": "tokur",
    "ensemble": "ensemble",
}


@dataclass
class Options:
    recipe: recipes.Recipe
    out: Path
    data: str | None
    work: Path
    ensemble: list[str] | None = None
    draft_sets: dict[str, list[str]] | None = None
    fpr: float = 0.1
    bootstrap: int = 1000
    progress: bool = True


def _concat(seqs: list[sequences.Sequence], scored: list[dict], kind: str) -> dict[str, np.ndarray]:
    rows = [s for s, _ in zip(seqs, scored, strict=True) if s.kind == kind]
    out = (
        {
            k: np.concatenate([d[k] for s, d in zip(seqs, scored, strict=True) if s.kind == kind])
            for k in scored[0]
        }
        if rows
        else {}
    )
    if kind == "generated" and rows:
        out["label"] = np.array([np.nan if v is None else v for s in rows for v in s.labels], dtype=float)
    return out


def _score_all(models: ScoringModels, seqs, desc: str) -> list[dict]:
    return [
        score_sequence(models, s.ids, s.start) for s in tqdm(seqs, desc=desc, unit="seq", dynamic_ncols=True)
    ]


def _labelled(gen: dict) -> tuple[dict, np.ndarray]:
    keep = ~np.isnan(gen["label"])
    return {k: v[keep] for k, v in gen.items() if k != "label"}, gen["label"][keep].astype(int)


def _choose_tokur(target, val_seqs, recipe, progress: bool) -> tuple[PerturbedTarget, dict]:
    """σ of the TokUR baseline with the best validation AUROC (the baseline's best shot)."""
    gen = [s for s in val_seqs if s.kind == "generated"]
    labels = np.array([v for s in gen for v in s.labels if v is not None])
    trials = {}
    for sigma in recipe.tokur_noise:
        pert = PerturbedTarget(target, recipe.tokur_samples, noise=sigma)
        vals = []
        for s in gen:
            mi = pert.mutual_information(torch.tensor([s.ids]))[s.start - 1 : len(s.ids) - 1].numpy()
            vals += [v for v, lab in zip(mi, s.labels, strict=True) if lab is not None]
        trials[sigma] = metrics.auroc(np.array(vals), labels) if len(vals) else float("nan")
    valid = {k: v for k, v in trials.items() if not np.isnan(v)}
    sigma = max(valid, key=valid.get) if valid else recipe.tokur_noise[0]
    return PerturbedTarget(target, recipe.tokur_samples, noise=sigma), {
        "noise_candidates": {str(k): v for k, v in trials.items()},
        "chosen_noise": sigma,
        "rule": "highest validation AUROC" if valid else "first candidate (validation AUROC undefined)",
    }


def detection(
    tokens: dict,
    labels: np.ndarray,
    n_boot: int,
    scores: dict[str, str] = DETECTION_SCORES,
    groups: np.ndarray | None = None,
) -> dict:
    """AUROC / AUPRC / PRR with bootstrap 95% CIs of each score (name -> key of `tokens`); with
    `groups` (a cluster id per item) the bootstrap resamples clusters (`metrics.resamples`)."""
    out: dict = {m: {} for m in ("auroc", "auprc", "prr")}
    cis: dict = {m: {} for m in ("auroc", "auprc", "prr")}
    for name, key in scores.items():
        for m, fn in (("auroc", metrics.auroc), ("auprc", metrics.auprc), ("prr", metrics.prr)):
            r = metrics.with_ci(fn, tokens[key], labels, n=n_boot, groups=groups)
            out[m][name], cis[m][name] = r["value"], r["ci95"]
    return {
        **out,
        **{f"{m}_ci95": cis[m] for m in cis},
        "tokens": int(len(labels)),
        "wrong": int(labels.sum()),
        "base_rate": float(labels.mean()) if len(labels) else None,
    }


def _compute(models: ScoringModels, paths: recipes.ModelPaths, seqs, recipe) -> dict:
    """Added compute per token relative to plain decoding (one target pass per token)."""
    sample = [s for s in seqs if s.kind == "generated"][:3] or seqs[:3]
    t_target = sum(decode_seconds(models.target, s.ids, s.start) for s in sample)
    d_model = models.draft_sets["ours"][0]
    t_draft = sum(decode_seconds(d_model, s.ids, s.start) for s in sample)
    p_target = count_parameters(paths.target)
    p_draft = sum(count_parameters(p) for p in paths.draft_sets["ours"]) / len(paths.draft_sets["ours"])
    m, s, n = len(models.draft_sets["ours"]), recipe.tokur_samples, len(models.ensemble)
    forced = dict(models.seconds)
    drafts = {
        "target_passes": 0,
        "draft_passes": m,
        "parameter_ratio": m * p_draft / p_target,
        "decode_wall_ratio": m * t_draft / t_target,
        "forced_wall_ratio": forced.get("drafts.ours", 0) / forced["target"],
        "note": "0 in speculative serving: the drafts' passes are the ones speculation runs anyway",
    }
    per_score = {k: drafts for k in ("eu", "bias", "variance")}
    per_score |= {
        k: {
            "target_passes": 0,
            "draft_passes": 0,
            "parameter_ratio": 0.0,
            "decode_wall_ratio": 0.0,
            "forced_wall_ratio": 0.0,
        }
        for k in ("entropy", "max_prob", "nll")
    }
    per_score["tokur"] = {
        "target_passes": s,
        "draft_passes": 0,
        "parameter_ratio": float(s),
        "decode_wall_ratio": float(s),
        "forced_wall_ratio": forced.get("tokur", 0) / forced["target"],
    }
    per_score["ensemble"] = {
        "target_passes": n - 1,
        "draft_passes": 0,
        "parameter_ratio": float(n - 1),
        "decode_wall_ratio": float(n - 1),
        "forced_wall_ratio": forced.get("ensemble", 0) / forced["target"] - 1,
    }
    return {
        "per_score": per_score,
        "parameters": {"target": p_target, "draft": p_draft},
        "decode_seconds_per_token": {
            "target": t_target / sum(len(x.ids) - x.start for x in sample),
            "draft": t_draft / sum(len(x.ids) - x.start for x in sample),
        },
        "forced_seconds": forced,
        "definitions": {
            "target_passes": "extra full target forward passes per token beyond plain decoding",
            "parameter_ratio": "extra parameters touched per token / target parameters (≈ FLOPs ratio)",
            "decode_wall_ratio": "extra KV-cached decoding wall time per token / the target's, measured "
            "on 3 generations for the drafts; S resp. N−1 target passes for tokur/ensemble",
            "forced_wall_ratio": "measured teacher-forced scoring time of the score's models / the target's",
        },
    }


def run(opts: Options) -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(0)
    recipe = opts.recipe
    # 1) data
    train, val, test, source = sequences.split_records(opts.data, recipe)
    texts = [record_text(r) for r in train]
    corpus = describe_corpus(source, "train", texts)
    # 2) models
    paths = recipes.prepare(
        recipe,
        texts,
        corpus,
        opts.work,
        ensemble=opts.ensemble,
        draft_sets=opts.draft_sets,
        progress=opts.progress,
    )
    t_models = time.perf_counter()
    tok = load_tokenizer(paths.target)
    ensemble = [load_causal_lm(p) for p in paths.ensemble]
    target = ensemble[0]
    draft_sets = {k: [load_draft(p) for p in v] for k, v in paths.draft_sets.items()}
    # 3) sequences
    t_gen = time.perf_counter()
    test_seqs = sequences.build(test, target, tok, recipe.max_new_tokens, "generate test")
    t_gen = time.perf_counter() - t_gen
    val_seqs = sequences.build(val, target, tok, recipe.max_new_tokens, "generate validation")
    # 5a) the baseline's noise scale, on validation
    tokur, tokur_choice = _choose_tokur(target, val_seqs, recipe, opts.progress)
    perturbed = {
        "tokur": tokur,
        "mc_dropout": PerturbedTarget(target, recipe.tokur_samples, mode="dropout", noise=0.1),
    }
    models = ScoringModels(target, ensemble, draft_sets, perturbed)
    # 4) scores
    test_scored = _score_all(models, test_seqs, "score test")
    val_models = ScoringModels(target, ensemble, {"ours": draft_sets["ours"]})
    val_scored = _score_all(val_models, val_seqs, "score validation")
    val_by_kind = {k: _concat(val_seqs, val_scored, k) for k in ("reference", "generated")}
    val_both = {
        k: np.concatenate([val_by_kind[c][k] for c in val_by_kind if val_by_kind[c]]) for k in val_scored[0]
    }
    # 5b) fitted on validation, applied to test
    corrections = fit_corrections(val_both["ours.bias"], val_both["ours.variance"], val_both["ensemble"])
    val_mean = float(val_both["ensemble"].mean())
    by_kind = {k: _concat(test_seqs, test_scored, k) for k in ("reference", "generated")}
    both = {k: np.concatenate([by_kind[c][k] for c in by_kind if by_kind[c]]) for k in test_scored[0]}
    for tokens in (both, *(v for v in by_kind.values() if v)):
        estimation.add_derived(tokens, corrections, val_mean)
    # 6) metrics
    est = estimation.estimation(both, opts.bootstrap)
    gen_tokens, gen_labels = _labelled(by_kind["generated"])
    token_det = detection(gen_tokens, gen_labels, opts.bootstrap)
    gen_seqs = [(s, d) for s, d in zip(test_seqs, test_scored, strict=True) if s.kind == "generated"]
    answer_scores = {k: np.array([d[k].mean() for _, d in gen_seqs]) for k in test_scored[0]}
    answer_det = detection(answer_scores, np.array([s.answer_wrong for s, _ in gen_seqs]), opts.bootstrap)
    val_tokens, val_labels = _labelled(val_by_kind["generated"])
    try:
        calib = calibrate(val_tokens["ours.eu"], val_labels, gen_tokens["ours.eu"], gen_labels, opts.fpr)
    except ValueError as exc:
        calib = {"error": str(exc)}
    compute = _compute(models, paths, test_seqs, recipe)
    return {
        "recipe": recipe.as_dict(),
        "data": {
            "source": source,
            "train_documents": len(train),
            "validation_questions": len(val),
            "test_questions": len(test),
            "test_tokens": {k: int(len(v.get("ensemble", []))) for k, v in by_kind.items()},
            "validation_tokens": {k: int(len(v.get("ensemble", []))) for k, v in val_by_kind.items()},
            "corpus": corpus,
        },
        "models": {**paths.as_dict(), "parameters": compute["parameters"]},
        **est,
        "rmse_by_condition": {c: estimation.rmse_by_condition(by_kind[c]) for c in by_kind if by_kind[c]},
        **estimation.reductions(est["rmse"]),
        "corrections": {name: c.describe() for name, c in corrections.items()},
        "constant_baselines": {
            "constant_zero": {"value": 0.0},
            "constant_val_mean": {
                "value": val_mean,
                "fitted_on": "validation",
                "validation_tokens": len(val_both["ensemble"]),
            },
        },
        "eu_star": {
            "mean": float(both["ensemble"].mean()),
            "std": float(both["ensemble"].std()),
            "top_decile_threshold": float(np.quantile(both["ensemble"], 0.9)),
            "validation_mean": val_mean,
        },
        "auroc": token_det["auroc"],
        "auprc": token_det["auprc"],
        "prr": token_det["prr"],
        "auroc_ci95": token_det["auroc_ci95"],
        "auprc_ci95": token_det["auprc_ci95"],
        "prr_ci95": token_det["prr_ci95"],
        "token_labels": {k: token_det[k] for k in ("tokens", "wrong", "base_rate")},
        "response_level": {**answer_det, "aggregation": "mean token score over the generated solution"},
        "tokur": {**tokur.describe(), **tokur_choice},
        "calibration": calib,
        "compute": compute,
        "seconds": {
            "models": t_models - t_start,
            "plain_decoding_test": t_gen,
            "total": time.perf_counter() - t_start,
        },
        "_arrays": {"both": both, "generated": gen_tokens, "labels": gen_labels},
    }


def calibrate_bundle(
    bundle_dir: str | Path, data: str | None, recipe: recipes.Recipe, fpr: float, min_correct: int = 20
) -> dict:
    """Choose the eu threshold for a served bundle (its own target and drafts) and write it into
    its bundle.json. Validation = the `val_questions` test-split questions that follow the
    evaluation's `test_questions` (disjoint from them), because a bundle's target may have seen all
    of train.
    With fewer than `min_correct` correct calculator-result tokens (a weak target writes few
    annotations), the threshold is the (1 − fpr) quantile of eu over the reference solutions'
    tokens instead, i.e. a flag rate of fpr on text known to be right."""
    from measure.evaluation.calibrate import write_threshold
    from server.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    tok = load_tokenizer(bundle.target)
    target = load_causal_lm(bundle.target)
    models = ScoringModels(target, [target], {"ours": [load_draft(d) for d in bundle.drafts]})
    n_test = recipe.test_questions
    _, _, both, source = sequences.split_records(
        data, recipes.with_overrides(recipe, test_questions=n_test + recipe.val_questions)
    )
    val, test = both[n_test:], both[:n_test]
    split = {}
    for name, recs in (("validation", val), ("test", test)):
        # a pretrained target (named by source) is a chat model: prompts as the chat endpoint builds them
        seqs = sequences.build(
            recs, target, tok, recipe.max_new_tokens, f"generate {name}", chat=bundle.source is not None
        )
        scored = _score_all(models, seqs, f"score {name}")
        split[name] = {k: _concat(seqs, scored, k) for k in ("reference", "generated")}
    val_tokens, val_labels = _labelled(split["validation"]["generated"])
    test_tokens, test_labels = _labelled(split["test"]["generated"])
    if (val_labels == 0).sum() >= min_correct:
        calib = calibrate(val_tokens["ours.eu"], val_labels, test_tokens["ours.eu"], test_labels, fpr)
    else:
        ref = split["validation"]["reference"]["ours.eu"]
        t = float(np.quantile(ref, 1 - fpr, method="higher"))
        calib = {
            "score": "eu",
            "threshold": t,
            "method": f"(1 - {fpr}) quantile of eu over the reference-solution tokens of {len(val)} "
            f"validation questions (after the first {n_test} of the {source} test split; flag rate {fpr} on "
            f"correct text) — only {int((val_labels == 0).sum())} correct calculator-result "
            "tokens were generated, too few for a label-based false-positive rate",
            "validation": {
                "flagged": int((ref > t).sum()),
                "flag_rate": float((ref > t).mean()),
                "tokens": len(ref),
            },
            "test": {
                **metrics.precision_recall_at(test_tokens["ours.eu"], test_labels, t),
                "tokens": len(test_labels),
            },
        }
    calib["written_to"] = str(write_threshold(bundle_dir, calib))
    return calib
