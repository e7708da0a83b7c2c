"""`epispec eval --bundle B`: the evaluation of a served bundle whose target is pretrained
(SmolLM2-135M-Instruct) — its own target and drafts, nothing trained — at a size that ranks
estimators (docs/evaluation-at-scale.md).

1) data       test = the first `test_questions` of GSM8K's test split; validation = the first
              `val_questions` of its *train* split (never test); the arithmetic response set
              (`arithmetic.py`), validation and test drawn from two seeds, disjoint
2) models     the bundle's target (float32) and drafts; four families of target instances
              (`noise.py`): EU* (S low-rank instances in the last K layers, the drafts' OSD
              family, seeds beyond every OSD draw), the upper bound (M of that family, other
              seeds), the second ground truth (S₂ instances, noise on the attention projections
              of every layer: no draft is distilled from it) and the TokUR baseline
3) tokens     per problem, every cut of the reference solution decoded greedily over one KV cache
              and scored as one tree (`forced_labels.forced_tree`, `tree_scores.Scorer`): labels
              of the results, and every score of every generated token; the second ground truth
              and TokUR on test only
4) responses  the target's greedy answers to the arithmetic set, labelled exactly, scored per token
5) validation the corrections of eu and the constant baseline's mean EU*, the eu threshold, the
              per-token p_error fit (`p_error.py`), the p_wrong fit (responses)
6) test       estimation against both ground truths, token- and response-level detection; CIs
              by bootstrap over problems (token level) or responses

The measured wall time per problem and per score is in `results["seconds"]` and
`results["compute"]`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from drafts.corpus import format_prompt, load_records
from drafts.responses import chat_prompt_ids
from measure.evaluation import arithmetic, estimation, p_error, p_wrong, response_set
from measure.evaluation.calibrate import calibrate
from measure.evaluation.correction import fit_corrections
from measure.evaluation.forced_labels import ForcedResult, forced_tree
from measure.evaluation.noise import ATTENTION, LowRankNoise, NoiseFamily
from measure.evaluation.pipeline import DETECTION_SCORES, detection
from measure.evaluation.posterior import SEED_BASE, check_disjoint
from measure.evaluation.tree_scores import Scorer
from server.bundle import load_bundle
from server.engine.models import count_parameters, eos_token_ids, load_causal_lm, load_drafts, load_tokenizer

TRUTH, TRUTH2 = "eu_star", "truth2"
UPPER_SEED = SEED_BASE + (1 << 40)  # the upper bound's instances: EU*'s family, other seeds
TRUTH2_SEED = 1 << 63
# detection score -> per-token key
TOKEN_SCORES = {
    **{k: v for k, v in DETECTION_SCORES.items() if k != "ensemble"},
    "eu_star": TRUTH,
    "upper_bound": "upper_bound",
    "truth2": TRUTH2,
}
CHEAP_SCORES = ("eu", "bias", "variance", "entropy", "max_prob", "nll")  # no extra target pass


@dataclass(frozen=True)
class BundleRecipe:
    name: str
    test_questions: int  # GSM8K test problems
    val_questions: int  # GSM8K train problems
    responses_val: int  # arithmetic problems
    responses_test: int
    max_new_tokens: int = 48  # of the arithmetic answers
    result_tokens: int = 12  # greedy budget after `<<expr=`
    max_cuts: int = 2  # the first annotations of each solution (each more costs its whole prefix)
    posterior_samples: int = 32  # S of EU*
    posterior_noise: float = 0.1  # σ, rank and K: the OSD family of the drafts being trained
    posterior_rank: int = 4
    posterior_layers: int = 2
    truth2_samples: int = 8  # S₂ of the second ground truth
    truth2_noise: float = 0.02  # largest of 0.01/0.02/0.03 keeping top-1 agreement >= 0.9 (measured)
    truth2_rank: int = 4
    tokur_samples: int = 5
    tokur_noise: float = 0.05  # σ on every layer: the setting chosen for OSD on this target
    response_seed: int = 0
    response_levels: tuple[int, ...] = tuple(arithmetic.LEVELS)

    def as_dict(self) -> dict:
        return asdict(self)


BUNDLE_QUICK = BundleRecipe(
    "bundle-quick", test_questions=4, val_questions=4, responses_val=8, responses_test=8
)
# 300 test problems (~1,650 labelled tokens at the measured 5.5 per problem) and answers of the
# arithmetic set; sized to the measured per-problem cost (docs/evaluation-at-scale.md)
BUNDLE_FULL = BundleRecipe(
    "bundle-full", test_questions=300, val_questions=60, responses_val=100, responses_test=200
)


@dataclass
class Models:
    tokenizer: object
    scorer: Scorer
    chat: bool
    stop_ids: set[int]

    def prompt(self, text: str) -> tuple[list[int], str]:
        """(prompt ids, the separator before a solution): a chat turn, or the training format."""
        tok = self.tokenizer
        if self.chat:
            return chat_prompt_ids(tok, text), ""
        return [
            tok.bos_token_id,
            *tok(format_prompt(text).rstrip(), add_special_tokens=False)["input_ids"],
        ], " "


def shown_path(path) -> str:
    """`path` relative to the working directory when it lies under it (records stay portable)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def families(recipe: BundleRecipe, drafts: int) -> dict[str, NoiseFamily]:
    r = recipe
    k = r.posterior_layers
    return {
        TRUTH: NoiseFamily(
            TRUTH, r.posterior_noise, r.posterior_rank, k, None, SEED_BASE, r.posterior_samples
        ),
        "upper_bound": NoiseFamily(
            "upper_bound", r.posterior_noise, r.posterior_rank, k, None, UPPER_SEED, drafts
        ),
        TRUTH2: NoiseFamily(
            TRUTH2, r.truth2_noise, r.truth2_rank, 0, ATTENTION, TRUTH2_SEED, r.truth2_samples
        ),
        # PerturbedTarget's instances (seed 0): every linear of every layer, seeds 0..S-1
        "tokur": NoiseFamily("tokur", r.tokur_noise, 4, 0, None, 0, r.tokur_samples),
    }


