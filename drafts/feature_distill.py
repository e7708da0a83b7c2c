"""Distilling feature drafts (`server.engine.feature_draft`) with OSD and DDD.

Draft m trains on DDD partition m of the target's own responses. For each training window the
target runs once: its hidden states entering the last K layers (the deterministic prefix every
OSD instance shares, `drafts.osd`) and its final features f are cached. Every step then draws a
fresh low-rank instance of the last K layers (the teacher) and minimizes

    KL(p_S ‖ q_m)  +  λ · SmoothL1(g_t, f_t)

at every position: p_S the instance's next-token distribution renormalized over the draft's
vocabulary S, q_m the draft's from (f_{t−1}, x_t), g_t its predicted feature (EAGLE's feature
regression, which keeps g usable as the next step's input within a round). The input features
are the deterministic target's: what the server hands the drafts.

A fixed share of the documents (every `heldout_every`-th) is held out of every partition; the
held-out fit (top-1 agreement with the target, KL(q ‖ p)) is measured on it and recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from drafts import ddd
from drafts.osd import TeacherSampler, layer_range
from drafts.prefix_cache import pack_windows, shuffled_indices
from drafts.reduced import coverage
from drafts.training import RunOptions, finish_run, loss_summary, resolve_device, train_loop, write_record
from server.engine.draft_vocab import DraftVocab, vocab_digest
from server.engine.feature_draft import (
    FeatureDrafts,
    FeatureSpec,
    init_weights,
    load_feature_drafts,
    ridge_fc,
    save_feature_draft,
    shifted_features,
)
from server.engine.models import load_causal_lm, load_tokenizer, model_config
from server.engine.stacked_layers import causal_attend
from server.engine.uncertainty import kl

log = logging.getLogger(__name__)

SINK_NORM = 4.0  # rows whose last-layer input is this many times the median norm are left out of the fc fit

FEATURES_FILE = "teacher_features.pt"
HELDOUT_FILE = "heldout.json"


@dataclass(frozen=True)
class FeatureSettings:
    drafts: int = 4
    noise: float = 0.1
    rank: int = 4
    noise_layers: int = 2  # OSD noise in the last K layers; the rest is cached per window
    ddd: bool = True
    draft_vocab: int = 8192  # |S|; 0: the target's whole vocabulary
    feature_weight: float = 0.1  # λ of the feature regression
    heldout_every: int = 20  # every n-th document is held out of training (0: none)
    heldout_tokens: int = 8000  # held-out tokens of the fit at init and after training (0: none)
    ridge: float = 1.0  # λ of fc's least-squares init (0: fc passes f_{t−1} through instead)
    prefix_bf16: bool = True  # the cached target pass in bf16 (autocast): ~2x faster with bf16 matmul units


def choose_vocab(docs: list[list[int]], size: int, tokenizer, vocab_size: int) -> DraftVocab:
    """S: the special tokens, the ids seen at least twice in `docs` (most frequent first), then the
    lowest ids not yet in S (BPE ids roughly follow merge order, i.e. frequency in the
    tokenizer's own corpus), `size` in all: in-distribution coverage of the data, and the
    common tokens of other text (a token outside S gets q̄ = 0, so bias ≥ log 1/p(S))."""
    special = sorted({int(i) for i in tokenizer.all_special_ids if i is not None})
    counts = torch.bincount(torch.tensor([t for d in docs for t in d]), minlength=vocab_size)  # [V]
    frequent = [int(i) for i in torch.argsort(-counts, stable=True) if counts[i] >= 2]
    chosen = dict.fromkeys(special)
    for i in frequent:
        if len(chosen) >= size:
            break
        chosen.setdefault(i)
    for i in range(vocab_size):
        if len(chosen) >= size:
            break
        chosen.setdefault(i)
    v = DraftVocab(torch.tensor(list(chosen)), vocab_size, 0)
    v.tokenizer_digest = vocab_digest(tokenizer.get_vocab())
    return v


@torch.no_grad()
def target_features(
    teacher: TeacherSampler,
    windows: torch.Tensor,
    folder: Path,
    *,
    bf16: bool,
    progress: bool,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Every window's cached target pass, from `folder` when already computed (resumable):
    "prefix" [N, S, E], the hidden states entering the first noisy layer; "features" [N, S, E],
    the deterministic target's final normed features f; and the least-squares statistics of
    x_t = [f_{t−1}; e(x_t); 1] against r_t, the residual stream entering the last layer:
    "xtx" [2E+1, 2E+1], "xty" [2E+1, E] (float64), for `ridge_fc`."""
    from tqdm import tqdm

    key = (
        hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
        + f":{teacher.prefix_layers}:{bf16}:r{SINK_NORM}"
    )
    path = folder / FEATURES_FILE
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            return saved
    target, n_layers = teacher.target, len(teacher.target.model.layers)
    embed = target.get_input_embeddings().weight.detach().float()  # [V, E]
    last_in: list[torch.Tensor] = []
    hook = target.model.layers[-1].register_forward_pre_hook(
        lambda _m, args, kwargs: last_in.append(args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True,
    )
    prefixes, feats, xtx, xty = [], [], 0.0, 0.0
    try:
        for i in tqdm(
            range(0, len(windows), batch_size), desc="target features", unit="batch", disable=not progress
        ):
            x = windows[i : i + batch_size, :-1]  # [b, S]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                pre = teacher.prefix(x)  # [b, S, E]
            pre = pre.float()
            last_in.clear()
            with layer_range(target, teacher.prefix_layers, n_layers, final_norm=True):
                f = target.model(inputs_embeds=pre, use_cache=False).last_hidden_state  # [b, S, E]
            r = last_in[-1].flatten(0, 1).double()  # [b·S, E]
            xs = torch.cat([shifted_features(f), embed[x], torch.ones(*x.shape, 1)], -1)  # [b, S, 2E+1]
            xs = xs.flatten(0, 1).double()
            # Attention-sink tokens (BOS, <|im_start|>: 0.3 % of rows, ‖r‖ up to 15× the median) would
            # dominate the squares; without them the init agrees with the target's top-1 on 0.38 of
            # held-out tokens instead of 0.30 (docs/feature-drafts.md).
            norm = r.norm(dim=-1)  # [b·S]
            keep = norm < SINK_NORM * norm.median()
            xs, r = xs[keep], r[keep]
            xtx, xty = xtx + xs.T @ xs, xty + xs.T @ r
            prefixes.append(pre.to(torch.bfloat16))  # half the memory; the teacher's K layers run in float32
            feats.append(f.float())
    finally:
        hook.remove()
    saved = {"key": key, "prefix": torch.cat(prefixes), "features": torch.cat(feats), "xtx": xtx, "xty": xty}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(saved, path)
    return saved


def feature_loss(
    drafts: FeatureDrafts, teacher: TeacherSampler, seed: int, batch: tuple, weight: float
) -> torch.Tensor:
    """KL(p_S ‖ q) + weight · SmoothL1(g, f), means over positions (nats + feature units).
    batch: ids [B, S+1], prefix [B, S, E], f [B, S, E]"""
    ids, prefix, f = batch
    x = ids[:, :-1]  # [B, S]
    cols = None if drafts.vocab is None else drafts.vocab.target_ids
    log_p = teacher.logprobs(seed, x, cols, prefix.float())  # [B, S, V_d]
    pos = torch.arange(x.shape[1]).expand_as(x)  # [B, S]
    lq, g = drafts(x, shifted_features(f), pos, causal_attend(drafts.scale))  # [P, 1, V_d], [1, P, E]
    loss = kl(log_p.flatten(0, 1), lq[:, 0]).mean()
    return loss + weight * torch.nn.functional.smooth_l1_loss(g[0], f.flatten(0, 1))


def _batches(ids, prefix, f, batch_size: int, rng: random.Random):
    for idx in shuffled_indices(len(ids), batch_size, rng):
        yield _Batch(ids[idx], prefix[idx], f[idx])


@dataclass
class _Batch:
    ids: torch.Tensor
    prefix: torch.Tensor
    f: torch.Tensor

    def astuple(self) -> tuple:
        return (self.ids, self.prefix, self.f)


def split_heldout(n: int, every: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices): every `every`-th document held out."""
    held = [i for i in range(n) if every and i % every == every - 1]
    hs = set(held)
    return [i for i in range(n) if i not in hs], held


def distill_feature_drafts(
    texts: list[str],
    docs: list[list[int]],
    corpus: dict,
    target_dir: str | Path,
    out_dir: str | Path,
    settings: FeatureSettings,
    opts: RunOptions = RunOptions(),
    *,
    seed: int = 0,
) -> list[Path]:
    """Train settings.drafts feature drafts into out_dir/draft{m}; returns their folders.
    texts[i] names docs[i] (DDD partitions by text); docs are token ids (prompt + response)."""
    if len(texts) != len(docs):
        raise ValueError("one document of token ids per text is needed.")
    dev = resolve_device(opts.device)
    out_dir = Path(out_dir)
    tok = load_tokenizer(target_dir)
    cfg = model_config(target_dir)
    target = load_causal_lm(target_dir, device=str(dev), dtype=torch.float32)
    spec = FeatureSpec.of_target(cfg)
    train_idx, held_idx = split_heldout(len(docs), settings.heldout_every)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / HELDOUT_FILE).write_text(
        json.dumps({"every": settings.heldout_every, "indices": held_idx}) + "\n"
    )
    train_texts = [texts[i] for i in train_idx]
    parts = ddd.partition(train_texts, settings.drafts, settings.ddd)
    train_docs = [docs[i] for i in train_idx]
    vocab = (
        choose_vocab(train_docs, settings.draft_vocab, tok, int(cfg["vocab_size"]))
        if settings.draft_vocab
        else None
    )
    out = []
    for m, idx in enumerate(parts):
        folder = out_dir / f"draft{m}"
        out.append(folder)
        if (folder / "training.json").is_file():
            continue
        part_docs = [train_docs[i] for i in idx]
        teacher = TeacherSampler(
            target, "lowrank", noise=settings.noise, rank=settings.rank, layers=settings.noise_layers
        )
        rng = random.Random(seed + m)
        windows = pack_windows(part_docs, opts.seq_len, rng)  # [N, S+1]
        t0 = time.perf_counter()
        cached = target_features(teacher, windows, folder, bf16=settings.prefix_bf16, progress=opts.progress)
        prefix, f = cached["prefix"], cached["features"]
        feature_seconds = time.perf_counter() - t0
        n_steps = opts.steps or max(1, int(len(windows) * opts.epochs) // opts.batch_size)
        fc = ridge_fc(cached["xtx"], cached["xty"], settings.ridge) if settings.ridge > 0 else None
        weights = init_weights(spec, target, 1, seed + 100 + m, fc)
        drafts = FeatureDrafts(spec, weights, target.get_input_embeddings().weight.detach().float(), vocab)
        held_docs = [docs[i] for i in held_idx]
        fits = {"init": fit_on(drafts, target, held_docs, settings.heldout_tokens)} if held_docs else {}
        ts = opts.settings(n_steps, seed + m)
        part = ddd.describe(train_texts, idx, m, settings.drafts, settings.ddd)
        t1 = time.perf_counter()
        losses = train_loop(
            drafts,
            _batches(windows, prefix, f, opts.batch_size, rng),
            lambda step, b, m=m, t=teacher, d=drafts: feature_loss(
                d, t, (seed << 40) ^ (m << 32) ^ step, b.astuple(), settings.feature_weight
            ),
            ts,
            run_dir=folder,
            progress=opts.progress,
            desc=f"feature draft{m}",
            fingerprint={
                "kind": "feature-distill",
                "settings": asdict(settings),
                "partition": part["digest"],
            },
        )
        train_seconds = time.perf_counter() - t1
        if held_docs:
            fits["trained"] = fit_on(drafts, target, held_docs, settings.heldout_tokens)
            log.info("feature draft%d held-out fit: %s", m, fits)
        save_feature_draft(folder, spec, drafts.draft_state(0), getattr(torch, opts.dtype))
        if vocab is not None:
            vocab.save(folder)
        hashes = part.pop("hashes")
        (folder / "partition.json").write_text(json.dumps({**part, "hashes": hashes}, indent=1) + "\n")
        write_record(
            folder,
            {
                "kind": "feature-draft",
                "finished": True,
                "parameters": spec.parameters(),
                "spec": asdict(spec),
                "seed": seed + m,
                "settings": {
                    **ts.as_dict(),
                    "epochs": opts.epochs,
                    "device": str(dev),
                    "dtype": opts.dtype,
                    **asdict(settings),
                },
                "loss": {
                    "objective": "KL(teacher renormalized over S || draft) + λ SmoothL1(g, f)",
                    **loss_summary(losses),
                },
                "draft_vocab": None
                if vocab is None
                else {
                    "size": vocab.size,
                    "rule": "special + seen twice (most frequent) + lowest ids",
                    "coverage": coverage(part_docs, vocab),
                },
                "osd": teacher.describe(),
                "ddd": part,
                "corpus": corpus,
                "heldout": {"every": settings.heldout_every, "documents": len(held_idx), "fit": fits},
                "init": {
                    "layer": "the target's last decoder layer and final norm",
                    "fc": "the target's features only"
                    if fc is None
                    else "ridge: [f_{t−1}; e(x_t)] -> the last layer's input",
                    "ridge_lambda": settings.ridge,
                },
                "seconds": {
                    "target_features": round(feature_seconds, 1),
                    "training": round(train_seconds, 1),
                },
                "tokens_per_second": round(
                    n_steps * opts.batch_size * opts.seq_len / max(train_seconds, 1e-9), 1
                ),
            },
        )
        (folder / FEATURES_FILE).unlink(missing_ok=True)
        finish_run(folder)
    return out


def heldout_fit(
    draft_dirs: list[Path], target_dir: str | Path, docs: list[list[int]], max_tokens: int = 20000
) -> dict:
    """Each draft's and the mixture's top-1 agreement with the target and KL(q ‖ p) (nats) on
    held-out documents, teacher-forced: q from the target's own features, as served."""
    target = load_causal_lm(target_dir, dtype=torch.float32)
    return fit_on(load_feature_drafts(draft_dirs, target_dir), target, docs, max_tokens)


@torch.no_grad()
def fit_on(drafts: FeatureDrafts, target, docs: list[list[int]], max_tokens: int = 20000) -> dict:
    """`heldout_fit` of drafts in memory (the first max_tokens tokens of docs, 1,024 a document)."""
    agree = torch.zeros(drafts.m + 1)
    kls = torch.zeros(drafts.m + 1)
    n = 0
    for d in docs:
        if n >= max_tokens:
            break
        x = torch.tensor([d[:1024]])  # [1, L]
        out = target.model(input_ids=x, use_cache=False).last_hidden_state  # [1, L, E]
        log_p = torch.log_softmax((out @ drafts.embed.T).float(), -1)[0]  # [L, V]
        pos = torch.arange(x.shape[1])[None]
        lq, _ = drafts(x, shifted_features(out), pos, causal_attend(drafts.scale))  # [L, M, V_d]
        if drafts.vocab is not None:
            lq = drafts.vocab.expand(lq)  # [L, M, V]
        lmix = torch.logsumexp(lq, 1) - torch.log(torch.tensor(float(drafts.m)))  # [L, V]
        allq = torch.cat([lq, lmix[:, None]], 1)  # [L, M+1, V]
        best = log_p.argmax(-1)  # [L]
        agree += (allq.argmax(-1) == best[:, None]).float().sum(0)
        kls += torch.stack([kl(allq[:, j], log_p).sum() for j in range(drafts.m + 1)])
        n += x.shape[1]
    return {
        "tokens": n,
        "top1_agreement": [round(float(a / n), 4) for a in agree[:-1]],
        "top1_agreement_mixture": round(float(agree[-1] / n), 4),
        "kl_q_p": [round(float(k / n), 4) for k in kls[:-1]],
        "kl_mixture_p": round(float(kls[-1] / n), 4),
    }
