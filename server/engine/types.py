"""The engine interface: sampling parameters, flag thresholds, token events, the engine protocol.

Every engine (the exact PyTorch `reference` engine and the production `vllm` engine) turns
`(request_id, prompt_token_ids, SamplingParams)` into an async stream of `TokenEvent`s ended
by one `Finished`. The API layer formats that stream; it never sees an engine's internals.

Terms, per generated position t (natural log, nats; see `uncertainty.py`):
- `bias`     = KL(q̄ ‖ p): the drafts' mixture q̄ against the target p
- `variance` = (1/M) Σ_m KL(q_m ‖ q̄): the drafts' disagreement (generalized JSD)
- `eu`       = bias + variance
All three are computed on the raw distributions (temperature 1, no top-p, no penalties),
whatever the request's sampling settings. They are `None` when the engine has no drafts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args, runtime_checkable

from server.engine.p_error import PErrorRule

FinishReason = Literal["stop", "length", "uncertainty", "abort", "error"]

# Where the vllm engine's bias KL(q̄ ‖ p) comes from: "worker", exact, from the target's raw
# logits inside vLLM's worker; "logprobs", the tail-bucket bound from the target's top-K log-probs
BiasSource = Literal["worker", "logprobs"]
BIAS_SOURCES: tuple[str, ...] = get_args(BiasSource)

# --- defaults, defined here once (flags, settings and engines take them from here)
DEFAULT_EU_THRESHOLD = 0.5  # nats; used where neither settings nor the bundle give one
DEFAULT_NUM_SPECULATIVE_TOKENS = 3  # k: tokens the drafts propose per round
DEFAULT_TARGET_LOGPROBS = 20  # bias source "logprobs": the target's top-K; −1 = whole vocabulary
DEFAULT_BIAS_SOURCE: BiasSource = "worker"


@dataclass(frozen=True)
class FlagThresholds:
    """A token is flagged when eu > `eu` (and, where set, bias > `bias` or variance > `variance`).

    With `p_error` (the served bundle's rule) every token gets its p_error, and while `by_p_error`
    holds a token is flagged when p_error > the rule's threshold instead; explicit eu/bias/variance
    thresholds (settings, flags, a request's `thresholds`) turn `by_p_error` off."""

    eu: float = DEFAULT_EU_THRESHOLD
    bias: float | None = None
    variance: float | None = None
    p_error: PErrorRule | None = None
    by_p_error: bool = True

    def judge(
        self, bias: float | None, variance: float | None, eu: float | None, logprob: float | None
    ) -> tuple[float | None, bool]:
        """(p_error or None, flagged) of one token."""
        p = self.p_error.probability(eu, bias, variance, logprob) if self.p_error is not None else None
        if p is not None and self.by_p_error:
            return p, p > self.p_error.threshold
        return p, self.flags(bias, variance, eu)

    def flags(self, bias: float | None, variance: float | None, eu: float | None) -> bool:
        if eu is None:
            return False
        if eu > self.eu:
            return True
        if self.bias is not None and bias is not None and bias > self.bias:
            return True
        return self.variance is not None and variance is not None and variance > self.variance


MAX_TEMPERATURE = 2.0  # the OpenAI API's range, and vLLM's: [0, 2]


class InvalidRequest(ValueError):
    """A request an engine cannot run, found before it holds any state for it; `param` names
    the request field at fault (the API answers 400 naming it)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class JsonOutput:
    """Constrain the output to JSON by a grammar: an object matching `schema` (a JSON Schema),
    or any JSON object when `schema` is None. Engines that cannot constrain refuse it."""

    schema: dict | None = None


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the engine. Validation of client input happens in the API layer;
    `validate()` applies the same ranges in every engine (raises InvalidRequest)."""

    max_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0  # how many top log-probs of the (processed) target to return per token
    thresholds: FlagThresholds = field(default_factory=FlagThresholds)
    stop_on_uncertainty: bool = False
    json_output: JsonOutput | None = None  # the OpenAI API's response_format

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidRequest(
                f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}", "temperature"
            )
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.logprobs < 0:
            raise InvalidRequest(f"logprobs must be >= 0, got {self.logprobs}", "logprobs")


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenEvent:
    """One emitted token with its uncertainty. `logprob` is the target's raw log-probability
    of the token (temperature 1, no top-p), as are `top_logprobs`; `bias`/`variance`/`eu`
    (nats) are on the raw distributions too."""

    token_id: int
    text: str  # incremental detokenized text this token adds (may be "" mid UTF-8 sequence)
    logprob: float
    bias: float | None
    variance: float | None
    eu: float | None
    flagged: bool
    top_logprobs: tuple[TopLogprob, ...] = ()
    p_error: float | None = None  # the bundle's calibrated probability that the token is wrong

    def as_dict(self) -> dict:
        """The JSON shape shared by `epispec generate --jsonl` and `POST /generate` (`p_error`
        only when the served bundle has a p_error rule)."""
        out = {
            "token_id": self.token_id,
            "text": self.text,
            "logprob": self.logprob,
            "bias": self.bias,
            "variance": self.variance,
            "eu": self.eu,
            "flagged": self.flagged,
        }
        if self.p_error is not None:
            out["p_error"] = self.p_error
        return out


@dataclass
class EngineStats:
    """Counters that make reuse measurable: a draft forward pass is one batched step of the
    whole ensemble (all M drafts), a target forward pass is one scoring of k+1 positions.
    `eu_seconds` is the wall time the engine spent computing bias/variance/eu (0.0 where an
    engine does not measure it); it feeds the `epispec_eu_seconds_total` metric."""

    target_forward_passes: int = 0
    draft_forward_passes: int = 0
    proposed: int = 0
    accepted: int = 0
    eu_seconds: float = 0.0

    def add(self, other: EngineStats) -> None:
        self.target_forward_passes += other.target_forward_passes
        self.draft_forward_passes += other.draft_forward_passes
        self.proposed += other.proposed
        self.accepted += other.accepted
        self.eu_seconds += other.eu_seconds

    def as_dict(self) -> dict[str, int]:
        return {
            "target_forward_passes": self.target_forward_passes,
            "draft_forward_passes": self.draft_forward_passes,
            "proposed": self.proposed,
            "accepted": self.accepted,
        }


@dataclass(frozen=True)
class Finished:
    """The last item of every generation stream."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    stats: EngineStats
    error: str | None = None  # set when finish_reason == "error"


GenerationItem = TokenEvent | Finished


@runtime_checkable
class Engine(Protocol):
    """What the API layer needs from an engine. One instance per server process."""

    name: str  # "reference" or "vllm"
    model_name: str  # the id served as `model` in the OpenAI API
    max_model_len: int  # prompt + generated tokens must fit
    num_drafts: int  # M; 0 = plain decoding, uncertainty fields are None

    @property
    def tokenizer(self):  # a transformers PreTrainedTokenizerBase
        ...

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest for a request this engine cannot run (ranges, an empty prompt,
        the engine's own checks); holds no state. `generate` runs it first too."""
        ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationItem]:
        """Stream token events, then one `Finished`. Closing the iterator early (client gone)
        must abort the request and free its state."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def num_running(self) -> int:
        """Requests currently holding engine state (0 when idle: tests check that aborts free it)."""
        ...

    def is_healthy(self) -> bool: ...

    async def shutdown(self) -> None: ...
