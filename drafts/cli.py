"""`epispec drafts …`: turn a corpus and a target into drafts that estimate its epistemic
uncertainty, and package them as a bundle.

    tokenizer      train a byte-level BPE tokenizer on a corpus
    target         train a small causal LM (Llama, head_dim >= 32)
    ensemble       train N independently seeded targets (deep-ensemble ground truth)
    respond        the target's own chat responses to the corpus's questions, with vLLM
    distill        train M drafts from a target with OSD and DDD (or their ablations)
    bundle         write a bundle folder: target, drafts, tokenizer, bundle.json
    calc-accuracy  test loss and calculator-annotation accuracy on GSM8K-format data

Corpora (`--data`): a JSONL file (GSM8K `question`/`answer` or `text` lines), a folder with
`{split}.jsonl`, or a `datasets` name where a network exists. Every subcommand prints its errors
as one plain sentence and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys

SUBCOMMANDS = ["tokenizer", "target", "ensemble", "respond", "distill", "bundle", "calc-accuracy"]


def _data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--data", required=required, help="JSONL file, folder with {split}.jsonl, or datasets name"
    )
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=int, default=None, help="use only the first N records")


def _train_args(p: argparse.ArgumentParser, lr: float) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data (ignored with --steps)")
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    g.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (0: none)")
    g.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the saved weights",
    )
    g.add_argument("--no-progress", action="store_true")


def _shape_args(p: argparse.ArgumentParser, hidden: int, layers: int, heads: int, inter: int) -> None:
    g = p.add_argument_group("architecture (Llama)")
    g.add_argument("--hidden", type=int, default=hidden)
    g.add_argument("--layers", type=int, default=layers)
    g.add_argument(
        "--heads", type=int, default=heads, help="hidden/heads is head_dim; keep it >= 64 for vLLM CPU"
    )
    g.add_argument("--intermediate", type=int, default=inter)
    g.add_argument("--max-positions", type=int, default=1024)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="drafts_command", metavar="SUBCOMMAND", required=True)
    _tokenizer_parser(sub)
    _targets_parser(sub)
    _respond_parser(sub)
    _distill_parser(sub)
    _bundle_parser(sub)
    _calc_parser(sub)


def _tokenizer_parser(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    _data_args(p)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--out", required=True)


def _targets_parser(sub) -> None:
    for name, help_text in (("target", "train a target LM"), ("ensemble", "train N seeded targets")):
        p = sub.add_parser(name, help=help_text)
        _data_args(p)
        p.add_argument("--tokenizer", required=True, help="tokenizer folder")
        p.add_argument("--out", required=True)
        if name == "ensemble":
            p.add_argument("-n", "--members", type=int, default=5)
        else:
            p.add_argument("--init", default=None, help="continue training this model (same tokenizer)")
        _shape_args(p, 256, 4, 4, 704)
        _train_args(p, lr=3e-3)


def _respond_parser(sub) -> None:
    p = sub.add_parser("respond", help="the target's chat responses to the corpus's questions (vLLM)")
    _data_args(p)
    p.add_argument("--target", required=True, help="target folder")
    p.add_argument("--out", required=True, help="JSONL file (appended to; a rerun resumes)")
    p.add_argument("--max-tokens", type=int, default=320)
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="for odd-numbered questions; even-numbered ones are answered greedily",
    )
    p.add_argument("--seed", type=int, default=0, help="also shuffles the questions before --limit")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="the target's compute dtype in vLLM (float32: ~2x faster than bf16 on CPUs without bf16 matmul)",
    )
    p.add_argument("--kv-cache-gib", type=int, default=4, help="vLLM-CPU KV cache space (GiB)")
    p.add_argument("--no-progress", action="store_true")


def _distill_parser(sub) -> None:
    p = sub.add_parser("distill", help="train M drafts from a target (OSD + DDD)")
    _data_args(p)
    p.add_argument("--target", required=True, help="target folder (the teacher)")
    p.add_argument("--out", required=True, help="drafts go to OUT/draft{m}")
    p.add_argument("-m", "--drafts", type=int, default=4, help="number of drafts M")
    p.add_argument(
        "--osd",
        default="lowrank",
        choices=["lowrank", "dropout", "ensemble", "none"],
        help="teacher instance per step: low-rank weight noise, dropout, an ensemble member, "
        "or none (the fixed target: the no-OSD ablation)",
    )
    p.add_argument("--ensemble", nargs="+", default=[], metavar="DIR", help="members for --osd ensemble")
    p.add_argument(
        "--noise",
        type=float,
        default=0.1,
        help="lowrank: relative noise scale; dropout: drop probability (default 0.1)",
    )
    p.add_argument("--rank", type=int, default=4, help="lowrank: rank of the weight noise")
    p.add_argument(
        "--noise-layers",
        type=int,
        default=0,
        help="lowrank: noise in the last K decoder layers only (0: all). K > 0 computes the other "
        "layers once per training window (cached in the draft's folder), so each step runs K layers",
    )
    p.add_argument("--no-ddd", action="store_true", help="all drafts see all data (the no-DDD ablation)")
    p.add_argument(
        "--source",
        default="corpus",
        choices=["corpus", "synthetic", "responses"],
        help="distil on the corpus, on continuations sampled from the target for its prompts, "
        "or on the target's chat responses in --data (a file from `epispec drafts respond`)",
    )
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=0,
        metavar="N",
        help="reduced output vocabulary: the special tokens + the N most frequent ids of the "
        "data (0: the target's whole vocabulary)",
    )
    p.add_argument(
        "--embed-init",
        default="random",
        choices=["random", "target"],
        help="reduced drafts: random embedding, or the target's rows of S projected",
    )
    p.add_argument(
        "--teacher-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="dtype of the teacher's forward passes (bfloat16 pays only with native bf16 matmul: "
        "on an AVX2-only CPU it ran ~10x slower than float32)",
    )
    p.add_argument(
        "--loss",
        default="forward",
        choices=["forward", "reverse"],
        help="forward: KL(teacher || draft), mass-covering; reverse: KL(draft || teacher), "
        "mode-seeking, the direction of the served bias KL(mixture || target)",
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="synthetic: continuation length")
    p.add_argument("--init", default=None, help="start every draft from this small model (same tokenizer)")
    p.add_argument(
        "--kind",
        default="llama",
        choices=["llama", "feature"],
        help="llama: independent small Llamas; feature: EAGLE-style drafts that read the target's "
        "hidden states (one decoder layer each, initialised from the target's last; "
        "docs/feature-drafts.md). feature uses --noise, --rank, --noise-layers (default 2 for "
        "it), --no-ddd, --draft-vocab and the training options; not --source synthetic",
    )
    p.add_argument(
        "--feature-weight", type=float, default=0.1, help="feature drafts: weight of the feature regression"
    )
    p.add_argument(
        "--heldout-every",
        type=int,
        default=20,
        help="feature drafts: hold every N-th document out of training, for the held-out fit (0: none)",
    )
    _shape_args(p, 64, 1, 1, 176)
    _train_args(p, lr=3e-3)


def _bundle_parser(sub) -> None:
    p = sub.add_parser("bundle", help="write a bundle folder")
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--target", help="target model folder (copied into the bundle)")
    t.add_argument(
        "--target-source",
        metavar="NAME",
        help="a known pretrained target (`epispec models list`), named by source in "
        "bundle.json instead of copied; prepared in the model cache if missing",
    )
    p.add_argument(
        "--draft",
        action="extend",
        nargs="+",
        default=[],
        metavar="DIR",
        required=True,
        help="draft folders, in order (`--draft A B`, or repeated: `--draft A --draft B`)",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--thresholds", default=None, help="JSON file of calibrated flag thresholds")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="convert weights to this dtype (default: keep)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    p.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=None,
        metavar="K",
        help="the drafts' best k (measure it with epispec bench), serve's default for this bundle",
    )


def _calc_parser(sub) -> None:
    p = sub.add_parser("calc-accuracy", help="test loss and calculator accuracy of a model")
    _data_args(p)
    p.set_defaults(split="test")
    p.add_argument("--model", default=None, help="model folder (default: the active bundle's target)")
    p.add_argument(
        "--bundle", default=None, help="bundle folder (default: EPISPEC_BUNDLE or the default bundle)"
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    from server.bundle import BundleError
    from server.engine.models import ModelFolderError

    handler = {
        "tokenizer": _tokenizer,
        "target": _target,
        "ensemble": _target,
        "respond": _respond,
        "distill": _distill,
        "bundle": _bundle,
        "calc-accuracy": _calc,
    }[args.drafts_command]
    try:
        result = handler(args)
    except (ValueError, FileNotFoundError, ModelFolderError, BundleError) as exc:
        print(f"epispec drafts {args.drafts_command}: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0


# --- handlers


def _corpus(args):
    from drafts.corpus import describe_corpus, load_texts

    texts = load_texts(args.data, args.split, args.limit)
    return texts, describe_corpus(args.data, args.split, texts)


def _tokenizer(args) -> dict:
    from drafts.tokenizer import train_tokenizer

    texts, corpus = _corpus(args)
    tok = train_tokenizer(texts, args.vocab_size, args.out)
    return {"tokenizer": args.out, "vocab_size": len(tok), "corpus": corpus}


def _shape(args):
    from drafts.lm import LMShape

    return LMShape(
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        intermediate=args.intermediate,
        max_positions=args.max_positions,
    )


def _options(args):
    from drafts.training import RunOptions

    return RunOptions(
        epochs=args.epochs,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        device=args.device,
        checkpoint_every=args.checkpoint_every,
        dtype=args.dtype,
        progress=not args.no_progress,
    )


def _target(args) -> dict:
    from drafts.targets import train_ensemble, train_target

    texts, corpus = _corpus(args)
    if args.drafts_command == "ensemble":
        members = train_ensemble(
            texts,
            corpus,
            args.tokenizer,
            args.out,
            args.members,
            _shape(args),
            _options(args),
            base_seed=args.seed,
        )
        return {"members": [str(m) for m in members]}
    record = train_target(
        texts, corpus, args.tokenizer, args.out, _shape(args), _options(args), seed=args.seed, init=args.init
    )
    return {"target": args.out, "parameters": record["parameters"], "loss": record["loss"]}


def _respond(args) -> dict:
    import random

    from drafts.corpus import load_records
    from drafts.responses import generate_responses

    questions = [r["question"] for r in load_records(args.data, args.split) if "question" in r]
    if not questions:
        raise ValueError(f"Corpus '{args.data}' has no `question` fields to answer.")
    random.Random(args.seed).shuffle(questions)
    return generate_responses(
        args.target,
        questions[: args.limit or None],
        args.out,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        kv_cache_gib=args.kv_cache_gib,
        dtype=args.dtype,
        progress=not args.no_progress,
    )


def _responses(args) -> tuple[list[str], list[list[int]], dict]:
    """(questions, documents of token ids, the corpus record) of a responses file (--data)."""
    from drafts.corpus import describe_corpus
    from drafts.responses import read_responses, response_docs

    records = read_responses(args.data)[: args.limit or None]
    texts = [r["question"] for r in records]
    return texts, response_docs(records), describe_corpus(args.data, "responses", texts)


def _distill(args) -> dict:
    if args.kind == "feature":
        return _distill_features(args)
    from drafts.distill import DistillSettings, distill_drafts

    docs = None
    if args.source == "responses":
        texts, docs, corpus = _responses(args)
    else:
        texts, corpus = _corpus(args)
    settings = DistillSettings(
        drafts=args.drafts,
        osd=args.osd,
        noise=args.noise,
        noise_layers=args.noise_layers,
        rank=args.rank,
        ensemble=tuple(args.ensemble),
        ddd=not args.no_ddd,
        source=args.source,
        max_new_tokens=args.max_new_tokens,
        init=args.init,
        draft_vocab=args.draft_vocab,
        embed_init=args.embed_init,
        teacher_dtype=args.teacher_dtype,
        loss=args.loss,
    )
    out = distill_drafts(
        texts,
        corpus,
        args.target,
        args.out,
        settings,
        _shape(args),
        _options(args),
        seed=args.seed,
        docs=docs,
    )
    return {"drafts": [str(d) for d in out]}


def _distill_features(args) -> dict:
    from drafts.feature_distill import FeatureSettings, distill_feature_drafts

    if args.source == "synthetic" or args.osd != "lowrank" or args.loss != "forward" or args.init:
        raise ValueError(
            "--kind feature trains with OSD lowrank, the forward KL, from scratch, on --source "
            "responses or corpus (not --source synthetic, --osd other than lowrank, --loss reverse, --init)."
        )
    if args.source == "responses":
        texts, docs, corpus = _responses(args)
    else:
        from drafts.lm import encode_corpus
        from server.engine.models import load_tokenizer

        texts, corpus = _corpus(args)
        docs = encode_corpus(texts, load_tokenizer(args.target))
    settings = FeatureSettings(
        drafts=args.drafts,
        noise=args.noise,
        rank=args.rank,
        noise_layers=args.noise_layers or 2,
        ddd=not args.no_ddd,
        draft_vocab=args.draft_vocab,
        feature_weight=args.feature_weight,
        heldout_every=args.heldout_every,
    )
    out = distill_feature_drafts(
        texts, docs, corpus, args.target, args.out, settings, _options(args), seed=args.seed
    )
    return {"drafts": [str(d) for d in out]}


def _bundle(args) -> dict:
    from drafts.bundle import write_bundle

    thresholds = None
    if args.thresholds:
        from pathlib import Path

        path = Path(args.thresholds)
        if not path.is_file():
            raise FileNotFoundError(f"Thresholds file '{path}' does not exist.")
        thresholds = json.loads(path.read_text())
    source = None
    if args.target_source:
        from server.hub.source import SOURCES

        if args.target_source not in SOURCES:
            raise ValueError(f"Unknown target source '{args.target_source}': known are {sorted(SOURCES)}.")
        source = SOURCES[args.target_source]
    manifest = write_bundle(
        args.target,
        args.draft,
        args.out,
        thresholds=thresholds,
        dtype=args.dtype,
        force=args.force,
        target_source=source,
        num_speculative_tokens=args.num_speculative_tokens,
    )
    return {"bundle": args.out, "bytes": manifest["bytes"]}


def _calc(args) -> dict:
    from drafts.calc import evaluate_model
    from server.bundle import load_bundle

    model = args.model or str(load_bundle(args.bundle).target)
    from drafts.corpus import load_records

    records = (
        load_records(args.data, args.split)[: args.limit]
        if args.limit
        else load_records(args.data, args.split)
    )
    return evaluate_model(model, records)
