"""A client that leaves mid-stream aborts its request: the engine's running count returns
to zero long before the generation would have ended, and the request counts as "abort"."""

from __future__ import annotations

import httpx
import pytest

from tests.server.api.live import wait_until
from tests.server.api.test_errors import request_count

STREAMS = [
    ("/generate", {"prompt": "Question: Tom has 3 apples", "max_tokens": 60, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count"}],
                              "max_tokens": 60, "stream": True}),
]


@pytest.mark.parametrize("path,body", STREAMS, ids=[p for p, _ in STREAMS])
def test_disconnect_mid_stream_aborts_in_the_engine(server, engine, path, body):
    aborted = request_count(httpx.get(f"{server.url}/metrics").text, path, "abort")
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", path, json={**body, "temperature": 1.0, "seed": 3}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert engine.num_running() == 1
        # leaving the block closes the connection with the stream unfinished
    assert wait_until(lambda: engine.num_running() == 0, timeout=30)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert request_count(metrics, path, "abort") == aborted + 1
    # and the server goes on serving
    r = httpx.post(f"{server.url}/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
