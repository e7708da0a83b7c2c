"""The vllm engine: vLLM runs the target, the draft ensemble runs as its speculative proposer.

    API process                                   vLLM engine-core process
    VllmEngine.generate ── AsyncLLM ───────────▶  scheduler + model runner (target)
         ▲   tokens (+ raw target log-probs)           │ propose() after each step
         │                                             ▼
       Joiner ◀── ZeroMQ PUSH/PULL (eu_channel) ── EnsembleProposer (M drafts, slot KV caches)
              per emitted position: variance + bias, or variance + q̄'s top-N

Per emitted token, variance comes exact from the drafts. The bias has two sources:
  - "worker" (default): the proposer computes the exact KL(q̄ ‖ p) from the target's full
    raw logits of the step, still in vLLM's runner (see vllm_proposer.py), and ships the
    number; no target log-probs are requested beyond what the caller asked for.
  - "logprobs": `bias_topk` of q̄ (its top-N shipped in the record) against the target's raw
    top-K log-probs (vLLM `logprobs_mode="raw_logprobs"`, K = `target_logprobs`; K = −1
    returns the whole vocabulary and the proposer ships all of q̄, so the EU is exact).
Conventions match the reference engine: EOS is counted but not emitted, `logprob` is the
target's raw log-prob, stop strings and detokenization are ours.

This module is the runtime (requests in, token events out); starting vLLM (its engine
arguments, the settings it reads from the environment, the drafts' KV budget) is vllm_launch.py.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from vllm import SamplingParams as VllmSamplingParams
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from server.engine import models, vllm_internals, vllm_launch
from server.engine.detokenize import IncrementalDetokenizer
from server.engine.draft_ensemble import log_mix_from_record
from server.engine.emission import EmissionGate
from server.engine.eu_channel import Joiner, open_joiner
from server.engine.proposer_config import DEFAULT_DRAFT_DTYPE, ProposerConfig, resolve_draft_dtype
from server.engine.speculation_policy import DEFAULT_SPECULATION, Speculation
from server.engine.types import (
    BIAS_SOURCES,
    DEFAULT_BIAS_SOURCE,
    DEFAULT_NUM_SPECULATIVE_TOKENS,
    DEFAULT_TARGET_LOGPROBS,
    BiasSource,
    EngineStats,
    Finished,
    GenerationItem,
    InvalidRequest,
    SamplingParams,
    TokenEvent,
    TopLogprob,
)
from server.engine.uncertainty import bias_topk

log = logging.getLogger(__name__)

PROPOSER_CLASS = "server.engine.vllm_proposer.EnsembleProposer"
DEFAULT_DRAFT_TOP_N = 64  # q̄ entries shipped per position when K > 0
RECORD_TIMEOUT_S = 30.0  # a record that never comes leaves that token's uncertainty null
_PARAMS = {"max_tokens", "temperature", "top_p", "seed", "logprobs", "stop"}  # named in errors
VALIDATED_KEPT = 64  # validated requests whose conversion waits for their generate call


class VllmEngine:
    name = "vllm"

    def __init__(
        self,
        target: str,
        drafts: list[str],
        *,
        num_speculative_tokens: int = DEFAULT_NUM_SPECULATIVE_TOKENS,
        target_logprobs: int = DEFAULT_TARGET_LOGPROBS,
        model_name: str | None = None,
        max_model_len: int | None = None,
        draft_top_n: int | None = None,
        bias_source: BiasSource = DEFAULT_BIAS_SOURCE,
        draft_kv_gib: float | None = None,
        draft_dtype: str = DEFAULT_DRAFT_DTYPE,
        speculation: Speculation = DEFAULT_SPECULATION,
        vllm_args: dict | None = None,
        eu_channel: str = "ipc",
    ) -> None:
        vllm_internals.check_version()  # before vLLM starts: one sentence, not a dead worker
        if bias_source not in BIAS_SOURCES:
            raise ValueError(f"bias_source must be one of {', '.join(BIAS_SOURCES)}, got '{bias_source}'")
        models.check_compatible(target, list(drafts))
        self._tokenizer = models.load_tokenizer(target)
        self.model_name = model_name or Path(target).name
        self.num_drafts = len(drafts)
        self.k = num_speculative_tokens if drafts else 0
        self.target_logprobs = target_logprobs
        self.bias_source = bias_source
        # target log-probs requested for the bias (None: only what the caller asks for)
        bias_lp = target_logprobs if drafts and bias_source == "logprobs" else None
        cfg = models.model_config(target)
        self.vocab_size = int(cfg["vocab_size"])
        vllm_len = min(max_model_len or 1 << 30, models.max_model_len(target))
        # vLLM skips the proposer for a whole step when any row's length + k exceeds its limit;
        # keep 2k+1 positions spare so every emitted token has its record
        self.max_model_len = vllm_len - (2 * self.k + 1 if drafts else 0)
        self.eos_token_ids = models.eos_token_ids(target, self._tokenizer)
        max_logprobs = -1 if bias_lp is not None and bias_lp < 0 else max(bias_lp or 0, 20)
        launch = vllm_launch.plan(target, vllm_len, max_logprobs, vllm_args)
        engine_kw = dict(launch.engine_kw)
        self.joiner: Joiner | None = None
        if drafts:
            # ipc:// in a private 0700 directory, or tcp:// with CURVE keys made here (eu_transport)
            self.joiner = open_joiner(eu_channel, self.vocab_size, engine_kw)
            address = self.joiner.connect_address
            top_n = -1 if target_logprobs < 0 else (draft_top_n or DEFAULT_DRAFT_TOP_N)  # logprobs
            engine_kw["speculative_config"] = {
                "method": "custom_class",
                "model": PROPOSER_CLASS,
                "num_speculative_tokens": num_speculative_tokens,
            }
            engine_kw.setdefault("async_scheduling", False)
            engine_kw["additional_config"] = ProposerConfig(
                drafts=tuple(str(d) for d in drafts),
                channel=address,
                top_n=top_n,
                bias=bias_source,
                dtype=resolve_draft_dtype(draft_dtype),
                speculation=speculation,
                channel_keys=self.joiner.publisher_keys(),
            ).to_additional_config()  # kv_tokens: below, from the resolved configuration
        # vLLM-CPU takes these settings only from the process environment, read while vLLM builds
        # its configuration and inherited by the processes it spawns: the one place epispec
        # writes os.environ (see vllm_launch)
        os.environ.update(launch.env)
        config = vllm_launch.engine_config(engine_kw)
        if drafts:
            self.draft_kv_bytes_per_token = vllm_launch.size_draft_kv(config, draft_kv_gib, self.k)
        self._bias_logprobs = bias_lp
        self.llm = vllm_launch.start(config)
        self._running: set[str] = set()
        self._aborted: set[str] = set()
        # validate's conversion of a request, kept for the generate call that follows it with the
        # same objects (the API validates, then streams): each request is converted once
        self._validated: OrderedDict[int, tuple] = OrderedDict()
        self._healthy = True

    @property
    def tokenizer(self):
        return self._tokenizer

    # --- the Engine interface

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        vllm_params = self._vllm_params(prompt_token_ids, params)
        self._validated[id(params)] = (params, prompt_token_ids, vllm_params)
        while len(self._validated) > VALIDATED_KEPT:  # validated, never generated (client gone)
            self._validated.popitem(last=False)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationItem]:
        vllm_params = self._converted(prompt_token_ids, params)  # before any state is held
        if request_id in self._running:
            raise ValueError(f"request id '{request_id}' is already running")
        n_prompt = len(prompt_token_ids)
        self._running.add(request_id)
        if self.joiner:
            self.joiner.register(request_id)
        detok = IncrementalDetokenizer(self._tokenizer, prompt_token_ids)
        gate = EmissionGate(params)
        steps, completion, reason, eu_seconds = 0, 0, "length", 0.0
        stream = self.llm.generate({"prompt_token_ids": list(prompt_token_ids)}, vllm_params, request_id)
        try:
            async for out in stream:
                steps += 1
                c = out.outputs[0]
                for i, tok in enumerate(c.token_ids):
                    completion += 1
                    if tok in self.eos_token_ids and not params.ignore_eos:
                        break  # counted, not emitted; vLLM finishes the request with "stop"
                    event, dt = await self._event(
                        request_id, n_prompt + completion - 1, tok, c.logprobs[i], detok, params
                    )
                    eu_seconds += dt
                    for ev in gate.push(event, detok.pending):
                        yield ev
                    if gate.reason:
                        break
                if c.finish_reason is not None:
                    reason = c.finish_reason
                if request_id in self._aborted:
                    reason = "abort"
                if gate.reason or reason == "abort":
                    break
            if request_id in self._aborted:
                reason = "abort"
            if gate.reason:
                reason = gate.reason
                await self.llm.abort(request_id)
            elif reason != "abort":
                for ev in gate.flush(detok.flush()):
                    yield ev
            yield Finished(reason, n_prompt, completion, self._stats(request_id, steps, eu_seconds))
        except Exception:
            self._healthy = not self.llm.errored
            raise
        finally:
            await stream.aclose()
            self._running.discard(request_id)
            self._aborted.discard(request_id)
            if self.joiner:
                self.joiner.release(request_id)

    async def abort(self, request_id: str) -> None:
        if request_id in self._running:
            self._aborted.add(request_id)
            await self.llm.abort(request_id)

    def num_running(self) -> int:
        return len(self._running)

    def num_joiner_states(self) -> int:
        """Requests holding records in the joiner (0 when idle)."""
        return self.joiner.num_requests() if self.joiner else 0

    def num_proposer_states(self) -> int:
        """Requests holding a draft KV slot in the proposer, as of its last step's message."""
        return self.joiner.proposer_states if self.joiner else 0

    def draft_kv_peak(self, reset: bool = False) -> tuple[int, int, int]:
        """The drafts' KV use at its largest (by bytes) since the last reset, as of the proposer's
        messages: (bytes of blocks held, tokens whose keys stand, requests holding a slot)."""
        if not self.joiner:
            return (0, 0, 0)
        peak = self.joiner.kv_peak
        if reset:
            self.joiner.kv_peak = (0, 0, 0)
        return peak

    def is_healthy(self) -> bool:
        return self._healthy and not self.llm.errored

    async def shutdown(self) -> None:
        self.llm.shutdown()  # once: a second call (its __del__ at exit) does nothing
        if self.joiner:
            self.joiner.close()
        self._running.clear()

    # --- helpers

    def _converted(self, prompt_token_ids: list[int], params: SamplingParams) -> VllmSamplingParams:
        """vLLM's parameters for the request: those `validate` made for these very objects, else
        made now (`_vllm_params`)."""
        kept = self._validated.pop(id(params), None)
        if kept is not None and kept[0] is params and kept[1] is prompt_token_ids:
            return kept[2]
        return self._vllm_params(prompt_token_ids, params)

    def _vllm_params(self, prompt_token_ids: list[int], params: SamplingParams) -> VllmSamplingParams:
        """vLLM's parameters for the request. Raises InvalidRequest, naming the field, for what
        our checks or vLLM's own validation refuse."""
        params.validate()
        if not prompt_token_ids:
            raise InvalidRequest("prompt_token_ids must not be empty", "prompt")
        room = min(params.max_tokens, self.max_model_len - len(prompt_token_ids))
        if room < 1:
            raise InvalidRequest(
                f"the prompt has {len(prompt_token_ids)} tokens; the limit is "
                f"{self.max_model_len} (prompt + generated)",
                "prompt",
            )
        n_lp = params.logprobs  # 0 still returns the sampled token's own log-prob
        if self._bias_logprobs is not None:
            n_lp = -1 if self._bias_logprobs < 0 else max(self._bias_logprobs, n_lp)
        js, structured = params.json_output, None
        if js is not None:
            if self.joiner and self.bias_source == "logprobs":
                # the target's top-K would be grammar-masked: the drafts' mass on forbidden tokens
                # would make every bias huge or infinite, and every token flagged
                raise InvalidRequest(
                    "response_format needs the worker bias source (this server runs --bias-source logprobs)",
                    "response_format",
                )
            structured = (
                StructuredOutputsParams(json=js.schema)
                if js.schema is not None
                else StructuredOutputsParams(json_object=True)
            )
        try:
            vp = VllmSamplingParams(
                n=1,
                max_tokens=room,
                temperature=params.temperature,
                top_p=params.top_p,
                seed=params.seed,
                ignore_eos=params.ignore_eos,
                logprobs=n_lp,
                output_kind=RequestOutputKind.DELTA,
                detokenize=False,
                structured_outputs=structured,
            )
        except (ValueError, VLLMClientError) as exc:  # vLLM's own checks of the request
            message = str(exc)
            param = getattr(exc, "parameter", None) or message.split(" ", 1)[0]
            raise InvalidRequest(message, param if param in _PARAMS else None) from exc
        if structured is not None:  # a schema no backend compiles is the client's 400, not a failed stream
            cfg = self.llm.vllm_config
            try:
                vp.verify(
                    cfg.model_config,
                    cfg.speculative_config,
                    cfg.structured_outputs_config,
                    self.llm.input_processor.tokenizer,
                )
            except (ValueError, VLLMClientError) as exc:
                raise InvalidRequest(
                    f"the response_format cannot be compiled into a grammar: {exc}", "response_format"
                ) from exc
        return vp

    async def _event(
        self,
        request_id: str,
        position: int,
        tok: int,
        lps: dict,
        detok: IncrementalDetokenizer,
        params: SamplingParams,
    ) -> tuple[TokenEvent, float]:
        """The token's event and the seconds spent joining its EU (not counting the wait)."""
        bias = var = eu = None
        spent = 0.0
        if self.joiner:
            rec = await self.joiner.record(request_id, position, RECORD_TIMEOUT_S)
            if rec is None:
                log.warning("no draft record for request %s position %d", request_id, position)
            elif (top := rec.top_n()) is None:  # bias source "worker": exact, from the proposer
                bias, var = rec.bias, rec.variance_or_nan()
                eu = None if bias is None else bias + var
            else:
                start = time.perf_counter()
                ids = torch.tensor(list(lps.keys()))  # [K]
                lp = torch.tensor([v.logprob for v in lps.values()], dtype=torch.float64)  # [K]
                log_mix = log_mix_from_record(
                    torch.from_numpy(top[0]), torch.from_numpy(top[1]), self.vocab_size
                ).double()  # [V]
                bias = float(bias_topk(log_mix, ids, lp))
                var = rec.variance_or_nan()
                eu = bias + var
                spent = time.perf_counter() - start
        logprob = float(lps[tok].logprob)
        p_error, flagged = params.thresholds.judge(bias, var, eu, logprob)
        return TokenEvent(
            token_id=tok,
            text=detok.add(tok),
            logprob=logprob,
            bias=bias,
            variance=var,
            eu=eu,
            flagged=flagged,
            top_logprobs=self._top(lps, params.logprobs),
            p_error=p_error,
        ), spent

    def _top(self, lps: dict, n: int) -> tuple[TopLogprob, ...]:
        if n <= 0:
            return ()
        best = sorted(lps.items(), key=lambda kv: -kv[1].logprob)[:n]
        return tuple(TopLogprob(int(i), self._tokenizer.decode([int(i)]), float(v.logprob)) for i, v in best)

    def _stats(self, request_id: str, steps: int, eu_seconds: float) -> EngineStats:
        if not self.joiner:
            return EngineStats(target_forward_passes=steps)
        n_steps, passes, proposed, accepted, proposer_eu_seconds = self.joiner.stats(request_id)
        return EngineStats(
            target_forward_passes=n_steps,
            draft_forward_passes=passes,
            proposed=proposed,
            accepted=accepted,
            eu_seconds=eu_seconds + proposer_eu_seconds,
        )
