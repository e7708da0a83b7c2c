"""GSM8K calculator annotations as a check of what a model learned: `<<48/2=24>>24`.

test_loss       mean next-token cross-entropy (nats/token) over the documents
calc_accuracy   teacher-forced: the gold text up to the '=' inside each `<<expr=`, then
                greedy decoding up to '>>'; correct when the number equals the gold result
format          free greedy answers for the first `format_samples` questions: the fraction
                with a '####' final answer, the fraction with at least one annotation, and
                among their annotations the fraction whose result equals eval(expr)
"""

from __future__ import annotations

import ast
import operator
import re

import torch

from drafts.corpus import format_example, format_prompt
from drafts.lm import encode_corpus, generate_batch
from server.engine.models import load_causal_lm, load_tokenizer

ANNOTATION = re.compile(r"<<([^=<>]*)=([^<>]*)>>")
_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
    ast.Pow: operator.pow,
}


def to_number(text: str) -> float | None:
    try:
        return float(text.strip().replace(",", "").rstrip("."))
    except ValueError:
        return None


def evaluate_expression(expr: str) -> float | None:
    """Value of an arithmetic expression (numbers, + - * / ** and parentheses), else None."""

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            if isinstance(node.op, ast.Pow) and abs(ev(node.right)) > 64:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError("not arithmetic")

    try:
        return float(ev(ast.parse(expr.replace(",", "").strip(), mode="eval").body))
    except (ValueError, SyntaxError, ZeroDivisionError, OverflowError, TypeError):
        return None


def same_number(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


def annotation_prefixes(question: str, answer: str) -> list[tuple[str, str]]:
    """(text up to and including the '=' of each annotation, gold result)."""
    text = format_example(question, answer)
    return [(text[: m.start(2)], m.group(2)) for m in ANNOTATION.finditer(text)]


@torch.no_grad()
def test_loss(model, tokenizer, texts: list[str], batch_size: int = 16) -> tuple[float, int]:
    """(mean nats per predicted token, tokens) over whole documents."""
    docs = encode_corpus(texts, tokenizer)
    total, n = 0.0, 0
    for i in range(0, len(docs), batch_size):
        chunk = docs[i : i + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([d + [tokenizer.pad_token_id] * (width - len(d)) for d in chunk])  # [B, L]
        labels = torch.tensor([d[1:] + [-100] * (width - len(d)) for d in chunk])  # [B, L-1]
        logits = model(input_ids=ids[:, :-1]).logits.float()  # [B, L-1, V]
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100
        )
        total, n = total + loss.item(), n + int((labels != -100).sum())
    return total / max(n, 1), n


def calc_accuracy(model, tokenizer, records: list[dict], batch_size: int = 32) -> tuple[int, int]:
    """(correct, annotations), teacher-forced up to each annotation's '='."""
    items = [p for r in records for p in annotation_prefixes(r["question"], r["answer"])]
    correct = 0
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        prompts = [
            [tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]] for p, _ in chunk
        ]
        outs = generate_batch(model, tokenizer, prompts, max_new_tokens=10, do_sample=False)
        for (_, gold), out in zip(chunk, outs, strict=True):
            pred = tokenizer.decode(out, skip_special_tokens=True).split(">>")[0]
            correct += same_number(to_number(pred), to_number(gold))
    return correct, len(items)


def format_check(
    model, tokenizer, records: list[dict], max_new_tokens: int = 256, batch_size: int = 16
) -> dict:
    texts = []
    for i in range(0, len(records), batch_size):
        prompts = [
            [
                tokenizer.bos_token_id,
                *tokenizer(format_prompt(r["question"]), add_special_tokens=False)["input_ids"],
            ]
            for r in records[i : i + batch_size]
        ]
        outs = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=False)
        texts += [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    notes = [m for t in texts for m in ANNOTATION.finditer(t)]
    consistent = sum(same_number(to_number(m.group(2)), evaluate_expression(m.group(1))) for m in notes)
    return {
        "samples": len(texts),
        "with_final_answer": sum("####" in t for t in texts) / max(len(texts), 1),
        "with_annotation": sum(bool(ANNOTATION.search(t)) for t in texts) / max(len(texts), 1),
        "annotations": len(notes),
        "annotations_correct": consistent / max(len(notes), 1),
        "example": texts[0] if texts else None,
    }


def evaluate_model(model_dir: str, records: list[dict], format_samples: int = 50) -> dict:
    records = [r for r in records if "question" in r and "answer" in r]
    if not records:
        raise ValueError("calc-accuracy needs GSM8K-format records (question and answer fields).")
    tok = load_tokenizer(model_dir)
    tok.padding_side = "left"
    model = load_causal_lm(model_dir)
    loss, tokens = test_loss(model, tok, [format_example(r["question"], r["answer"]) for r in records])
    correct, total = calc_accuracy(model, tok, records)
    return {
        "model": str(model_dir),
        "documents": len(records),
        "test_loss": loss,
        "tokens": tokens,
        "annotations": total,
        "calc_correct": correct,
        "calc_accuracy": correct / max(total, 1),
        "format": format_check(model, tok, records[:format_samples]) if format_samples else None,
    }