@dataclass
class TokenSplit:
    tokens: dict[str, np.ndarray]  # every scored token: scores, "question" (cluster), "label" (NaN: none)
    results: list[ForcedResult]
    problems: int
    problems_with_results: int
    seconds: float


def token_split(
    models: Models, records: list[dict], recipe: BundleRecipe, *, baselines: bool, desc: str
) -> TokenSplit:
    t0 = time.perf_counter()
    parts, results, with_results = [], [], 0
    scorer = models.scorer
    for i, r in enumerate(tqdm(records, desc=desc, unit="problem", dynamic_ncols=True)):
        prompt, sep = models.prompt(r["question"])
        tree, found = scorer.timer(
            "decode",
            0,
            lambda i=i, p=prompt, s=sep + r["answer"].strip(): forced_tree(
                i,
                p,
                s,
                scorer.target,
                models.tokenizer,
                max_tokens=recipe.result_tokens,
                stop_ids=models.stop_ids,
                max_cuts=recipe.max_cuts,
            ),
        )
        if not found:
            continue
        with_results += 1
        s = scorer.score(tree, truth=True, truth2=baselines, tokur=baselines)
        s["question"] = np.full(len(s["ours.eu"]), i)
        s["label"] = np.array(
            [np.nan if lab is None else lab for f in found for lab in f.labels], dtype=float
        )
        parts.append(s)
        results += found
    tokens = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    return TokenSplit(tokens, results, len(records), with_results, time.perf_counter() - t0)


