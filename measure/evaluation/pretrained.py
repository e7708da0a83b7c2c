"""`epispec eval --bundle B`: the evaluation of a served bundle whose target is pretrained
(SmolLM2-135M-Instruct), on GSM8K — its own target and drafts, nothing trained.

1) data       test = the first `test_questions` of the test split, validation = the next
              `val_questions` (a bundle's drafts may have been distilled on all of train)
2) models     the bundle's target (float32) and drafts; EU* = the target's posterior over S
              low-rank instances (`posterior.py`); TokUR (S = 5 perturbed full targets)
3) per question, prompts through the chat template when the target is named by source:
              reference  the reference solution teacher-forced, its first `reference_tokens`
                         tokens scored (estimates against EU*)
              results    the target's greedy result after each `<<expr=` (`forced_labels.py`):
                         token labels, and estimates against EU* on those tokens too
              response   the target's greedy free answer (`max_new_tokens`): its answer label
                         (`labels.response_wrong`) and per-token eu (response-level scores, p_wrong)
4) validation the corrections of eu and the constant baseline's mean EU* (reference + result
              tokens), the eu threshold (result tokens), the p_wrong fit (responses)
5) test       estimation against EU* (`estimation.py`), token- and response-level detection with
              bootstrap CIs, precision/recall at the threshold, p_wrong's Brier/log loss/AUROC

TokUR runs on test only (its σ is fixed by the recipe, not chosen on validation). Cost of each
score in extra target passes per token is in `results["compute"]`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from drafts.corpus import format_prompt, load_records
from drafts.responses import chat_prompt_ids
from measure.evaluation import estimation, p_wrong
from measure.evaluation.calibrate import calibrate
from measure.evaluation.correction import fit_corrections
from measure.evaluation.forced_labels import ForcedResult, forced_results
from measure.evaluation.labels import response_wrong
from measure.evaluation.pipeline import DETECTION_SCORES, detection
from measure.evaluation.posterior import TargetPosterior, check_disjoint
from measure.evaluation.tokur import PerturbedTarget
from server.bundle import load_bundle
from server.engine.models import count_parameters, eos_token_ids, load_causal_lm, load_draft, load_tokenizer
from server.engine.teacher_forced import forced_logprobs, forced_member_logprobs
from server.engine.uncertainty import decompose, entropy, one_minus_max_prob, token_nll

TRUTH = "eu_star"
# detection score -> per-token key: the trained setting's, with the posterior's EU* in place of
# the deep ensemble's
TOKEN_SCORES = {**{k: v for k, v in DETECTION_SCORES.items() if k != "ensemble"}, "eu_star": TRUTH}
RESPONSE_SCORES = {k: v for k, v in TOKEN_SCORES.items() if k not in ("tokur", "eu_star")}


@dataclass(frozen=True)
class BundleRecipe:
    name: str
    test_questions: int
    val_questions: int
    max_new_tokens: int  # of the free responses
    reference_tokens: int  # reference-solution tokens scored per question (EU* costs per token)
    result_tokens: int = 12  # greedy budget after `<<expr=`
    posterior_samples: int = 32  # S of EU*
    posterior_noise: float = 0.1  # σ, rank and K: the OSD family of the drafts being trained
    posterior_rank: int = 4
    posterior_layers: int = 2
    tokur_samples: int = 5
    tokur_noise: float = 0.05  # σ on every layer: the setting chosen for OSD on this target

    def as_dict(self) -> dict:
        return asdict(self)


BUNDLE_QUICK = BundleRecipe(
    "bundle-quick", test_questions=4, val_questions=4, max_new_tokens=96, reference_tokens=32
)
BUNDLE_FULL = BundleRecipe(
    "bundle-full", test_questions=40, val_questions=30, max_new_tokens=256, reference_tokens=96
)


@dataclass
class Models:
    tokenizer: object
    target: torch.nn.Module
    drafts: list
    posterior: TargetPosterior
    tokur: PerturbedTarget
    chat: bool
    stop_ids: set[int]
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    tokens: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # scored, per key

    def timed(self, key: str, fn, n: int):
        t0 = time.perf_counter()
        out = fn()
        self.seconds[key] += time.perf_counter() - t0
        self.tokens[key] += n
        return out


def prompt_ids(models: Models, question: str) -> tuple[list[int], str]:
    """(prompt ids, the separator before the solution): a chat turn, or the training format."""
    tok = models.tokenizer
    if models.chat:
        return chat_prompt_ids(tok, question), ""
    return [
        tok.bos_token_id,
        *tok(format_prompt(question).rstrip(), add_special_tokens=False)["input_ids"],
    ], " "


@torch.no_grad()
def score(models: Models, ids: list[int], start: int, *, truth: bool, tokur: bool) -> dict[str, np.ndarray]:
    """Every per-token score of ids[start:] (teacher-forced), EU* and TokUR when asked. -> {key: [T]}"""
    n = len(ids) - start
    p = models.timed("target", lambda: forced_logprobs(models.target, ids, start), n)  # [T, V]
    q = models.timed("drafts", lambda: forced_member_logprobs(models.drafts, ids, start), n)  # [T, M, V]
    u = decompose(q, p)
    tok = torch.tensor(ids[start:])  # [T]
    out = {"ours.eu": u.eu, "ours.bias": u.bias, "ours.variance": u.variance}
    out["single.bias"] = decompose(q[:, :1], p).bias  # one draft: bias only (the M = 1 ablation)
    out |= {"entropy": entropy(p), "max_prob": one_minus_max_prob(p), "nll": token_nll(p, tok)}
    if truth:
        out[TRUTH] = models.timed(TRUTH, lambda: models.posterior.mutual_information(ids, start), n)
    if tokur:
        x = torch.tensor([ids])  # [1, L]
        out["tokur"] = models.timed(
            "tokur", lambda: models.tokur.mutual_information(x, slice(start - 1, len(ids) - 1)), n
        )
    return {k: v.double().numpy() for k, v in out.items()}


@torch.no_grad()
def respond(models: Models, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The target's greedy free answer (end of turn excluded)."""
    gen = models.target.generate(
        input_ids=torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(models.stop_ids),
        pad_token_id=models.tokenizer.pad_token_id,
    )[0, len(prompt) :].tolist()
    cut = next((i for i, t in enumerate(gen) if t in models.stop_ids), len(gen))
    return gen[:cut]


