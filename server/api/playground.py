"""`GET /` and `GET /playground`: the playground page (see `server/playground`).

The page is served without the API key (it is static and holds nothing secret: a browser
cannot send a bearer key when it navigates); its requests to the API carry the key the user
types into it. Also here: `generation_record`, one generation in the shape the page renders,
for `epispec generate --html`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from server.api.generate_api import final_fields, token_fields
from server.api.usage import Summary
from server.engine.types import Finished, FlagThresholds, TokenEvent
from server.playground import live_page

router = APIRouter()


@router.get("/", include_in_schema=False)
@router.get("/playground", include_in_schema=False)
async def playground() -> HTMLResponse:
    page = live_page()
    return HTMLResponse(
        page.html,
        headers={
            "Content-Security-Policy": page.csp,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


def generation_record(
    *,
    model: str,
    prompt: str,
    tokens: list[TokenEvent],
    finished: Finished,
    thresholds: FlagThresholds,
    settings: dict,
) -> dict:
    """What `server.playground.static_page` renders: the events `POST /generate` would have
    streamed for this generation, with the model, prompt, thresholds and settings."""
    summary = Summary()
    for ev in tokens:
        summary.add(ev)
    events = [token_fields(ev, False) for ev in tokens]
    events.append(final_fields(finished, summary))
    return {
        "model": model,
        "prompt": prompt,
        "thresholds": {"eu": thresholds.eu, "bias": thresholds.bias, "variance": thresholds.variance},
        "settings": settings,
        "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "events": events,
    }
