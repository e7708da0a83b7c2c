"""The sequences that are scored: for every question, the reference solution (teacher-forced) and
the served target's own greedy generation, with token and answer labels for the latter.

Prompts are `format_prompt(question)` without its trailing space, and solutions start with a
space, so prompt + solution tokenize as the training documents did (byte-level BPE splits before
spaces). With `chat` (a pretrained chat target) the question is one user turn instead
(`drafts.responses.chat_prompt_ids`, as `/v1/chat/completions` builds it), generation ending at
its end of turn. The scored tokens are the solution's, end-of-sequence excluded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from drafts.corpus import format_prompt, load_records, synthetic_records
from drafts.responses import chat_prompt_ids
from measure.evaluation.labels import answer_wrong, token_labels


@dataclass
class Sequence:
    question: int
    kind: str  # "reference" or "generated"
    ids: list[int]
    start: int  # first scored index
    text: str  # the scored solution text
    labels: list[int | None] = field(default_factory=list)  # per scored token (generated only)
    answer_wrong: int | None = None


def split_records(data: str | Path | None, recipe) -> tuple[list[dict], list[dict], list[dict], str]:
    """(train, validation, test) records and a description of the source. Validation questions are
    held-out train records; test is the test split. Without data: three synthetic corpora."""
    if data is None:
        train = synthetic_records(recipe.train_records, seed=0)
        seen = {r["question"] for r in train}
        val = [r for r in synthetic_records(4 * recipe.val_questions, seed=1) if r["question"] not in seen]
        seen |= {r["question"] for r in val}
        test = [r for r in synthetic_records(4 * recipe.test_questions, seed=2) if r["question"] not in seen]
        return train, val[: recipe.val_questions], test[: recipe.test_questions], "synthetic"
    records = load_records(data, "train")
    train = records[: recipe.train_records]
    val = records[recipe.train_records : recipe.train_records + recipe.val_questions]
    if len(val) < recipe.val_questions:  # all train records used for training: hold out the tail
        train, val = records[: -recipe.val_questions], records[-recipe.val_questions :]
    test = load_records(data, "test")[: recipe.test_questions]
    return train, val, test, str(data)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def build(
    records: list[dict], target, tokenizer, max_new_tokens: int, desc: str, chat: bool = False
) -> list[Sequence]:
    """The reference and generated sequences of `records`; `chat`: prompts through the chat template."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = []
    for i, r in enumerate(tqdm(records, desc=desc, unit="q", dynamic_ncols=True)):
        if chat:
            prompt, answer = chat_prompt_ids(tokenizer, r["question"]), r["answer"].strip()
        else:
            prompt, answer = (
                [bos, *_encode(tokenizer, format_prompt(r["question"]).rstrip())],
                " " + r["answer"].strip(),
            )
        out.append(Sequence(i, "reference", prompt + _encode(tokenizer, answer), len(prompt), answer))
        gen = target.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt) :].tolist()
        gen = gen[: gen.index(eos)] if eos in gen else gen
        if not gen:
            continue
        pieces = [tokenizer.decode([t]) for t in gen]
        text = "".join(pieces)
        out.append(
            Sequence(
                i,
                "generated",
                prompt + gen,
                len(prompt),
                text,
                token_labels(pieces, 0, text),
                answer_wrong(text, r["answer"]),
            )
        )
    return out