@dataclass
class Split:
    reference: list[dict] = field(default_factory=list)  # scores per question
    results: list[tuple[ForcedResult, dict]] = field(default_factory=list)
    responses: list[tuple[int, dict]] = field(default_factory=list)  # (answer wrong, scores)


def run_split(models: Models, records: list[dict], recipe: BundleRecipe, *, tokur: bool, desc: str) -> Split:
    out = Split()
    for i, r in enumerate(tqdm(records, desc=desc, unit="q", dynamic_ncols=True)):
        prompt, sep = prompt_ids(models, r["question"])
        solution = sep + r["answer"].strip()
        ids = prompt + models.tokenizer(solution, add_special_tokens=False)["input_ids"]
        ids = ids[: len(prompt) + recipe.reference_tokens]
        out.reference.append(score(models, ids, len(prompt), truth=True, tokur=tokur))
        for f in forced_results(
            i,
            prompt,
            solution,
            models.target,
            models.tokenizer,
            max_tokens=recipe.result_tokens,
            stop_ids=models.stop_ids,
        ):
            out.results.append((f, score(models, f.ids, f.start, truth=True, tokur=tokur)))
        gen = respond(models, prompt, recipe.max_new_tokens)
        if gen:
            text = models.tokenizer.decode(gen)
            scored = score(models, prompt + gen, len(prompt), truth=False, tokur=False)
            out.responses.append((response_wrong(text, r["answer"]), scored))
    return out


def _cat(dicts: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([d[k] for d in dicts]) for k in dicts[0]} if dicts else {}


def labelled(split: Split) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The result tokens that carry a label, and their labels (1 wrong)."""
    keep, labels = [], []
    for f, s in split.results:
        mask = np.array([lab is not None for lab in f.labels])
        keep.append({k: v[mask] for k, v in s.items()})
        labels += [lab for lab in f.labels if lab is not None]
    return _cat(keep), np.array(labels, dtype=int)


def estimation_tokens(split: Split) -> dict[str, dict[str, np.ndarray]]:
    """Tokens with EU*: {"reference", "results", "both"}."""
    ref = _cat(split.reference)
    res = _cat([s for _, s in split.results])
    both = _cat([d for d in (ref, res) if d])
    return {"reference": ref, "results": res, "both": both}


def response_scores(split: Split) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Mean of each score over each response's tokens, and the answer labels."""
    y = np.array([w for w, _ in split.responses], dtype=int)
    return {k: np.array([s[k].mean() for _, s in split.responses]) for k in RESPONSE_SCORES.values()}, y


