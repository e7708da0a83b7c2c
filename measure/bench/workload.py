"""The benchmark's prompts: GSM8K test questions, read as JSONL (one `{"question": ...}` a line,
gzipped or not; by default the test split shipped in data/gsm8k/).

The prompt format must equal `drafts.corpus.format_prompt` (the drafts were distilled on it);
`server` never imports `drafts`, so a test compares the two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from drafts.corpus import GSM8K, open_text
from server.engine.types import DEFAULT_NUM_SPECULATIVE_TOKENS, DEFAULT_TARGET_LOGPROBS

DEFAULT_PROMPTS = GSM8K / "test.jsonl.gz"  # shipped with the project (data/gsm8k/README.md)


def format_prompt(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer: "


def load_questions(path: str | Path = DEFAULT_PROMPTS, n: int | None = None, chat: bool = False) -> list[str]:
    """The first `n` questions of a JSONL file, in file order (the same for every config):
    formatted as `format_prompt`, or bare with `chat` (the runner applies the chat template)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Prompt file '{path}' does not exist: pass --prompts FILE (JSONL with a 'question' field)."
        )
    out = []
    with open_text(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if "question" not in record:
                    raise ValueError(f"Prompt file '{path}' has a line without a 'question' field.")
                out.append(record["question"].strip() if chat else format_prompt(record["question"]))
            if n is not None and len(out) >= n:
                break
    if not out:
        raise ValueError(f"Prompt file '{path}' holds no questions.")
    return out


def prompt_budget(max_model_len: int, max_tokens: int, k: int) -> int:
    """Prompt tokens that leave room for `max_tokens` outputs in every config: the vllm engine
    keeps 2k+1 positions spare for its proposer (see vllm_engine.py)."""
    return max_model_len - max_tokens - (2 * k + 1) - 1


def fit_prompt(ids: list[int], budget: int) -> list[int]:
    """The last `budget` tokens: a long question loses its start, never the "Answer: " cue."""
    if budget < 1:
        raise ValueError(f"no room for a prompt: the token budget is {budget}")
    return ids[-budget:]


@dataclass(frozen=True)
class Workload:
    """What every config runs: the same prompts, at each temperature (0 = greedy), a fixed
    number of output tokens each (`ignore_eos`, so every request emits exactly `max_tokens`)."""

    prompts: list[str]
    max_tokens: int
    concurrencies: tuple[int, ...]
    requests_per_level: int  # requests per concurrency level, at least the concurrency
    eu_prompts: int  # prompts whose per-token EU is checked against exact values (epispec)
    num_speculative_tokens: int = DEFAULT_NUM_SPECULATIVE_TOKENS
    target_logprobs: int = DEFAULT_TARGET_LOGPROBS
    temperatures: tuple[float, ...] = (0.0,)  # each level runs at each; > 0 samples
    chat: bool = False  # prompts are questions sent as one user turn through the chat template
    seeded: bool = True  # each request carries a fixed seed (a T > 0 run is reproducible)

    def level_prompts(self, concurrency: int) -> list[str]:
        n = max(self.requests_per_level, concurrency)
        return [self.prompts[i % len(self.prompts)] for i in range(n)]

    def as_dict(self) -> dict:
        return {
            "prompts": self.prompts,
            "max_tokens": self.max_tokens,
            "concurrencies": list(self.concurrencies),
            "requests_per_level": self.requests_per_level,
            "eu_prompts": self.eu_prompts,
            "num_speculative_tokens": self.num_speculative_tokens,
            "target_logprobs": self.target_logprobs,
            "temperatures": list(self.temperatures),
            "chat": self.chat,
            "seeded": self.seeded,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Workload:
        return cls(
            d["prompts"],
            d["max_tokens"],
            tuple(d["concurrencies"]),
            d["requests_per_level"],
            d["eu_prompts"],
            d["num_speculative_tokens"],
            d["target_logprobs"],
            tuple(d.get("temperatures", (0.0,))),
            bool(d.get("chat", False)),
        )


def is_chat_target(target: str | Path) -> bool:
    """A pretrained target prepared by `epispec models prepare` (it carries epispec_source.json)
    is a chat model: the benchmark then sends its questions through the chat template."""
    return (Path(target) / "epispec_source.json").is_file()
