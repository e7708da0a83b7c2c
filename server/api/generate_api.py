"""`POST /generate`: epispec's own API, the token events as they are.

Non-streamed: `{"id", "model", "text", "tokens": [{token_id, text, logprob, bias, variance,
eu, flagged[, p_error][, eu_corrected][, top_logprobs]}], "summary": {mean_eu, max_eu, num_tokens,
num_flagged, flagged[, p_wrong]},
"finish_reason", "usage", "stats"}`. Streamed (`"stream": true`): one SSE `data:` event per
token with the token fields, then one final event `{"summary", "finish_reason", "usage",
"stats"}`; an error after the stream started arrives as a final `{"error": {...}}` event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Depends, Request

from server.api.context import ServerContext, ready_context
from server.api.errors import APIError, engine_failure
from server.api.prompts import text_prompt_ids
from server.api.pump import new_request_id, until_disconnected
from server.api.schemas import GenerateRequest
from server.api.sse import EventStreamResponse, event
from server.api.usage import Summary, corrected, number, usage
from server.api.validation import check_top_logprobs, effective_max_tokens, sampling_params
from server.bundle import EuCorrection
from server.engine.types import Finished, GenerationItem, TokenEvent

router = APIRouter()


def token_fields(ev: TokenEvent, with_top: bool, correction: EuCorrection | None = None) -> dict:
    out = ev.as_dict()
    for key in ("logprob", "bias", "variance", "eu"):
        out[key] = number(out[key])
    out.update(corrected(ev, correction))
    if with_top:
        out["top_logprobs"] = [
            {"token_id": t.token_id, "text": t.text, "logprob": number(t.logprob)} for t in ev.top_logprobs
        ]
    return out


def final_fields(fin: Finished, summary: Summary) -> dict:
    return {
        "summary": summary.as_dict(),
        "finish_reason": fin.finish_reason,
        "usage": usage(fin),
        "stats": fin.stats.as_dict(),
    }


@router.post("/generate")
async def generate(req: GenerateRequest, request: Request, ctx: ServerContext = Depends(ready_context)):
    if (req.prompt is None) == (req.prompt_token_ids is None):
        raise APIError(
            "Give exactly one of 'prompt' and 'prompt_token_ids'.",
            param="prompt",
            code="missing_field" if req.prompt is None else "invalid_value",
        )
    if req.prompt is not None:
        param, ids = "prompt", text_prompt_ids(ctx.engine.tokenizer, req.prompt)
    else:
        param, ids = "prompt_token_ids", list(req.prompt_token_ids)
    max_tokens = effective_max_tokens(ctx, ids, req.max_tokens, param)
    top = check_top_logprobs(ctx, req.logprobs, "logprobs")
    params = sampling_params(ctx, req, max_tokens, top)
    request_id = new_request_id("gen")
    items = ctx.generations.run("/generate", request_id, ids, params)
    if req.stream:
        return EventStreamResponse(_events(items, top > 0, Summary(ctx.p_wrong), ctx.eu_correction))

    async def collect() -> dict:
        tokens, summary = [], Summary(ctx.p_wrong)
        async with aclosing(items):
            async for item in items:
                if isinstance(item, Finished):
                    if item.finish_reason == "error":
                        raise engine_failure(item)
                    text = "".join(t["text"] for t in tokens)
                    return {
                        "id": request_id,
                        "model": ctx.engine.model_name,
                        "text": text,
                        "tokens": tokens,
                        **final_fields(item, summary),
                    }
                summary.add(item)
                tokens.append(token_fields(item, top > 0, ctx.eu_correction))

    return await until_disconnected(request, collect())


async def _events(
    items: AsyncIterator[GenerationItem],
    with_top: bool,
    summary: Summary,
    correction: EuCorrection | None = None,
) -> AsyncIterator[bytes]:
    try:
        async for item in items:
            if isinstance(item, Finished):
                if item.finish_reason == "error":
                    yield event(engine_failure(item).body())
                else:
                    yield event(final_fields(item, summary))
                return
            summary.add(item)
            yield event(token_fields(item, with_top, correction))
    except Exception as exc:  # never a broken stream without a word
        yield event(
            APIError(f"Streaming failed: {type(exc).__name__}.", status_code=500, type="server_error").body()
        )
    finally:
        await items.aclose()
