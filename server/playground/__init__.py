"""The playground: self-contained HTML pages that colour every token by its uncertainty.

Sources in this package: `page.css` (styles), `render.js` (the one token renderer: colour scale,
legend, tooltips, summary, eu chart), `client.js` (the live page's form and streaming),
`static.js` (renders an embedded generation), the `live.html` / `static.html` templates and
`aside.html` (the side panel and tooltip both templates hold).

- `live_page()`: the page served at `GET /` and `GET /playground`.
- `static_page(record)`: one generation as a standalone file (`epispec generate --html`).

Both inline their style and scripts (no build step, no CDN: they work offline) and carry a
Content-Security-Policy that allows exactly those inline blocks (by hash) and, for the live
page, requests to its own origin only.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Page:
    html: str
    csp: str  # the Content-Security-Policy to send with it


def _source(name: str) -> str:
    return (HERE / name).read_text(encoding="utf-8")


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _csp(style: str, script: str, connect: str) -> str:
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {_hash(script)}",
            f"style-src {_hash(style)}",
            f"connect-src {connect}",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
        ]
    )


def _fill(template: str, **parts: str) -> str:
    """Replaces every `{{name}}` in one pass: text put in is never scanned again."""
    parts = {"aside": _source("aside.html"), **parts}
    return re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m.group(1)], template)


def _script(*names: str) -> str:
    script = "\n".join(_source(n) for n in names)
    if "</script" in script.lower():
        raise ValueError("an inlined script must not contain '</script'")
    return script


@lru_cache(maxsize=1)
def live_page() -> Page:
    """The playground page (with the CSP header to send: only same-origin requests)."""
    style, script = _source("page.css"), _script("render.js", "client.js")
    csp = _csp(style, script, "'self'") + "; frame-ancestors 'none'"
    return Page(_fill(_source("live.html"), style=style, script=script), csp)


def json_for_html(data: object) -> str:
    """JSON that is safe inside a <script type="application/json"> element."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def static_page(record: dict) -> str:
    """A standalone page for one generation. `record`: {"model", "prompt", "events" (the
    token events and final event of `POST /generate`), optional "thresholds" ({"eu", ...},
    marked on the legend and chart), "settings" (shown as given), "created"}."""
    style, script = _source("page.css"), _script("render.js", "static.js")
    tokens = [e for e in record["events"] if "summary" not in e]
    settings = ", ".join(f"{k} {v}" for k, v in record.get("settings", {}).items() if v is not None)
    parts = {
        "csp": _csp(style, script, "'none'"),
        "title": "epispec generation",
        "model": html.escape(f"model {record.get('model', '?')}"),
        "settings": html.escape(settings),
        "prompt": html.escape(record.get("prompt", "")),
        "text": html.escape(record.get("prompt", "") + "".join(t["text"] for t in tokens)),
        "footer": html.escape(
            f"Written by epispec generate --html{', ' + record['created'] if record.get('created') else ''}."
        ),
        "style": style,
        "script": script,
        "data": json_for_html(record),
    }
    return _fill(_source("static.html"), **parts)
