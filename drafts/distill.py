"""Distilling M drafts from a target with OSD and DDD (Park et al., arXiv 2602.01956).

For draft m: its data is DDD partition m of the corpus (or all of it without DDD), optionally
replaced by continuations sampled from the target for the partition's prompts; at every step a
fresh stochastic instance of the target is drawn (OSD, `drafts.osd`) and the draft minimizes
KL(teacher ‖ draft) over the full next-token distribution at every position (`loss="forward"`,
mass-covering), or KL(draft ‖ teacher) (`loss="reverse"`, mode-seeking: the direction of the
served bias term KL(q̄ ‖ p), so its distillation error is what the draft minimizes; issue #14).

Each draft folder gets `training.json` (seed, shape or init model, settings, OSD mode and the
number of distinct teacher instances drawn, DDD partition digest) and `partition.json` (the
hashes of its documents). Finished drafts are kept when the command is rerun; an interrupted
one resumes from its checkpoint.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from drafts import ddd
from drafts.folder import PARTITION
from drafts.lm import LMShape, batches, build_lm, encode_corpus, save_lm
from drafts.osd import TeacherSampler
from drafts.prefix_cache import CachedBatch, cached_batches, drop, pack_windows, teacher_prefix
from drafts.reduced import ReducedStudent, build_reduced_draft, choose_vocab, coverage
from drafts.synthetic import prompt_of, sample_continuations
from drafts.targets import is_finished, steps_for
from drafts.training import (
    RunOptions,
    finish_run,
    loss_summary,
    resolve_device,
    train_loop,
    write_record,
)
from server.engine.models import check_compatible, count_parameters, load_causal_lm, load_tokenizer
from server.engine.uncertainty import kl

SOURCES = ("corpus", "synthetic", "responses")


@dataclass(frozen=True)
class DistillSettings:
    drafts: int = 4
    osd: str = "lowrank"
    noise: float = 0.1
    rank: int = 4
    ensemble: tuple[str, ...] = ()
    ddd: bool = True
    source: str = "corpus"  # or "synthetic", or "responses" (the data file is `drafts.responses` output)
    max_new_tokens: int = 128
    init: str | None = None
    draft_vocab: int = 0  # |S| of a reduced output vocabulary (`drafts.reduced`); 0: the target's
    embed_init: str = "random"  # or "target": the target's embedding of S, projected
    teacher_dtype: str = "float32"  # bfloat16 pays only on hardware with native bf16 matmul
    noise_layers: int = 0  # lowrank noise in the last K layers only (0: all); K > 0 caches the rest
    loss: str = "forward"  # KL(teacher ‖ draft); "reverse": KL(draft ‖ teacher)


LOSSES = ("forward", "reverse")


def check_loss(loss: str) -> None:
    """ValueError naming --loss unless `loss` is one of LOSSES."""
    if loss not in LOSSES:
        raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, not '{loss}'.")


def distill_loss(
    student, teacher: TeacherSampler, step_seed: int, batch: torch.Tensor, loss: str = "forward"
) -> torch.Tensor:
    """Mean over positions of KL(teacher instance ‖ student) (`loss="forward"`) or
    KL(student ‖ teacher instance) (`"reverse"`), in nats. batch [B, S+1]

    A `ReducedStudent` (reduced vocabulary S) is compared with the teacher renormalized over S.
    Raises ValueError for another `loss`."""
    check_loss(loss)
    direction = kl if loss == "forward" else lambda log_p, log_q: kl(log_q, log_p)
    prefix = None
    if isinstance(batch, CachedBatch):  # the teacher's deterministic layers, computed once
        batch, prefix = batch.ids, batch.prefix
    x = batch[:, :-1]  # [B, S]
    if isinstance(student, ReducedStudent):
        log_p = teacher.logprobs(step_seed, x, student.vocab.target_ids, prefix)  # [B, S, V_d]
        return direction(log_p, student(x)).mean()
    log_p = teacher.logprobs(step_seed, x, prefix=prefix)  # [B, S, V]
    log_q = torch.log_softmax(student(input_ids=x).logits.float(), dim=-1)  # [B, S, V]
    return direction(log_p, log_q).mean()


def step_seed(seed: int, draft: int, step: int) -> int:
    return (seed << 40) ^ (draft << 32) ^ step


def distill_drafts(
    texts: list[str],
    corpus: dict,
    target_dir: str | Path,
    out_dir: str | Path,
    settings: DistillSettings,
    shape: LMShape,
    opts: RunOptions = RunOptions(),
    *,
    seed: int = 0,
    docs: list[list[int]] | None = None,
) -> list[Path]:
    """Train settings.drafts drafts into out_dir/draft{m}; returns their folders.

    `docs` (source "responses"): the token ids of each text's document (`drafts.responses`)."""
    check_loss(settings.loss)  # before the target loads, not at the first step
    if settings.source not in SOURCES:
        raise ValueError(f"--source must be one of {', '.join(SOURCES)}, not '{settings.source}'.")
    if (settings.source == "responses") != (docs is not None) or docs is not None and len(docs) != len(texts):
        raise ValueError("source 'responses' needs one document of token ids per text (and only then).")
    if settings.init and settings.draft_vocab:
        raise ValueError(
            "--init starts from a model over the target's vocabulary; it cannot be combined "
            "with --draft-vocab."
        )
    parts = ddd.partition(texts, settings.drafts, settings.ddd)  # validates M and the corpus
    dev = resolve_device(opts.device)
    members = list(settings.ensemble)
    check_compatible(target_dir, members + ([settings.init] if settings.init else []))
    tok = load_tokenizer(target_dir)
    target = load_causal_lm(target_dir, device=str(dev), dtype=getattr(torch, settings.teacher_dtype))
    if settings.source == "corpus":  # every document encoded once, sliced per partition below
        docs = encode_corpus(texts, tok)
    vocab = None
    if settings.draft_vocab:
        vocab = choose_vocab(
            docs or encode_corpus(texts, tok), settings.draft_vocab, tok, int(target.config.vocab_size)
        )
    ens = [load_causal_lm(d, device=str(dev)) for d in members] if settings.osd == "ensemble" else []
    out = []
    for m, idx in enumerate(parts):
        folder = Path(out_dir) / f"draft{m}"
        out.append(folder)
        if is_finished(folder):
            continue
        part_texts = [texts[i] for i in idx]
        if docs is not None:  # corpus or responses
            part_docs = [docs[i] for i in idx]
        else:  # synthetic
            part_docs = sample_continuations(
                target,
                tok,
                [prompt_of(t) for t in part_texts],
                max_new_tokens=settings.max_new_tokens,
                seed=seed + m,
            )
        n_steps = opts.steps or steps_for(part_docs, opts.batch_size, opts.seq_len, opts.epochs)
        if settings.init:
            student = load_causal_lm(settings.init, device=str(dev))
        elif vocab is not None:
            student = build_reduced_draft(shape, tok, vocab, seed + 100 + m, target, settings.embed_init).to(
                dev
            )
        else:
            student = build_lm(shape, tok, seed=seed + 100 + m).to(dev)
        trained = ReducedStudent(student, vocab) if vocab is not None else student
        teacher = TeacherSampler(
            target,
            settings.osd,
            noise=settings.noise,
            rank=settings.rank,
            members=ens,
            layers=settings.noise_layers,
        )
        ts = opts.settings(n_steps, seed + m)
        rng = random.Random(seed + m)
        if teacher.prefix_layers:
            windows = pack_windows(part_docs, opts.seq_len, rng)  # [N, S+1]
            prefix = teacher_prefix(teacher, windows, folder, progress=opts.progress)  # [N, S, E]
            it = cached_batches(windows, prefix, opts.batch_size, rng)
        else:
            it = batches(part_docs, opts.batch_size, opts.seq_len, rng)
        part = ddd.describe(texts, idx, m, settings.drafts, settings.ddd)
        losses = train_loop(
            trained,
            it,
            lambda step, b, m=m, s=trained, t=teacher: distill_loss(
                s, t, step_seed(seed, m, step), b.to(dev), settings.loss
            ),
            ts,
            run_dir=folder,
            progress=opts.progress,
            desc=f"draft{m}",
            fingerprint={"kind": "distill", "settings": asdict(settings), "partition": part["digest"]},
        )
        if vocab is None:
            save_lm(student.cpu().to(getattr(torch, opts.dtype)), tok, folder)
        else:  # no tokenizer: the draft's ids are S's positions; draft_vocab.json maps them
            student.cpu().to(getattr(torch, opts.dtype)).save_pretrained(str(folder), safe_serialization=True)
            vocab.save(folder)
        drop(folder)  # the teacher-prefix cache, if any
        hashes = part.pop("hashes")
        (folder / PARTITION).write_text(_json({**part, "hashes": hashes}))
        write_record(
            folder,
            {
                "kind": "draft",
                "finished": True,
                "parameters": count_parameters(folder),
                "shape": None if settings.init else asdict(shape),
                "init": settings.init,
                "seed": seed + m,
                "teacher": str(Path(target_dir).resolve()),
                "settings": {
                    **ts.as_dict(),
                    "epochs": opts.epochs,
                    "device": str(dev),
                    "dtype": opts.dtype,
                    "source": settings.source,
                    "max_new_tokens": settings.max_new_tokens,
                    "teacher_dtype": settings.teacher_dtype,
                    "embed_init": settings.embed_init,
                    "loss": _describe_loss(settings.loss, vocab is not None),
                },
                "draft_vocab": None
                if vocab is None
                else {
                    "size": vocab.size,
                    "rule": "special tokens + most frequent ids of the training data",
                    "coverage": coverage(part_docs, vocab),
                },
                "osd": {**teacher.describe(), "ensemble": members if settings.osd == "ensemble" else []},
                "ddd": part,
                "corpus": corpus,
                "loss": loss_summary(losses),
            },
        )
        finish_run(folder)
    return out


def _describe_loss(loss: str, reduced: bool) -> str:
    teacher = "teacher renormalized over S" if reduced else "teacher"
    pair = f"{teacher} || draft" if loss == "forward" else f"draft || {teacher}"
    return f"KL({pair}), " + ("S = the draft vocabulary" if reduced else "full vocabulary")


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=1) + "\n"
