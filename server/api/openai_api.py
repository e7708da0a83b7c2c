"""OpenAI-compatible `POST /v1/completions` and `POST /v1/chat/completions`, streamed or not.

Uncertainty rides in extra fields that the unmodified `openai` client keeps (as attributes
of the returned objects, or in `model_extra`):
- `choices[i].uncertainty = {"tokens": [{token, token_id, eu, bias, variance[, eu_corrected], flagged}],
  "summary": {mean_eu, max_eu, num_tokens, num_flagged, flagged[, p_wrong]}}` — in a stream, each chunk
  carries its own tokens and the last chunk (with `finish_reason`) the summary;
- chat `logprobs.content[j].uncertainty = {eu, bias, variance[, eu_corrected], flagged}` when logprobs
  are asked. `eu_corrected` (nats) is there when the served bundle has an `eu_correction`
  (`server.bundle.EuCorrection`).
Token strings are the text each token adds to the output, so they concatenate to it.
`finish_reason` keeps the spec's values (strict clients reject others): a stop on uncertainty is
`"stop"` with `stop_reason: "uncertainty"` (vLLM's field for why a choice stopped; null otherwise).
What is honoured and refused: docs/openai-compat.md.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Depends, Request

from server.api.context import ServerContext, check_model, ready_context
from server.api.errors import APIError, engine_failure
from server.api.prompts import chat_prompt_ids, text_prompt_ids
from server.api.pump import new_request_id, until_disconnected
from server.api.schemas import PROMPT_FORMS, ChatCompletionRequest, CompletionRequest, OpenAIFields
from server.api.sse import DONE, EventStreamResponse, event
from server.api.usage import Summary, calibrated, corrected, number, usage
from server.api.validation import check_top_logprobs, effective_max_tokens, sampling_params
from server.bundle import EuCorrection
from server.engine.types import Finished, FinishReason, GenerationItem, TokenEvent

router = APIRouter()
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI API's and vLLM's default for /v1/completions


def uncertainty(ev: TokenEvent, correction: EuCorrection | None = None) -> dict:
    return {
        "eu": number(ev.eu),
        "bias": number(ev.bias),
        "variance": number(ev.variance),
        **corrected(ev, correction),
        **calibrated(ev),
        "flagged": ev.flagged,
    }


def uncertainty_token(ev: TokenEvent, correction: EuCorrection | None = None) -> dict:
    return {"token": ev.text, "token_id": ev.token_id, **uncertainty(ev, correction)}


def chat_logprob(ev: TokenEvent, correction: EuCorrection | None = None) -> dict:
    def entry(text: str, lp: float) -> dict:
        return {"token": text, "logprob": number(lp), "bytes": list(text.encode())}

    return {
        **entry(ev.text, ev.logprob),
        "top_logprobs": [entry(t.text, t.logprob) for t in ev.top_logprobs],
        "uncertainty": uncertainty(ev, correction),
    }


def completion_logprobs(events: list[TokenEvent], offset: int = 0) -> dict:
    """The legacy completions shape: parallel lists."""
    offsets = []
    for ev in events:
        offsets.append(offset)
        offset += len(ev.text)
    return {
        "tokens": [ev.text for ev in events],
        "token_logprobs": [number(ev.logprob) for ev in events],
        # null, not a list of empty maps, when no top log-probs were asked (logprobs: 0)
        "top_logprobs": (
            [{t.text: number(t.logprob) for t in ev.top_logprobs} for ev in events]
            if any(ev.top_logprobs for ev in events)
            else None
        ),
        "text_offset": offsets,
    }


def finish_fields(reason: FinishReason) -> dict:
    """The spec's `finish_reason` and our `stop_reason` saying why, for a finished choice."""
    if reason == "uncertainty":
        return {"finish_reason": "stop", "stop_reason": "uncertainty"}
    return {"finish_reason": reason, "stop_reason": None}


class _Format:
    """How one endpoint shapes its choices; `chat` picks between the two OpenAI shapes."""

    def __init__(self, chat: bool, logprobs: bool, correction: EuCorrection | None = None) -> None:
        self.chat, self.logprobs, self.correction = chat, logprobs, correction
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def choice(self, events: list[TokenEvent], text_offset: int = 0, first: bool = False) -> dict:
        """A choice (streamed: a delta) holding these events."""
        text = "".join(ev.text for ev in events)
        lp = None
        if self.logprobs:
            lp = (
                {"content": [chat_logprob(ev, self.correction) for ev in events]}
                if self.chat
                else completion_logprobs(events, text_offset)
            )
        body = {"text": text}
        if self.chat:
            body = {"delta": {"role": "assistant", "content": text} if first else {"content": text}}
        return {
            "index": 0,
            **body,
            "logprobs": lp,
            "finish_reason": None,
            "stop_reason": None,
            "uncertainty": {"tokens": [uncertainty_token(ev, self.correction) for ev in events]},
        }


