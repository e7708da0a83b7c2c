"""Fixtures for the drafts tests: a tiny GSM8K-format corpus file and the session's tiny models."""

from __future__ import annotations

import json

import pytest

from drafts.corpus import record_text, synthetic_records


@pytest.fixture(scope="module", autouse=True)
def _few_threads(few_threads):
    """One thread for every drafts test, set before the module-scoped fixtures that train."""


@pytest.fixture(scope="session")
def records() -> list[dict]:
    return synthetic_records(120, seed=3)


@pytest.fixture(scope="session")
def texts(records) -> list[str]:
    return [record_text(r) for r in records]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("corpus") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
