"""Shared fixtures: tiny trained models (built once per session), one torch thread."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.tiny_models import build_near_tie_target, build_tiny_models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    root = os.environ.get("EPISPEC_TEST_MODELS")
    folder = Path(root) if root else tmp_path_factory.mktemp("tiny_models")
    folder.mkdir(parents=True, exist_ok=True)
    return build_tiny_models(folder)


@pytest.fixture(scope="session")
def near_tie_target(tiny_models, tmp_path_factory) -> str:
    """A deeper, wider target on the tiny tokenizer whose greedy path passes near ties
    (`tests.tiny_models.build_near_tie_target`); the tiny drafts fit it."""
    root = os.environ.get("EPISPEC_TEST_MODELS")
    folder = Path(root) if root else tmp_path_factory.mktemp("near_tie_target")
    return build_near_tie_target(folder, tiny_models["tokenizer"])


@pytest.fixture(scope="session")
def reduced_drafts(tiny_models, tmp_path_factory) -> list[str]:
    """The tiny drafts with a reduced vocabulary (half the target's; `tests/reduced_drafts.py`)."""
    from tests.reduced_drafts import reduced_drafts as build

    root = os.environ.get("EPISPEC_TEST_MODELS")
    folder = Path(root) if root else tmp_path_factory.mktemp("reduced_drafts")
    return build(tiny_models, folder)


@pytest.fixture(scope="module")
def few_threads():
    """One thread (the machine is shared; tiny models gain nothing from more), restored after
    the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def feature_drafts(tiny_models, tmp_path_factory) -> list[str]:
    """Three tiny feature drafts (`tests/feature_drafts.py`) for the tiny target."""
    from tests.feature_drafts import build_feature_drafts

    return build_feature_drafts(tiny_models["target"], tmp_path_factory.mktemp("feature_drafts"))