def compute(models: Models, n_target_params: int, n_draft_params: float) -> dict:
    """Measured teacher-forced seconds per scored token of each score's models, and its extra
    target passes and parameters per token (relative to the target's own pass)."""
    per_tok = {k: models.seconds[k] / max(1, models.tokens[k]) for k in models.seconds}
    m = len(models.drafts)
    target_s = per_tok.get("target", float("nan"))
    zero = {"target_passes": 0, "parameter_ratio": 0.0, "decode_wall_ratio": 0.0}
    drafts = {
        "target_passes": 0,
        "parameter_ratio": m * n_draft_params / n_target_params,
        "decode_wall_ratio": per_tok.get("drafts", float("nan")) / target_s,
    }
    post = models.posterior.cost()["target_passes_per_token"]
    out = {k: drafts for k in ("eu", "bias", "variance")}
    out |= {k: zero for k in ("entropy", "max_prob", "nll")}
    out["tokur"] = {
        "target_passes": models.tokur.samples,
        "parameter_ratio": float(models.tokur.samples),
        "decode_wall_ratio": per_tok.get("tokur", float("nan")) / target_s,
    }
    out["eu_star"] = {
        "target_passes": round(post, 2),
        "parameter_ratio": post,
        "decode_wall_ratio": per_tok.get(TRUTH, float("nan")) / target_s,
    }
    return {
        "per_score": out,
        "seconds_per_scored_token": per_tok,
        "note": "teacher-forced wall time per scored token of each score's models / the target's "
        "(decode_wall_ratio); eu/bias/variance cost 0 target passes in speculative serving",
    }