async def _respond(
    ctx: ServerContext,
    request: Request,
    req: OpenAIFields,
    fmt: _Format,
    endpoint: str,
    ids: list[int],
    max_tokens: int,
    top: int,
    prefix: str,
):
    params = sampling_params(ctx, req, max_tokens, top)
    request_id = new_request_id(prefix)
    items = ctx.generations.run(endpoint, request_id, ids, params)
    head = {"id": request_id, "created": int(time.time()), "model": ctx.engine.model_name}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventStreamResponse(_stream(items, fmt, head, include_usage, Summary(ctx.p_wrong)))

    async def collect() -> dict:
        events: list[TokenEvent] = []
        summary = Summary(ctx.p_wrong)
        async with aclosing(items):
            async for item in items:
                if isinstance(item, Finished):
                    if item.finish_reason == "error":
                        raise engine_failure(item)
                    choice = fmt.choice(events)
                    if fmt.chat:
                        del choice["delta"]
                        choice["message"] = {"role": "assistant", "content": "".join(e.text for e in events)}
                    choice.update(finish_fields(item.finish_reason))
                    choice["uncertainty"]["summary"] = summary.as_dict()
                    return {**head, "object": fmt.object, "choices": [choice], "usage": usage(item)}
                summary.add(item)
                events.append(item)

    return await until_disconnected(request, collect())


async def _stream(
    items: AsyncIterator[GenerationItem], fmt: _Format, head: dict, include_usage: bool, summary: Summary
) -> AsyncIterator[bytes]:
    offset, first = 0, True
    chunk = {**head, "object": fmt.chunk_object}
    try:
        async for item in items:
            if isinstance(item, Finished):
                if item.finish_reason == "error":
                    yield event(engine_failure(item).body())
                    break
                last = fmt.choice([], offset, first)
                last.update(finish_fields(item.finish_reason), logprobs=None)
                last["uncertainty"]["summary"] = summary.as_dict()
                yield event({**chunk, "choices": [last], **({"usage": None} if include_usage else {})})
                if include_usage:
                    yield event({**chunk, "choices": [], "usage": usage(item)})
                break
            summary.add(item)
            yield event(
                {
                    **chunk,
                    "choices": [fmt.choice([item], offset, first)],
                    **({"usage": None} if include_usage else {}),
                }
            )
            offset += len(item.text)
            first = False
    except Exception as exc:  # never a broken stream without a word
        yield event(
            APIError(f"Streaming failed: {type(exc).__name__}.", status_code=500, type="server_error").body()
        )
    finally:
        await items.aclose()
    yield DONE


def check_supported(req: OpenAIFields) -> None:
    problem = req.unsupported()
    if problem:
        raise APIError(f"Unsupported option: {problem[1]}.", param=problem[0], code="unsupported")


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, ctx: ServerContext = Depends(ready_context)):
    check_model(ctx, req.model)
    check_supported(req)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise APIError(
                f"Give one prompt per request: {PROMPT_FORMS}.", param="prompt", code="unsupported"
            )
        prompt = prompt[0]
    ids = text_prompt_ids(ctx.engine.tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    top = check_top_logprobs(ctx, req.logprobs or 0, "logprobs")
    max_tokens = effective_max_tokens(ctx, ids, req.max_tokens, "prompt", COMPLETIONS_DEFAULT_MAX_TOKENS)
    fmt = _Format(chat=False, logprobs=req.logprobs is not None, correction=ctx.eu_correction)
    return await _respond(ctx, request, req, fmt, "/v1/completions", ids, max_tokens, top, "cmpl")


@router.post("/v1/chat/completions")
async def chat_completions(
    req: ChatCompletionRequest, request: Request, ctx: ServerContext = Depends(ready_context)
):
    check_model(ctx, req.model)
    check_supported(req)
    ids = chat_prompt_ids(ctx.engine.tokenizer, req.messages)
    top = check_top_logprobs(ctx, req.top_logprobs or 0, "top_logprobs") if req.logprobs else 0
    given = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = effective_max_tokens(ctx, ids, getattr(req, given), "messages", max_tokens_param=given)
    fmt = _Format(chat=True, logprobs=req.logprobs, correction=ctx.eu_correction)
    return await _respond(ctx, request, req, fmt, "/v1/chat/completions", ids, max_tokens, top, "chatcmpl")
