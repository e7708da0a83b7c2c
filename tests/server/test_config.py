"""Settings: flags > environment > config file > defaults, validated at construction."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from server.config import Settings
from server.engine.types import DEFAULT_EU_THRESHOLD


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("EPISPEC_") and key != "EPISPEC_TEST_MODELS":
            monkeypatch.delenv(key)


def test_defaults():
    s = Settings()
    assert (s.host, s.port, s.api_key, s.engine) == ("127.0.0.1", 8000, None, "auto")


def test_precedence_flags_over_env_over_file(tmp_path, monkeypatch):
    cfg = tmp_path / "epispec.toml"
    cfg.write_text('port = 7000\nhost = "0.0.0.0"\nmax_logprobs = 5\n')
    monkeypatch.setenv("EPISPEC_PORT", "7100")
    monkeypatch.setenv("EPISPEC_DRAFTS", '["d1", "d2"]')
    monkeypatch.setenv("EPISPEC_TARGET", "t")
    s = Settings(config_file=cfg, max_logprobs=7)
    assert (s.host, s.port, s.max_logprobs, s.drafts) == ("0.0.0.0", 7100, 7, ["d1", "d2"])
    monkeypatch.setenv("EPISPEC_CONFIG_FILE", str(cfg))
    monkeypatch.delenv("EPISPEC_PORT")
    assert Settings().port == 7000


def test_json_config_file_and_secret(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"api_key": "zebra-42", "eu_threshold": 0.3}))
    s = Settings(config_file=cfg)
    assert s.api_key.get_secret_value() == "zebra-42" and "zebra-42" not in repr(s)
    assert s.thresholds().eu == 0.3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": 70000},
        {"max_request_bytes": 10},
        {"engine": "tgi"},
        {"target": "t", "bundle": "b"},
        {"drafts": ["d"]},
        {"eu_threshold": -1},
        {"min_threshold": 5, "max_threshold": 1},
    ],
)
def test_invalid_settings_are_refused(kwargs):
    with pytest.raises(ValidationError):
        Settings(**kwargs)


def test_invalid_env_and_file_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("EPISPEC_PORT", "eighty")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.delenv("EPISPEC_PORT")
    cfg = tmp_path / "c.toml"
    cfg.write_text("prot = 1\n")
    with pytest.raises(ValidationError):
        Settings(config_file=cfg)
    with pytest.raises(ValueError, match="does not exist"):
        Settings(config_file=tmp_path / "missing.toml")


def test_thresholds_settings_then_bundle_then_default():
    assert Settings().thresholds().eu == DEFAULT_EU_THRESHOLD
    t = Settings().thresholds({"eu": 0.2, "variance": 0.1})
    assert (t.eu, t.bias, t.variance) == (0.2, None, 0.1)
    t = Settings(eu_threshold=0.9, bias_threshold=0.4).thresholds({"eu": 0.2, "bias": 0.1})
    assert (t.eu, t.bias, t.variance) == (0.9, 0.4, None)
