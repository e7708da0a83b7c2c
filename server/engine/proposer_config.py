"""The proposer's settings: one typed record, made by `VllmEngine` in the API process and read
by `EnsembleProposer` inside vLLM's worker.

vLLM hands a custom proposer nothing but its `VllmConfig`; `additional_config` is the one place
there for a plugin's own settings (a JSON-able dict, hashed into vLLM's config). This module is
the only writer and reader of our key in it, and the only place with defaults: a missing or
unknown key is an error at start-up, not a silent default in the worker.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from server.engine.speculation_policy import DEFAULT_SPECULATION, SPECULATION_POLICIES, Speculation
from server.engine.types import BIAS_SOURCES, DEFAULT_BIAS_SOURCE, BiasSource

KEY = "epispec"  # our key in vLLM's additional_config
DRAFT_DTYPES = ("float32", "bfloat16", "float16")
DRAFT_DTYPE_CHOICES = ("auto", *DRAFT_DTYPES)  # what users may name; "auto": `resolve_draft_dtype`
DEFAULT_DRAFT_DTYPE = "float32"  # the arithmetic the exact-EU tests hold to


def resolve_draft_dtype(name: str) -> str:
    """The drafts' dtype for `name` (one of DRAFT_DTYPE_CHOICES): auto is bfloat16 on a GPU and on
    a CPU with bf16 dot-product units (avx512_bf16), float32 on other CPUs (bf16 matmuls are
    emulated there, several times slower). Raises ValueError for an unknown name."""
    if name == "auto":
        import torch

        bf16 = torch.cuda.is_available() or torch.cpu._is_avx512_bf16_supported()
        return "bfloat16" if bf16 else "float32"
    if name not in DRAFT_DTYPES:
        raise ValueError(f"draft_dtype must be {' or '.join(DRAFT_DTYPE_CHOICES)}, got '{name}'.")
    return name


@dataclass(frozen=True)
class ProposerConfig:
    """What the proposer in vLLM's worker needs.

    drafts: the draft folders (all of one kind)
    channel: the side channel's address (`eu_channel`), where records are published
    top_n: q̄ entries shipped per record for bias source "logprobs" (−1: all of q̄)
    bias: "worker" (exact KL(q̄ ‖ p) from the step's raw logits, in the worker) or "logprobs"
    dtype: the drafts' weights and KV cache
    kv_tokens: the drafts' KV pool in tokens (None: max_num_seqs × max_model_len)
    speculation: how many tokens each row proposes per step: "adaptive" (the policy's choice
        under load, `speculation_policy.Adaptive`), "fixed" (always k) or "off" (none: the drafts
        only score)
    channel_keys: the side channel's CURVE keys for a tcp:// channel (`ChannelKeys.publisher_keys`;
        left out of the repr, never logged)"""

    drafts: tuple[str, ...]
    channel: str
    top_n: int = 64
    bias: BiasSource = DEFAULT_BIAS_SOURCE
    dtype: str = "float32"
    kv_tokens: int | None = None
    speculation: Speculation = DEFAULT_SPECULATION
    channel_keys: dict | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.drafts:
            raise ValueError("ProposerConfig.drafts: at least one draft folder is needed.")
        if self.bias not in BIAS_SOURCES:
            raise ValueError(
                f"ProposerConfig.bias must be one of {', '.join(BIAS_SOURCES)}, not '{self.bias}'."
            )
        if self.dtype not in DRAFT_DTYPES:
            raise ValueError(f"draft_dtype must be {', '.join(DRAFT_DTYPES)}, got '{self.dtype}'.")
        if self.speculation not in SPECULATION_POLICIES:
            raise ValueError(
                f"speculation must be one of {', '.join(SPECULATION_POLICIES)}, not '{self.speculation}'."
            )
        if self.kv_tokens is not None and self.kv_tokens < 1:
            raise ValueError(f"ProposerConfig.kv_tokens must be positive, not {self.kv_tokens}.")
        object.__setattr__(self, "drafts", tuple(str(d) for d in self.drafts))

    def replace(self, **changes) -> ProposerConfig:
        return ProposerConfig(**{**asdict(self), **changes})

    def to_additional_config(self) -> dict:
        """{KEY: {...}}, for `AsyncEngineArgs(additional_config=...)`."""
        d = asdict(self)
        d["drafts"] = list(self.drafts)
        return {KEY: d}

    @classmethod
    def from_vllm_config(cls, vllm_config) -> ProposerConfig:
        """The record `to_additional_config` wrote. Raises ValueError naming what is missing or
        unknown (a mismatched epispec between the API process and vLLM's worker)."""
        raw = (getattr(vllm_config, "additional_config", None) or {}).get(KEY)
        if not isinstance(raw, dict):
            raise ValueError(f"vLLM's additional_config has no '{KEY}' settings for the epispec proposer.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown epispec proposer settings: {', '.join(unknown)}.")
        return cls(**raw)