def labelled(tokens: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The tokens that carry a label, and their labels (1 wrong)."""
    if not tokens:
        return {}, np.zeros(0, dtype=int)
    keep = ~np.isnan(tokens["label"])
    return {k: v[keep] for k, v in tokens.items()}, tokens["label"][keep].astype(int)


def label_counts(split: TokenSplit) -> dict:
    _, y = labelled(split.tokens)
    return {
        "problems": split.problems,
        "problems_with_results": split.problems_with_results,
        "results": len(split.results),
        "results_wrong": sum(f.wrong for f in split.results),
        "tokens": int(len(y)),
        "wrong": int(y.sum()),
        "error_rate": float(y.mean()) if len(y) else None,
        "scored_tokens": int(len(split.tokens.get("ours.eu", []))),
        "seconds": split.seconds,
        "seconds_per_problem": split.seconds / max(1, split.problems),
    }


def load_models(bundle_dir: str | Path, recipe: BundleRecipe) -> tuple[Models, dict, object]:
    bundle = load_bundle(bundle_dir)
    check_disjoint([d.training for d in bundle.spec.drafts])
    tok = load_tokenizer(bundle.target)
    target = load_causal_lm(bundle.target, dtype=torch.float32)
    drafts = load_drafts(bundle.drafts, bundle.target)
    fams = {k: LowRankNoise(target, f) for k, f in families(recipe, len(bundle.drafts)).items()}
    scorer = Scorer(target, drafts, fams[TRUTH], fams["upper_bound"], fams[TRUTH2], fams["tokur"])
    models = Models(tok, scorer, chat=bundle.source is not None, stop_ids=eos_token_ids(bundle.target, tok))
    return models, fams, bundle


def compute(scorer: Scorer, fams: dict[str, LowRankNoise], n_target: int, n_draft: float, m: int) -> dict:
    """Per score: extra target passes per token (parameters touched) and the measured teacher-forced
    wall time per scored token relative to the target's own pass."""
    per_tok = scorer.timer.per_token()
    target_s = per_tok.get("target", float("nan"))
    zero = {"target_passes": 0, "parameter_ratio": 0.0, "decode_wall_ratio": 0.0}
    drafts = {
        "target_passes": 0,
        "parameter_ratio": m * n_draft / n_target,
        "decode_wall_ratio": per_tok.get("drafts", float("nan")) / target_s,
    }
    out = {k: drafts for k in ("eu", "bias", "variance", "p_error")}
    out |= {k: zero for k in ("entropy", "max_prob", "nll")}
    for key, fam in fams.items():
        passes = fam.cost()["target_passes_per_token"]
        out[key] = {
            "target_passes": round(passes, 2),
            "parameter_ratio": passes,
            "decode_wall_ratio": per_tok.get(key, float("nan")) / target_s,
        }
    return {
        "per_score": out,
        "seconds_per_scored_token": per_tok,
        "seconds": dict(scorer.timer.seconds),  # totals, decoding and answering included
        "scored_tokens": dict(scorer.timer.tokens),
        "note": "extra target passes per token in parameters touched; decode_wall_ratio = measured "
        "teacher-forced seconds per scored token / the target's; eu/bias/variance/p_error cost 0 target "
        "passes in speculative serving (the drafts' passes are the ones speculation runs)",
    }


def run(
    bundle_dir: str | Path, data: str, recipe: BundleRecipe, n_boot: int = 1000, fpr: float = 0.1
) -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(0)
    # 1) data
    test = load_records(data, "test")[: recipe.test_questions]
    val = load_records(data, "train")[: recipe.val_questions]
    if len(test) < recipe.test_questions or len(val) < recipe.val_questions:
        raise ValueError(
            f"{data}: too few problems for {recipe.test_questions} test + {recipe.val_questions} train."
        )
    arith_val, arith_test = arithmetic.splits(
        recipe.responses_val, recipe.responses_test, recipe.response_seed, recipe.response_levels
    )
    # 2) models
    models, fams, bundle = load_models(bundle_dir, recipe)
    scorer = models.scorer
    t_models = time.perf_counter()
    # 3) tokens
    val_split = token_split(models, val, recipe, baselines=False, desc="validation (train problems)")
    test_split = token_split(models, test, recipe, baselines=True, desc="test problems")
    # 4) responses
    resp = {
        name: response_set.run(
            scorer,
            models.tokenizer,
            problems,
            lambda text: models.prompt(text)[0],
            max_new_tokens=recipe.max_new_tokens,
            stop_ids=models.stop_ids,
            baselines=name == "test",
            desc=f"{name} responses",
        )
        for name, problems in (("validation", arith_val), ("test", arith_test))
    }
    t_resp = time.perf_counter()
    # 5) validation fits
    v = val_split.tokens
    if not v or not test_split.tokens:
        raise ValueError("no forced results on validation or test: nothing to score")
    corrections = fit_corrections(v["ours.bias"], v["ours.variance"], v[TRUTH])
    val_mean = float(v[TRUTH].mean())
    val_lab, val_y = labelled(v)
    # 6) test
    t = test_split.tokens
    estimation.add_derived(t, corrections, val_mean)
    groups = t["question"]
    est = estimation.estimation(t, n_boot, truth=TRUTH, groups=groups)
    est2 = estimation.estimation(t, n_boot, truth=TRUTH2, groups=groups)
    test_lab, test_y = labelled(t)
    pe_fit, pe = fit_p_error(
        val_lab,
        val_y,
        test_lab,
        test_y,
        n_boot,
        {"data": shown_path(data), "validation": f"train split, first {len(val)} problems"},
    )
    scores = {**TOKEN_SCORES, "p_error": "p_error"} if pe_fit else TOKEN_SCORES
    token_det = (
        detection(test_lab, test_y, n_boot, scores, groups=test_lab["question"]) if len(test_y) else {}
    )
    try:
        calib = calibrate(val_lab["ours.eu"], val_y, test_lab["ours.eu"], test_y, fpr)
    except (ValueError, KeyError) as exc:
        calib = {"error": str(exc) or "no labelled tokens"}
    rv, rt = resp["validation"], resp["test"]
    response_det = (
        detection(rt["scores"], rt["labels"], n_boot, {k: k for k in rt["scores"]})
        if len(rt["labels"])
        else {}
    )
    fit = None
    if len(rv["labels"]) and len(rt["labels"]):
        pw_x = lambda r: p_wrong.features([tk["ours.eu"] for tk in r["tokens"]])  # noqa: E731
        fit = p_wrong.fit(
            pw_x(rv), rv["labels"], {"data": "arithmetic set (measure/evaluation/arithmetic.py)"}
        )
        b = float(rv["labels"].mean())
        fit.fitted_on |= {
            "validation": p_wrong.scores(p_wrong.predict(fit, pw_x(rv)), rv["labels"], b),
            "test": p_wrong.scores(p_wrong.predict(fit, pw_x(rt)), rt["labels"], b),
        }
    n_target = count_parameters(bundle.target)
    n_draft = sum(count_parameters(d) for d in bundle.drafts) / len(bundle.drafts)
    seconds = {
        "models": t_models - t_start,
        "validation": val_split.seconds,
        "test": test_split.seconds,
        "responses": t_resp - t_models - val_split.seconds - test_split.seconds,
        "total": time.perf_counter() - t_start,
    }
    return {
        "recipe": recipe.as_dict(),
        "data": {
            "source": shown_path(data),
            "validation_questions": len(val),
            "test_questions": len(test),
            "test_tokens": {"results": int(len(t["ours.eu"]))},
            "validation_tokens": {"estimation": int(len(v[TRUTH])), "labelled": int(len(val_y))},
            "split_rule": "test = the first test_questions of GSM8K's test split; validation = the first "
            "val_questions of its train split",
            "test": label_counts(test_split),
            "validation": label_counts(val_split),
        },
        "models": {
            "bundle": str(Path(bundle_dir).resolve()),
            "target": str(bundle.target),
            "drafts": [str(d) for d in bundle.drafts],
            "chat": models.chat,
            "parameters": {"target": n_target, "draft": n_draft},
        },
        "ground_truth": fams[TRUTH].describe(),
        "truth2": fams[TRUTH2].describe(),
        "upper_bound": fams["upper_bound"].describe(),
        **est,
        "estimation_truth2": est2,
        "rmse_by_condition": {"results": estimation.rmse_by_condition(t, TRUTH)},
        **estimation.reductions(est["rmse"]),
        "corrections": {name: c.describe() for name, c in corrections.items()},
        "constant_baselines": {
            "constant_zero": {"value": 0.0},
            "constant_val_mean": {
                "value": val_mean,
                "fitted_on": "validation",
                "validation_tokens": len(v[TRUTH]),
            },
        },
        "eu_star": {
            "mean": float(t[TRUTH].mean()),
            "std": float(t[TRUTH].std()),
            "top_decile_threshold": float(np.quantile(t[TRUTH], 0.9)),
            "validation_mean": val_mean,
        },
        **{
            k: token_det.get(k, {}) for k in ("auroc", "auprc", "prr", "auroc_ci95", "auprc_ci95", "prr_ci95")
        },
        "token_labels": {
            "tokens": int(len(test_y)),
            "wrong": int(test_y.sum()),
            "base_rate": float(test_y.mean()) if len(test_y) else None,
            "results": len(test_split.results),
            "results_wrong": sum(f.wrong for f in test_split.results),
            "problems": int(len(np.unique(test_lab["question"]))),
            "validation_tokens": int(len(val_y)),
            "validation_wrong": int(val_y.sum()),
            "bootstrap": "problems (clusters) resampled with replacement",
            "examples": [
                {"expr": f.cut.expr, "truth": f.cut.truth, "result": f.result, "wrong": f.wrong}
                for f in test_split.results[:8]
            ],
        },
        "response_level": {
            **response_det,
            "responses": int(len(rt["labels"])),
            "wrong": int(rt["labels"].sum()),
            "error_rate": float(rt["labels"].mean()) if len(rt["labels"]) else None,
            "validation": {"responses": int(len(rv["labels"])), "wrong": int(rv["labels"].sum())},
            "by_level": response_set.by_level(rt["levels"], rt["labels"]),
            "aggregation": "mean and max of each token score over the answer; label: its stated answer "
            "(after '####', else its last number) against the exact one",
            "examples": [
                {"text": x, "wrong": int(w)} for x, w in zip(rt["texts"][:6], rt["labels"][:6], strict=False)
            ],
        },
        "tokur": fams["tokur"].describe(),
        "calibration": calib,
        "p_error": pe,
        "p_wrong": fit.model_dump(mode="json") if fit else {"error": "no answers to fit on"},
        "compute": compute(scorer, fams, n_target, n_draft, len(bundle.drafts)),
        "seconds": seconds,
        "_fit": fit,
        "_p_error": pe_fit,
        "_corrections": corrections,
        "_arrays": {"tokens": test_lab, "labels": test_y, "responses": rt},
    }


def fit_p_error(val_lab, val_y, test_lab, test_y, n_boot: int, source: dict):
    """(the validation fit or None, its results entry); adds "p_error" to test_lab's arrays."""
    try:
        fit = p_error.fit(p_error.features(val_lab), val_y, source)
    except (ValueError, KeyError) as exc:
        return None, {"error": str(exc)}
    base = float(val_y.mean())
    test = p_error.evaluate(fit, p_error.features(test_lab), test_y, test_lab["question"], base, n_boot)
    val = p_error.evaluate(fit, p_error.features(val_lab), val_y, val_lab["question"], base, 0)
    test_lab["p_error"] = test.pop("_p")
    val.pop("_p")
    fit.fitted_on |= {"validation": _summary(val), "test": _summary(test)}
    return fit, {**fit.model_dump(mode="json"), "test": test}


def _summary(ev: dict) -> dict:
    return {
        k: ev[k]
        for k in (
            "tokens",
            "wrong",
            "auroc",
            "precision",
            "recall",
            "brier",
            "brier_constant_base_rate",
            "ece",
        )
    }


def with_overrides(recipe: BundleRecipe, **overrides) -> BundleRecipe:
    return replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
