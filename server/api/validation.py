"""Request checks that need the engine or the settings: prompt length against the context,
`max_tokens` (or `max_completion_tokens`), top log-probs, threshold bounds; and the engine's `SamplingParams` from a
request. Each refusal is an `APIError` (400) that names the field."""

from __future__ import annotations

from dataclasses import replace

from server.api.context import ServerContext
from server.api.errors import APIError
from server.api.schemas import SamplingFields
from server.engine.types import FlagThresholds, SamplingParams


def effective_max_tokens(
    ctx: ServerContext,
    prompt_ids: list[int],
    max_tokens: int | None,
    prompt_param: str,
    default: int | None = None,
    max_tokens_param: str = "max_tokens",
) -> int:
    """max_tokens to use (when the request gives none: `default`, else the server's
    `default_max_tokens`), or a 400 naming the prompt or the field that gave max_tokens."""
    engine = ctx.engine
    limit = engine.max_model_len
    if not prompt_ids:
        raise APIError(f"'{prompt_param}' must not be empty.", param=prompt_param, code="empty_prompt")
    if any(not 0 <= t < len(engine.tokenizer) for t in prompt_ids):
        raise APIError(
            f"'{prompt_param}' holds token ids outside the vocabulary.",
            param=prompt_param,
            code="invalid_token_id",
        )
    room = limit - len(prompt_ids)
    if room < 1:
        raise APIError(
            f"The prompt is {len(prompt_ids)} tokens long; this model accepts at most {limit} "
            f"tokens in all, so the prompt must be shorter than {limit}.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        return min(default or ctx.settings.default_max_tokens, room)
    if max_tokens > room:
        raise APIError(
            f"{max_tokens_param} is {max_tokens}, but with a prompt of {len(prompt_ids)} tokens this "
            f"model ({limit} tokens in all) can generate at most {room}.",
            param=max_tokens_param,
            code="context_length_exceeded",
        )
    return max_tokens


def check_top_logprobs(ctx: ServerContext, n: int, param: str) -> int:
    if n > ctx.settings.max_logprobs:
        raise APIError(
            f"'{param}' is {n}; this server returns at most {ctx.settings.max_logprobs}.",
            param=param,
            code="too_many_logprobs",
        )
    return n


def thresholds_for(ctx: ServerContext, req: SamplingFields) -> FlagThresholds:
    base = ctx.thresholds
    if req.thresholds is None:
        return base
    lo, hi = ctx.settings.min_threshold, ctx.settings.max_threshold
    values = {}
    for name in ("eu", "bias", "variance"):
        v = getattr(req.thresholds, name)
        if v is not None and not (lo <= v <= hi):
            raise APIError(
                f"'thresholds.{name}' must lie within [{lo}, {hi}], got {v}.",
                param=f"thresholds.{name}",
                code="threshold_out_of_bounds",
            )
        values[name] = getattr(base, name) if v is None else v
    return replace(base, **values, by_p_error=False)  # the request's thresholds flag, not p_error


def sampling_params(
    ctx: ServerContext, req: SamplingFields, max_tokens: int, logprobs: int = 0
) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=req.stop_strings(),
        logprobs=logprobs,
        thresholds=thresholds_for(ctx, req),
        stop_on_uncertainty=req.stop_on_uncertainty,
        ignore_eos=req.ignore_eos,
        json_output=req.json_output(),
    )
