"""The target's own chat responses, generated with vLLM: the synthetic data that DDD partitions.

Park et al. (arXiv 2602.01956) distil the drafts on data the target itself produced, which is also
the distribution the drafts meet when serving. For every question of a corpus the target answers
the chat-formatted prompt (the tokenizer's chat template, as `/v1/chat/completions` applies it);
even-numbered questions are answered greedily, odd-numbered ones sampled at `temperature`
(the served mix of both). Each output line holds the exact token ids, so distillation sees the
sequence the server would see, never a re-tokenization:

    {"question", "prompt_ids", "output_ids", "temperature", "seed" (the engine's), "finish_reason"}

Generation runs in chunks appended to the output file; a rerun skips the questions already there,
so an interrupted run resumes. Errors: ValueError for bad settings; FileNotFoundError for a
missing corpus.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    """Token ids of one user turn with the generation prompt, as the chat endpoint builds them."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question.strip()}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reference_records(records: list[dict], tokenizer) -> list[dict]:
    """GSM8K records as responses-file lines whose response is the human reference answer
    (`"origin": "reference"`), closed by the chat template's end of turn: contexts the target did
    not write, for when generating enough of its own responses is too slow."""
    end = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenize=False
    ).rsplit("y", 1)[1]
    return [
        {
            "question": r["question"],
            "prompt_ids": chat_prompt_ids(tokenizer, r["question"]),
            "output_ids": tokenizer(r["answer"].strip() + end, add_special_tokens=False)["input_ids"],
            "origin": "reference",
        }
        for r in records
    ]


def read_responses(path: str | Path) -> list[dict]:
    """The lines of a responses file (`.jsonl`, or gzip-compressed `.jsonl.gz`)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Responses file '{p}' does not exist.")
    if p.suffix == ".gz":
        import gzip

        text = gzip.decompress(p.read_bytes()).decode()
    else:
        text = p.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def response_docs(records: list[dict]) -> list[list[int]]:
    """Each record as one document of token ids: prompt + response (the response ends with the
    end-of-turn token when the target finished)."""
    return [[*r["prompt_ids"], *r["output_ids"]] for r in records]


def generate_responses(
    target: str | Path,
    questions: list[str],
    out: str | Path,
    *,
    max_tokens: int = 320,
    temperature: float = 1.0,
    seed: int = 0,
    chunk: int = 256,
    kv_cache_gib: int = 4,
    dtype: str = "float32",
    progress: bool = True,
) -> dict:
    """Append the target's responses to `questions` to the JSONL file `out`; returns a summary.

    Needs vLLM (the serving engine); on a machine without it, generate elsewhere and copy the file.
    `dtype`: the target's compute dtype in vLLM (float32 is ~2x faster than bfloat16 on CPUs
    without native bf16 matmul, and what the server uses on every CPU: docs/determinism.md)."""
    if max_tokens < 1 or not 0 <= temperature <= 2:
        raise ValueError("max_tokens must be >= 1 and temperature within [0, 2].")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {r["question"] for r in read_responses(out)} if out.is_file() else set()
    todo = [(i, q) for i, q in enumerate(questions) if q not in done]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    from tqdm import tqdm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from server.engine.models import load_tokenizer

    tok = load_tokenizer(target)
    llm = LLM(model=str(target), dtype=dtype, seed=seed, max_model_len=1024)
    bar = tqdm(total=len(todo), desc="responses", unit="q", disable=not progress)
    tokens = 0
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        prompts = [chat_prompt_ids(tok, q) for _, q in part]
        # the engine's global seed fixes the run (requests carry no seeds of their own)
        params = [
            SamplingParams(max_tokens=max_tokens, temperature=0.0 if i % 2 == 0 else temperature)
            for i, _ in part
        ]
        results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        with out.open("a") as f:
            for (_, q), p, sp, res in zip(part, prompts, params, results, strict=True):
                o = res.outputs[0]
                tokens += len(o.token_ids)
                f.write(
                    json.dumps(
                        {
                            "question": q,
                            "prompt_ids": p,
                            "output_ids": list(o.token_ids),
                            "temperature": sp.temperature,
                            "seed": seed,
                            "finish_reason": o.finish_reason,
                        }
                    )
                    + "\n"
                )
        bar.update(len(part))
        bar.set_postfix(tokens=tokens)
    bar.close()
    return {"out": str(out), "questions": len(questions), "generated": len(todo), "tokens": tokens}
