"""Fixtures shared by the engine tests."""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture(scope="module")
def loop():
    """One event loop per test module: an engine started on it lives as long as the module."""
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()
