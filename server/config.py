"""Server settings: the one object that configures `epispec serve`, and the only reader of
`EPISPEC_*` environment variables.

Precedence, highest first: command-line flags (passed as keyword arguments), environment
variables (`EPISPEC_PORT=9000`; lists and dicts as JSON: `EPISPEC_DRAFTS='["d1", "d2"]'`),
a config file (`--config FILE` or `EPISPEC_CONFIG_FILE`; TOML or JSON, same field names),
then the defaults below. Everything is validated when the object is built, so a bad value
stops the server at start with a sentence that names the setting.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from server.engine.eu_transport import parse_channel
from server.engine.p_error import PErrorRule
from server.engine.speculation_policy import DEFAULT_SPECULATION, Speculation
from server.engine.types import (
    DEFAULT_BIAS_SOURCE,
    DEFAULT_NUM_SPECULATIVE_TOKENS,
    DEFAULT_TARGET_LOGPROBS,
    BiasSource,
    FlagThresholds,
)
from server.resolve import resolve_thresholds

CONFIG_FILE_ENV = "EPISPEC_CONFIG_FILE"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EPISPEC_", extra="forbid")

    config_file: Path | None = Field(None, description="TOML or JSON file with these settings")

    # --- models and engine (the same meaning as the flags of server/commands/model_args.py)
    target: str | None = None
    drafts: list[str] = Field(default_factory=list)
    bundle: str | None = Field(
        None, description="bundle folder; default: $EPISPEC_BUNDLE, else bundles/smollm2"
    )
    engine: Literal["auto", "vllm", "reference"] = "auto"
    num_speculative_tokens: int | None = Field(
        None, ge=1, description=f"default: the bundle's, else {DEFAULT_NUM_SPECULATIVE_TOKENS}"
    )
    bias_source: BiasSource = DEFAULT_BIAS_SOURCE
    target_logprobs: int = Field(DEFAULT_TARGET_LOGPROBS, ge=-1)
    device: str = "auto"
    max_model_len: int | None = Field(None, ge=2)
    draft_kv_gib: float | None = Field(None, gt=0, description="the drafts' KV cache budget (vllm engine)")
    draft_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    speculation: Speculation = Field(
        DEFAULT_SPECULATION, description="tokens proposed per row and step: adaptive, fixed (k) or off"
    )
    model_name: str | None = Field(None, description="id served as `model`; default: target folder name")
    eu_channel: str = Field(
        "ipc", description="the proposer's side channel: ipc (one machine) or tcp://HOST:PORT (CURVE)"
    )
    # further model flags given on the command line (vLLM passthrough), by argparse dest
    model_flags: dict[str, Any] = Field(default_factory=dict)

    # --- HTTP
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = Field(None, description="bearer token required on every route but /health")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    cors_origins: list[str] = Field(
        default_factory=list, description="origins allowed cross-origin requests; empty: CORS off"
    )

    # --- reliability
    max_pending_requests: int = Field(
        128, ge=1, description="generation requests in the server at once (running or queued); more get 429"
    )
    retry_after_s: int = Field(1, ge=1, description="the Retry-After (seconds) of a 429")
    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="on SIGTERM, how long in-flight requests may take to finish"
    )

    # --- request limits and defaults
    default_max_tokens: int = Field(256, ge=1, description="when a request gives no max_tokens")
    max_logprobs: int = Field(20, ge=0, description="most top_logprobs a request may ask for")

    # --- hallucination flags (nats). None = the bundle's calibrated value, else the default
    eu_threshold: float | None = Field(None, ge=0)
    bias_threshold: float | None = Field(None, ge=0)
    variance_threshold: float | None = Field(None, ge=0)
    # per-request threshold overrides must lie within these bounds
    min_threshold: float = Field(0.0, ge=0)
    max_threshold: float = Field(100.0, gt=0)

    @field_validator("eu_channel")
    @classmethod
    def _channel(cls, value: str) -> str:
        parse_channel(value)  # its ValueError is the sentence
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.target and self.bundle:
            raise ValueError("give either target (with drafts) or bundle, not both")
        if self.drafts and not self.target:
            raise ValueError("drafts need a target")
        if self.min_threshold > self.max_threshold:
            raise ValueError("min_threshold must not exceed max_threshold")
        return self

    def thresholds(
        self, bundle_thresholds: dict | None = None, p_error: PErrorRule | None = None
    ) -> FlagThresholds:
        """Server-wide flag thresholds, each on its own: settings, else the bundle's calibration,
        else the default, and the bundle's p_error rule (`server.resolve.resolve_thresholds`,
        shared with `epispec generate`)."""
        return resolve_thresholds(self, bundle_thresholds, p_error)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = init_settings.init_kwargs.get("config_file") or os.environ.get(CONFIG_FILE_ENV)
        return init_settings, env_settings, _ConfigFileSource(settings_cls, path)


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Values from a TOML (`.toml`) or JSON file; an unknown key is an error, like a bad flag."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | Path | None) -> None:
        super().__init__(settings_cls)
        self.values = _read_config_file(Path(path)) if path else {}

    def get_field_value(self, field, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"Config file '{path}' does not exist.")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"Config file '{path}' is not valid {path.suffix[1:] or 'JSON'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"Config file '{path}' must hold a table/object of settings.")
    return data
