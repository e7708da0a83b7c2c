"""Fixtures for the measurement tests: the API tests' reference engine over the tiny models
(the load test's server)."""

from __future__ import annotations

from tests.server.api.conftest import engine  # noqa: F401  (a fixture)
