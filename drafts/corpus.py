"""Text corpora: JSONL files (GSM8K format or a `text` field; gzipped or not), `datasets` names,
and a synthetic arithmetic corpus in GSM8K's style for tests and offline demos.

GSM8K itself (MIT licence) ships with the project in `data/gsm8k/` (`GSM8K`): `train.jsonl.gz`,
`test.jsonl.gz` and its LICENSE, the default data of `epispec bench` and `epispec eval`.

GSM8K lines are `{"question": ..., "answer": "... <<48/2=24>>24 ...\n#### 72"}`; a document is
`format_example(question, answer)` so that the model learns the question/answer layout and the
calculator annotations.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path
from typing import TextIO

# GSM8K's train and test splits as shipped with the project (data/gsm8k/README.md)
GSM8K = Path(__file__).resolve().parents[1] / "data" / "gsm8k"

QUESTION_PREFIX = "Question: "
ANSWER_PREFIX = "\nAnswer: "


def format_prompt(question: str) -> str:
    return f"{QUESTION_PREFIX}{question.strip()}{ANSWER_PREFIX}"


def format_example(question: str, answer: str) -> str:
    return format_prompt(question) + answer.strip()


def open_text(path: str | Path) -> TextIO:
    """A text file for reading, gunzipped on the fly when its name ends in `.gz`."""
    return (
        gzip.open(path, "rt", encoding="utf-8") if str(path).endswith(".gz") else open(path, encoding="utf-8")
    )


def split_file(folder: str | Path, split: str) -> Path:
    """A folder's `{split}.jsonl`, else its `{split}.jsonl.gz` (the plain name when neither exists)."""
    plain = Path(folder) / f"{split}.jsonl"
    gz = plain.with_name(plain.name + ".gz")
    return gz if not plain.exists() and gz.exists() else plain


def load_records(source: str | Path, split: str = "train") -> list[dict]:
    """Records from a JSONL file (`.jsonl.gz` too), a folder holding `{split}.jsonl` or
    `{split}.jsonl.gz`, or a `datasets` name."""
    path = Path(source)
    if path.is_dir():
        path = split_file(path, split)
    if path.exists():
        with open_text(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    elif path.suffix in (".jsonl", ".json", ".gz") or str(source).startswith((".", "/")):
        raise FileNotFoundError(f"Corpus file '{source}' does not exist.")
    else:
        records = _load_dataset(str(source), split)
    if not records:
        raise ValueError(f"Corpus '{source}' is empty.")
    return records


def _load_dataset(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as exc:
        raise FileNotFoundError(
            f"'{name}' is neither a file nor a folder, and the `datasets` package is not installed "
            "to load it by name."
        ) from exc
    config = "main" if name.endswith("gsm8k") else None
    return [dict(r) for r in datasets.load_dataset(name, config, split=split)]


def record_text(record: dict) -> str:
    if "question" in record and "answer" in record:
        return format_example(record["question"], record["answer"])
    if "text" in record:
        return str(record["text"])
    raise ValueError(f"Record has neither question/answer nor text fields: keys {sorted(record)}")


def load_texts(source: str | Path, split: str = "train", limit: int | None = None) -> list[str]:
    texts = [record_text(r) for r in load_records(source, split)]
    return texts[:limit] if limit else texts


# --- a synthetic GSM8K-style corpus (no files, no network)

_NAMES = ["Ann", "Bob", "Cal", "Dee", "Eli", "Fay", "Gus", "Hal"]
_ITEMS = ["apples", "pens", "cards", "eggs", "books", "coins"]


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    """GSM8K-shaped records with exact calculator annotations, e.g.
    'Ann has 3 apples and buys 4 more. How many apples does Ann have?' -> '<<3+4=7>>7 ... #### 7'."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        a, b = rng.randint(2, 20), rng.randint(2, 9)
        if rng.random() < 0.5:
            q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have?"
            r, expr = a + b, f"{a}+{b}"
        else:
            q = f"{name} has {a} bags with {b} {item} each. How many {item} does {name} have?"
            r, expr = a * b, f"{a}*{b}"
        ans = f"{name} has {expr} = <<{expr}={r}>>{r} {item}.\n#### {r}"
        out.append({"question": q, "answer": ans})
    return out


# --- identities: documents and corpora are recorded by hashes, never by position


def text_hash(text: str) -> str:
    """A document's identity: the first 16 hex digits of sha256 of its UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def corpus_digest(texts: list[str]) -> str:
    """Order-independent identity of a set of documents."""
    return hashlib.sha256("\n".join(sorted(text_hash(t) for t in texts)).encode()).hexdigest()[:16]


def describe_corpus(source: str | Path, split: str, texts: list[str]) -> dict:
    return {"source": str(source), "split": split, "documents": len(texts), "digest": corpus_digest(texts)}
