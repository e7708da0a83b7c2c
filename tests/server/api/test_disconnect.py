"""A client that leaves mid-stream aborts its request: the engine's running count returns
to zero long before the generation would have ended, and the request counts as "abort"."""

from __future__ import annotations

import httpx
import pytest

from tests.server.api.live import wait_until
from tests.server.api.paced import Paced
from tests.server.api.test_errors import request_count

STREAMS = [
    ("/generate", {"prompt": "Question: Tom has 3 apples", "max_tokens": 60, "stream": True}),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Count"}], "max_tokens": 60, "stream": True},
    ),
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


WHOLE = [
    ("/generate", {"prompt": "Question: Tom has 3 apples"}),
    ("/v1/completions", {"prompt": "Question: Tom has 3 apples"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count"}]}),
]


@pytest.fixture(scope="module")
def paced_server(engine):
    from server.app import create_app
    from server.config import Settings
    from tests.server.api.live import LiveServer

    paced = Paced(engine, delay=0.1)
    with LiveServer(create_app(Settings(), paced)) as live:
        yield live, paced


@pytest.mark.parametrize("path,body", WHOLE, ids=[p for p, _ in WHOLE])
def test_disconnect_during_a_whole_response_aborts_in_the_engine(paced_server, path, body):
    """Not streamed: 60 tokens at 0.1 s each would take 6 s; the client leaves after 0.5 s and
    the request is aborted at once (counted as "abort"), not run to the end."""
    live, paced = paced_server
    aborted = request_count(httpx.get(f"{live.url}/metrics").text, path, "abort")
    body = {**body, "max_tokens": 60, "ignore_eos": True, "temperature": 1.0, "seed": 3}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}{path}", json=body, timeout=httpx.Timeout(60, read=0.5))
    assert wait_until(lambda: paced.num_running() == 0, timeout=3)
    assert request_count(httpx.get(f"{live.url}/metrics").text, path, "abort") == aborted + 1
    r = httpx.post(f"{live.url}{path}", json={**body, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
