"""API test fixtures: one reference engine per session over the tiny models, and a live
server (real uvicorn, loopback, free port) per module."""

from __future__ import annotations

import httpx
import pytest

from server.app import create_app
from server.config import Settings
from server.engine.reference import ReferenceEngine
from tests.server.api.live import LiveServer


@pytest.fixture(scope="session")
def engine(tiny_models) -> ReferenceEngine:
    import torch

    torch.set_num_threads(2)
    return ReferenceEngine(tiny_models["target"], tiny_models["drafts"], model_name="tiny", max_model_len=96)


@pytest.fixture(scope="module")
def server(engine):
    settings = Settings(max_request_bytes=4096, default_max_tokens=8)
    with LiveServer(create_app(settings, engine)) as live:
        yield live


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