def run(
    bundle_dir: str | Path, data: str, recipe: BundleRecipe, n_boot: int = 1000, fpr: float = 0.1
) -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(0)
    # 1) data
    test_all = load_records(data, "test")
    test = test_all[: recipe.test_questions]
    val = test_all[recipe.test_questions : recipe.test_questions + recipe.val_questions]
    if len(val) < recipe.val_questions:
        raise ValueError(
            f"{data}: the test split has too few questions for {recipe.test_questions} + "
            f"{recipe.val_questions}."
        )
    # 2) models
    bundle = load_bundle(bundle_dir)
    check_disjoint([d.training for d in bundle.spec.drafts])
    tok = load_tokenizer(bundle.target)
    target = load_causal_lm(bundle.target, dtype=torch.float32)
    models = Models(
        tok,
        target,
        [load_draft(d) for d in bundle.drafts],
        TargetPosterior(
            target,
            recipe.posterior_samples,
            noise=recipe.posterior_noise,
            rank=recipe.posterior_rank,
            layers=recipe.posterior_layers,
        ),
        PerturbedTarget(target, recipe.tokur_samples, noise=recipe.tokur_noise),
        chat=bundle.source is not None,
        stop_ids=eos_token_ids(bundle.target, tok),
    )
    t_models = time.perf_counter()
    # 3) + 4) validation
    val_split = run_split(models, val, recipe, tokur=False, desc="validation")
    val_est = estimation_tokens(val_split)["both"]
    corrections = fit_corrections(val_est["ours.bias"], val_est["ours.variance"], val_est[TRUTH])
    val_mean = float(val_est[TRUTH].mean())
    val_tokens, val_labels = labelled(val_split)
    val_resp, val_y = response_scores(val_split)
    # 3) + 5) test
    test_split = run_split(models, test, recipe, tokur=True, desc="test")
    est_tokens = estimation_tokens(test_split)
    for tokens in est_tokens.values():
        if tokens:
            estimation.add_derived(tokens, corrections, val_mean)
    est = estimation.estimation(est_tokens["both"], n_boot, truth=TRUTH)
    gen_tokens, gen_labels = labelled(test_split)
    token_det = detection(gen_tokens, gen_labels, n_boot, TOKEN_SCORES) if len(gen_labels) else {}
    resp, resp_y = response_scores(test_split)
    response_det = detection(resp, resp_y, n_boot, RESPONSE_SCORES) if len(resp_y) else {}
    try:
        calib = calibrate(val_tokens["ours.eu"], val_labels, gen_tokens["ours.eu"], gen_labels, fpr)
    except (ValueError, KeyError) as exc:
        calib = {"error": str(exc) or "no labelled tokens"}
    source = {
        "data": str(data),
        "split": "test",
        "questions": [recipe.test_questions, recipe.test_questions + len(val)],
    }
    fit = None
    if len(val_y) and len(resp_y):  # a target that ends every turn at once answers nothing
        fit = p_wrong.fit(p_wrong.features([s["ours.eu"] for _, s in val_split.responses]), val_y, source)
        base = float(val_y.mean())
        p_test = p_wrong.predict(fit, p_wrong.features([s["ours.eu"] for _, s in test_split.responses]))
        p_val = p_wrong.predict(fit, p_wrong.features([s["ours.eu"] for _, s in val_split.responses]))
        fit.fitted_on |= {
            "validation": p_wrong.scores(p_val, val_y, base),
            "test": p_wrong.scores(p_test, resp_y, base),
        }
    n_draft = sum(count_parameters(d) for d in bundle.drafts) / len(bundle.drafts)
    return {
        "recipe": recipe.as_dict(),
        "data": {
            "source": str(data),
            "validation_questions": len(val),
            "test_questions": len(test),
            "test_tokens": {k: int(len(v.get(TRUTH, []))) for k, v in est_tokens.items() if k != "both"},
            "validation_tokens": {"estimation": int(len(val_est[TRUTH])), "labelled": int(len(val_labels))},
            "split_rule": "test = first test_questions of the test split; validation = the next val_questions",
        },
        "models": {
            "bundle": str(Path(bundle_dir).resolve()),
            "target": str(bundle.target),
            "drafts": [str(d) for d in bundle.drafts],
            "chat": models.chat,
            "parameters": {"target": count_parameters(bundle.target), "draft": n_draft},
        },
        "ground_truth": models.posterior.describe(),
        **est,
        "rmse_by_condition": {
            c: estimation.rmse_by_condition(est_tokens[c], TRUTH)
            for c in ("reference", "results")
            if est_tokens[c]
        },
        **estimation.reductions(est["rmse"]),
        "corrections": {name: c.describe() for name, c in corrections.items()},
        "constant_baselines": {
            "constant_zero": {"value": 0.0},
            "constant_val_mean": {
                "value": val_mean,
                "fitted_on": "validation",
                "validation_tokens": len(val_est[TRUTH]),
            },
        },
        "eu_star": {
            "mean": float(est_tokens["both"][TRUTH].mean()),
            "std": float(est_tokens["both"][TRUTH].std()),
            "top_decile_threshold": float(np.quantile(est_tokens["both"][TRUTH], 0.9)),
            "validation_mean": val_mean,
        },
        **{
            k: token_det.get(k, {}) for k in ("auroc", "auprc", "prr", "auroc_ci95", "auprc_ci95", "prr_ci95")
        },
        "token_labels": {
            "tokens": int(len(gen_labels)),
            "wrong": int(gen_labels.sum()),
            "base_rate": float(gen_labels.mean()) if len(gen_labels) else None,
            "results": len(test_split.results),
            "results_wrong": sum(f.wrong for f, _ in test_split.results),
            "validation_tokens": int(len(val_labels)),
            "validation_wrong": int(val_labels.sum()),
            "examples": [
                {"expr": f.cut.expr, "truth": f.cut.truth, "result": f.result, "wrong": f.wrong}
                for f, _ in test_split.results[:8]
            ],
        },
        "response_level": {
            **response_det,
            "responses": int(len(resp_y)),
            "aggregation": "mean token score over the free response; label: its stated answer "
            "(after '####', else its last number) against the reference",
        },
        "tokur": models.tokur.describe(),
        "calibration": calib,
        "p_wrong": fit.model_dump(mode="json") if fit else {"error": "no free responses to fit on"},
        "compute": compute(models, count_parameters(bundle.target), n_draft),
        "seconds": {"models": t_models - t_start, "total": time.perf_counter() - t_start},
        "_fit": fit,
        "_corrections": corrections,
    }


def with_overrides(recipe: BundleRecipe, **overrides) -> BundleRecipe:
    return replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
