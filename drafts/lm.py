"""Small causal LMs of a standard architecture (Llama) built and trained from scratch.

Saved folders load in transformers and vLLM alike. head_dim is kept at 64: vLLM's CPU
attention refuses smaller heads ("Unsupported CPU attention configuration").
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from drafts.training import TrainSettings, train_loop


@dataclass(frozen=True)
class LMShape:
    hidden: int = 128
    layers: int = 2
    heads: int = 2
    intermediate: int = 256
    max_positions: int = 512

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.hidden // self.heads < 32:
            raise ValueError(
                f"hidden ({self.hidden}) / heads ({self.heads}) must be an integer head_dim >= 32 "
                "(vLLM's CPU attention needs head_dim 64 or more to be safe)"
            )


def build_lm(shape: LMShape, tokenizer, seed: int, vocab_size: int | None = None):
    """A randomly initialized Llama of `shape` (vocabulary: the tokenizer's, or `vocab_size`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def encode_corpus(texts: list[str], tokenizer) -> list[list[int]]:
    """Each text as [bos] + ids + [eos]."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [[bos, *tokenizer(t, add_special_tokens=False)["input_ids"], eos] for t in texts]


def batches(docs: list[list[int]], batch_size: int, seq_len: int, rng: random.Random):
    """Endless batches of packed windows over the shuffled stream of documents. [B, seq_len+1]"""
    stream: list[int] = []
    while True:
        order = list(range(len(docs)))
        rng.shuffle(order)
        for i in order:
            stream.extend(docs[i])
            while len(stream) >= batch_size * (seq_len + 1):
                chunk = stream[: batch_size * (seq_len + 1)]
                del stream[: batch_size * (seq_len + 1)]
                yield torch.tensor(chunk).view(batch_size, seq_len + 1)


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy. batch [B, S+1]"""
    logits = model(input_ids=batch[:, :-1]).logits  # [B, S, V]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def train_lm(
    model,
    docs: list[list[int]],
    steps: int,
    *,
    batch_size: int = 16,
    seq_len: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = False,
    run_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    device: str | torch.device = "cpu",
) -> list[float]:
    """Plain LM training (resumable from `run_dir`); returns the loss of every step."""
    settings = TrainSettings(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        seed=seed,
        checkpoint_every=checkpoint_every,
    )
    model.to(device)
    it = batches(docs, batch_size, seq_len, random.Random(seed))
    return train_loop(
        model,
        it,
        lambda _step, b: lm_loss(model, b.to(device)),
        settings,
        run_dir=run_dir,
        fingerprint={"kind": "lm"},
        progress=progress,
        desc="target",
    )


def save_lm(model, tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


@torch.no_grad()
def generate_batch(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int, **kwargs
) -> list[list[int]]:
    """New token ids for each prompt (left-padded batch; cut after eos). kwargs go to generate."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    dev = next(model.parameters()).device
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in prompts], device=dev)  # [B, L]
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts], device=dev)  # [B, L]
    gen = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=eos,
        **kwargs,
    )  # [B, L + T]
    out = []
    for row in gen[:, width:].tolist():
        row = row[: row.index(eos) + 1] if eos in row else row
        out.append([t for t in row if t != pad])
    return out
