"""Prometheus metrics of one server process, held in their own registry (`app.state.metrics`).

Recorded at a single place, `server.api.pump.Generations.run`, which every endpoint's
token stream passes through; served as Prometheus text by `GET /metrics` (`Metrics.render`).
All names carry the `epispec_` prefix and base units (seconds, tokens, nats). Every series gets
one constant `model` label at exposition (the served model id), so a dashboard can filter by
model without a high-cardinality label anywhere.

Recording, ~5 lines in the API layer:

    tracker = metrics.start_request(endpoint, len(prompt_token_ids))  # waiting +1
    try:
        async for item in engine.generate(...):
            tracker.observe(item)        # TokenEvent -> on_token, Finished -> on_finish
            ...
    finally:
        tracker.close()                  # status = finish reason, or "abort"/"error"
    metrics.observe_request(endpoint, "rejected")   # requests the API refused (4xx)

Metrics (PromQL examples use a 5m window):
- `epispec_requests_total{endpoint, status}` counter: requests that reached the engine, by route
  path and finish reason (`stop`, `length`, `uncertainty`, `abort`, `error`), plus requests
  the API rejected (`status="rejected"`, a 4xx).
  `sum by (status) (rate(epispec_requests_total[5m]))`.
- `epispec_requests_running` / `epispec_requests_waiting` gauges: in-flight generations that
  have / have not yet produced their first token (disjoint, as vLLM's running/waiting).
- `epispec_time_to_first_token_seconds`, `epispec_inter_token_latency_seconds`,
  `epispec_e2e_request_latency_seconds` histograms (vLLM's buckets, with sub-10 ms buckets
  added for small models). p95: `histogram_quantile(0.95, sum by (le) (rate(X_bucket[5m])))`.
- `epispec_prompt_tokens_total`, `epispec_generation_tokens_total` counters.
- `epispec_token_eu_nats`, `epispec_token_bias_nats`, `epispec_token_variance_nats` histograms
  of every generated token's uncertainty (log-spaced buckets, 1e-4 .. 100 nats; tokens with no
  uncertainty, i.e. plain decoding, are not observed).
- `epispec_flagged_tokens_total`, `epispec_flagged_responses_total` counters (a response is
  flagged when at least one of its tokens is). Token flag rate:
  `rate(epispec_flagged_tokens_total[5m]) / rate(epispec_generation_tokens_total[5m])`.
- `epispec_spec_proposed_tokens_total`, `epispec_spec_accepted_tokens_total` counters (draft
  tokens proposed to / accepted by the target's verification). Acceptance rate:
  `rate(epispec_spec_accepted_tokens_total[5m]) / rate(epispec_spec_proposed_tokens_total[5m])`.
- `epispec_draft_forward_passes_total`, `epispec_target_forward_passes_total` counters (one
  draft pass = one batched step of all M drafts; see `EngineStats`).
- `epispec_eu_seconds_total` counter: engine time spent computing bias/variance/eu
  (`EngineStats.eu_seconds`). Per generated token, to compare with inter-token latency:
  `rate(epispec_eu_seconds_total[5m]) / rate(epispec_generation_tokens_total[5m])`.
- Read from the engine at each scrape (`watch_engine`): `epispec_engine_requests` gauge
  (requests holding engine state), and for the vllm engine `epispec_eu_joiner_states` and
  `epispec_eu_proposer_states` gauges (requests holding side-channel or draft-slot state; all
  three are 0 when idle) and `epispec_eu_channel_dropped_messages_total` (malformed side-channel
  messages dropped; anything but 0 deserves a look), `epispec_eu_channel_rejected_peers_total`
  (handshakes refused on a tcp:// channel: a peer without the proposer's CURVE key; each
  reconnect counts) and `epispec_eu_proposer_faults_total` (proposer steps that failed and
  decoded on without proposals, their tokens with null uncertainty).
  `increase(epispec_eu_proposer_faults_total[5m]) > 0` is worth an alert.
- Requests refused for overload (429, `server/api/admission.py`) count in
  `epispec_requests_total{status="overloaded"}`.

Where the vLLM engine runs in process (AsyncLLM with log_stats), vLLM registers its own `vllm:*`
metrics in prometheus_client's default REGISTRY; `render` appends that registry after ours,
dropping any family whose name clashes with one of ours.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from functools import partial

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from server.engine.types import Finished, GenerationItem, TokenEvent

# vLLM's buckets (vllm/v1/metrics/loggers.py) with sub-10 ms ones in front for small models.
# fmt: off
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
               30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# fmt: on
# log-spaced, three per decade: 1e-4, 2.15e-4, 4.64e-4, 1e-3, ... 100 nats
NATS_BUCKETS = tuple(round(10 ** (i / 3), 10) for i in range(-12, 7))


class Metrics:
    """The server's metrics. `model_name` (settable once the engine is built) becomes the constant
    `model` label; `include_default_registry` appends prometheus_client's default REGISTRY
    (vLLM's metrics, process and Python collectors) to `render()`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str = "", include_default_registry: bool = True) -> None:
        self.model_name = model_name
        self.include_default_registry = include_default_registry
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "epispec_requests",
            "Requests by endpoint and outcome (finish reason, or rejected).",
            ["endpoint", "status"],
            registry=r,
        )
        gauge = partial(Gauge, registry=r)
        counter = partial(Counter, registry=r)
        seconds = partial(Histogram, registry=r)
        nats = partial(Histogram, buckets=NATS_BUCKETS, registry=r)
        # fmt: off
        self.running = gauge("epispec_requests_running", "Generations in flight past their first token.")
        self.waiting = gauge("epispec_requests_waiting", "Generations in flight before their first token.")
        self.ttft = seconds("epispec_time_to_first_token_seconds",
                            "Time from the start of a generation to its first token.", buckets=TTFT_BUCKETS)
        self.itl = seconds("epispec_inter_token_latency_seconds",
                           "Time between consecutive tokens of one generation.", buckets=ITL_BUCKETS)
        self.e2e = seconds("epispec_e2e_request_latency_seconds",
                           "Time from the start of a generation to its end.", buckets=E2E_BUCKETS)
        self.prompt_tokens = counter("epispec_prompt_tokens", "Prompt tokens of started generations.")
        self.generation_tokens = counter("epispec_generation_tokens", "Generated tokens.")
        self.eu = nats("epispec_token_eu_nats", "Epistemic uncertainty (bias + variance) per token.")
        self.bias = nats("epispec_token_bias_nats", "Bias KL(q̄ ‖ p) per token.")
        self.variance = nats("epispec_token_variance_nats", "Variance (the drafts' generalized JSD) per token.")
        self.flagged_tokens = counter("epispec_flagged_tokens", "Tokens flagged as possible hallucinations.")
        self.flagged_responses = counter("epispec_flagged_responses",
                                         "Generations with at least one flagged token.")
        self.proposed = counter("epispec_spec_proposed_tokens", "Draft tokens proposed for verification.")
        self.accepted = counter("epispec_spec_accepted_tokens", "Draft tokens accepted by the target.")
        self.draft_passes = counter("epispec_draft_forward_passes",
                                    "Draft ensemble forward passes (all M drafts, one step).")
        self.target_passes = counter("epispec_target_forward_passes", "Target forward passes.")
        self.eu_seconds = counter("epispec_eu_seconds", "Engine time spent computing bias, variance, eu.")
        # fmt: on
        self._engine = None

    def watch_engine(self, engine) -> None:
        """Read the engine's state counts (and side-channel drops) at every scrape."""
        self._engine = engine

    # --- recording

    def observe_request(self, endpoint: str, status: str) -> None:
        """Count one request that did not reach the engine (e.g. `status="rejected"`)."""
        self.requests.labels(endpoint=endpoint, status=status).inc()

    def start_request(self, endpoint: str, prompt_tokens: int) -> RequestTracker:
        """Call when a generation is handed to the engine; always `close()` the tracker."""
        return RequestTracker(self, endpoint, prompt_tokens)

    # --- exposition

    def _engine_families(self) -> Iterator[Metric]:
        e = self._engine
        if e is None:
            return
        yield GaugeMetricFamily(
            "epispec_engine_requests", "Requests holding engine state.", value=e.num_running()
        )
        if hasattr(e, "num_joiner_states"):
            yield GaugeMetricFamily(
                "epispec_eu_joiner_states",
                "Requests holding side-channel records in the API process.",
                value=e.num_joiner_states(),
            )
            yield GaugeMetricFamily(
                "epispec_eu_proposer_states",
                "Requests holding a draft KV slot in the proposer.",
                value=e.num_proposer_states(),
            )
        joiner = getattr(e, "joiner", None)
        if joiner is not None:
            yield CounterMetricFamily(
                "epispec_eu_channel_dropped_messages",
                "Malformed side-channel messages dropped.",
                value=joiner.dropped,
            )
            yield CounterMetricFamily(
                "epispec_eu_channel_rejected_peers",
                "Side-channel handshakes refused (a peer without the proposer's CURVE key).",
                value=joiner.rejected,
            )
            yield CounterMetricFamily(
                "epispec_eu_proposer_faults",
                "Proposer steps that failed: decoded on without proposals, null uncertainty.",
                value=joiner.proposer_faults,
            )

    def collect(self) -> Iterator[Metric]:
        """Our families with the `model` label, then the default registry's non-clashing ones."""
        ours = set()
        for family in (*self.registry.collect(), *self._engine_families()):
            ours.add(family.name)
            family.samples = [
                s._replace(labels={**s.labels, "model": self.model_name}) for s in family.samples
            ]
            yield family
        if self.include_default_registry:
            for family in REGISTRY.collect():
                if family.name not in ours:
                    yield family

    def render(self) -> bytes:
        return generate_latest(self)  # type: ignore[arg-type]  # anything with collect()


class RequestTracker:
    """Follows one generation's stream. Times use `time.perf_counter` from `start_request`."""

    def __init__(self, metrics: Metrics, endpoint: str, prompt_tokens: int) -> None:
        self.m = metrics
        self.endpoint = endpoint
        self.start = self.last = time.perf_counter()
        self.tokens = 0
        self.flagged = 0
        self.finish_reason: str | None = None
        self.closed = False
        metrics.prompt_tokens.inc(prompt_tokens)
        metrics.waiting.inc()

    def observe(self, item: GenerationItem) -> None:
        if isinstance(item, TokenEvent):
            self.on_token(item)
        elif isinstance(item, Finished):
            self.on_finish(item)

    def on_token(self, event: TokenEvent) -> None:
        now = time.perf_counter()
        m = self.m
        if self.tokens == 0:
            m.ttft.observe(now - self.start)
            m.waiting.dec()
            m.running.inc()
        else:
            m.itl.observe(now - self.last)
        self.last = now
        self.tokens += 1
        m.generation_tokens.inc()
        for hist, value in ((m.eu, event.eu), (m.bias, event.bias), (m.variance, event.variance)):
            if value is not None and math.isfinite(value):  # an inf would poison the _sum series
                hist.observe(value)
        if event.flagged:
            self.flagged += 1
            m.flagged_tokens.inc()

    def on_finish(self, finished: Finished) -> None:
        m, s = self.m, finished.stats
        m.e2e.observe(time.perf_counter() - self.start)
        m.proposed.inc(s.proposed)
        m.accepted.inc(s.accepted)
        m.draft_passes.inc(s.draft_forward_passes)
        m.target_passes.inc(s.target_forward_passes)
        m.eu_seconds.inc(s.eu_seconds)
        self.finish_reason = finished.finish_reason

    def close(self, status: str | None = None) -> None:
        """Idempotent. `status` defaults to the finish reason, else `abort` (stream left early)."""
        if self.closed:
            return
        self.closed = True
        m = self.m
        (m.running if self.tokens else m.waiting).dec()
        if self.flagged:
            m.flagged_responses.inc()
        m.requests.labels(endpoint=self.endpoint, status=status or self.finish_reason or "abort").inc()

    def __enter__(self) -> RequestTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # an exception other than cancellation (client gone) is an error
        error = exc_type is not None and not issubclass(exc_type, (asyncio.CancelledError, GeneratorExit))
        self.close("error" if error else None)
