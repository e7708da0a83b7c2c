"""The reference engine: exact speculative decoding with a draft ensemble in PyTorch + transformers.

The ground truth for tests and evaluation, and the fallback where vLLM is not installed.
One sequence per round (gpt-fast sized); concurrent requests interleave round by round.
Every model keeps a KV cache that is cropped back after a rejection: no prefix is ever
recomputed. One round (docs/design.md §2):

    1) the M drafts propose k tokens autoregressively from their mixture q̄
       (greedy at temperature 0, else a draw from q̄ under the request's temperature/top-p);
       each draft step keeps all M raw distributions of that position
    2) the target scores the k+1 positions in one forward pass
    3) lossless verification (`speculative.verify`): n accepted + one recovered/bonus token
    4) bias/variance/eu of every emitted position from the passes of 1) and 2); the bonus
       position gets one extra draft step, which the next round would otherwise run anyway
    5) crop every cache to the tokens that stand

A failed step (an exception in a forward pass: a bug, an out-of-memory on a long prompt, a
device error) fails its own request: that stream ends with `StepFailed`, the others go on.
Each sequence has KV caches of its own, so nothing of the failed one is used again; what the
models share are their weights and the device, which the engine then checks with a one-token
forward pass of every model (`_still_works`). Only if that fails too is the engine dead, as a
dead vLLM engine core is: every stream ends with `EngineDeadError` at its next step, new
requests are refused with it, and `is_healthy()` turns False, upon which the server answers
503 and `epispec serve` exits non-zero for a supervisor to restart it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.engine import models
from server.engine.detokenize import IncrementalDetokenizer
from server.engine.emission import EmissionGate
from server.engine.feature_draft import is_feature_draft, load_feature_drafts
from server.engine.speculative import sample, sampling_probs, verify
from server.engine.stacked_layers import causal_attend
from server.engine.types import (
    DEFAULT_NUM_SPECULATIVE_TOKENS,
    EngineStats,
    Finished,
    GenerationItem,
    InvalidRequest,
    SamplingParams,
    TokenEvent,
    TopLogprob,
)
from server.engine.uncertainty import decompose, mixture_logprobs

log = logging.getLogger(__name__)


class StepFailed(RuntimeError):
    """A step of this request failed; the engine serves on (the error event reads
    "Generation failed: StepFailed.", the details go to the server's log)."""


class EngineDeadError(RuntimeError):
    """A step of the engine failed before: it runs no more (named like vLLM's own error, so a
    stream's error event reads the same for both engines)."""


@dataclass
class _Model:
    """One causal LM and its KV cache for the sequence being decoded."""

    lm: torch.nn.Module
    cache: object = None
    seen: int = 0  # tokens whose keys/values are in the cache

    features: list[torch.Tensor] = field(default_factory=list)  # [E] each: final hidden states kept

    def feed(self, tokens: list[int], device: str, keep_features: bool = False) -> torch.Tensor:
        """Run the tokens not yet cached; returns raw logits of their positions. [L, V]
        With `keep_features`, their final (normed) hidden states are appended to `features`."""
        new = torch.tensor([tokens[self.seen :]], device=device)  # [1, L]
        out = self.lm(
            input_ids=new, past_key_values=self.cache, use_cache=True, output_hidden_states=keep_features
        )
        if keep_features:
            del self.features[self.seen :]
            self.features.extend(out.hidden_states[-1][0].float())  # L x [E]
        self.cache = out.past_key_values
        self.seen = len(tokens)
        return out.logits[0].float()  # [L, V]

    def crop(self, length: int) -> None:
        if self.seen > length:
            self.cache.crop(length - self.seen)  # negative: drop that many trailing tokens
            self.seen = length
            del self.features[length:]


@dataclass
class _Sequence:
    tokens: list[int]
    target: _Model
    drafts: list[_Model]
    stats: EngineStats = field(default_factory=EngineStats)


class ReferenceEngine:
    """Exact engine. `generate` streams `TokenEvent`s then one `Finished` (see types.Engine)."""

    name = "reference"

    def __init__(
        self,
        target: str | Path,
        drafts: list[str | Path] = (),
        *,
        num_speculative_tokens: int = DEFAULT_NUM_SPECULATIVE_TOKENS,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        model_name: str | None = None,
        max_model_len: int | None = None,
    ) -> None:
        models.check_compatible(target, list(drafts))
        self._tokenizer = models.load_tokenizer(target)
        self.device = device
        self.target = models.load_causal_lm(target, device, dtype)
        # feature drafts (read the target's hidden states) run stacked; others as causal LMs
        self.feature = (
            load_feature_drafts(list(drafts), target, device, dtype)
            if drafts and is_feature_draft(drafts[0])
            else None
        )
        self.drafts = [] if self.feature else [models.load_draft(d, device, dtype) for d in drafts]
        self.num_drafts = len(drafts)
        self.k = num_speculative_tokens if self.num_drafts else 0
        self.model_name = model_name or Path(target).name
        self.max_model_len = min(max_model_len or 1 << 30, models.max_model_len(target))
        self.vocab_size = self.target.config.vocab_size
        self.eos_token_ids = models.eos_token_ids(target, self._tokenizer)
        self._step_lock = threading.Lock()  # one forward pass at a time: requests interleave by round
        self._running: set[str] = set()
        self._aborted: set[str] = set()
        self._failure: str | None = None  # the failed step's exception, once one failed

    @property
    def tokenizer(self):
        return self._tokenizer

    # --- the synchronous core

    def stream(self, prompt_token_ids: list[int], params: SamplingParams) -> Iterator[GenerationItem]:
        """Generate synchronously: TokenEvents, then one Finished."""
        self.validate(prompt_token_ids, params)
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        seq = _Sequence(
            tokens=list(prompt_token_ids),
            target=_Model(self.target),
            drafts=[_Model(d) for d in self.drafts],
        )
        detok = IncrementalDetokenizer(self._tokenizer, prompt_token_ids)
        gate = EmissionGate(params)
        n_prompt = len(prompt_token_ids)
        reason = "length"
        if self.feature is not None and n_prompt > 1:  # the drafts' first step reads the prompt's features
            with torch.inference_mode():
                seq.target.feed(seq.tokens[:-1], self.device, keep_features=True)
        while gate.reason is None:
            generated = len(seq.tokens) - n_prompt
            room = min(params.max_tokens - generated, self.max_model_len - len(seq.tokens))
            if room <= 0:
                break
            with torch.inference_mode():
                round_tokens = self._round(seq, params, gen, room)
            for tok, lp, unc, top in round_tokens:
                seq.tokens.append(tok)
                if tok in self.eos_token_ids and not params.ignore_eos:
                    reason = "stop"
                    break
                bias, var, eu = unc if unc is not None else (None, None, None)
                p_error, flagged = params.thresholds.judge(bias, var, eu, lp)
                event = TokenEvent(
                    token_id=tok,
                    text=detok.add(tok),
                    logprob=lp,
                    bias=bias,
                    variance=var,
                    eu=eu,
                    flagged=flagged,
                    top_logprobs=top,
                    p_error=p_error,
                )
                yield from gate.push(event, detok.pending)
                if gate.reason is not None:
                    break
            if reason == "stop":
                break
        yield from gate.flush(detok.flush())
        reason = gate.reason or reason
        yield Finished(reason, n_prompt, len(seq.tokens) - n_prompt, seq.stats)

    def _round(self, seq: _Sequence, params: SamplingParams, gen, room: int):
        """One speculative round. Returns [(token, raw logprob, (bias, var, eu) | None, top)]."""
        # at most `room` tokens may be emitted: propose at most room-1 (the +1 is recovered/bonus)
        k = min(self.k, room - 1)
        T, top_p = params.temperature, params.top_p
        # 1) drafts propose k tokens; draft_lp[i] is [M, V] at the position of proposal i
        draft_lp: list[torch.Tensor] = []
        proposal: list[int] = []
        q_probs: list[torch.Tensor] = []
        own: torch.Tensor | None = None  # [M, i, E] feature drafts' predicted features this round
        for _ in range(k):
            if self.feature is None:
                lp = self._draft_step(seq, seq.tokens + proposal)  # [M, V]
            else:
                lp, own = self._feature_step(seq, seq.tokens + proposal, own)
            q = sampling_probs(mixture_logprobs(lp), T, top_p)  # [V]
            proposal.append(int(q.argmax()) if T == 0 else int(sample(q, gen)))
            draft_lp.append(lp)
            q_probs.append(q)
        # 2) the target scores k+1 positions in one pass
        logits = seq.target.feed(seq.tokens + proposal, self.device, self.feature is not None)[-(k + 1) :]
        # [k+1, V]
        seq.stats.target_forward_passes += 1
        p_raw = torch.log_softmax(logits, -1)  # [k+1, V]
        p_tilde = sampling_probs(logits, T, top_p)  # [k+1, V]
        # 3) verify
        if k:
            n, nxt = verify(torch.tensor(proposal), torch.stack(q_probs), p_tilde, gen)
            seq.stats.proposed += k
            seq.stats.accepted += n
        else:
            n, nxt = 0, int(sample(p_tilde[0], gen))
        emitted = proposal[:n] + [nxt]
        # 4) EU of each emitted position; the bonus position needs one more draft step
        unc = [None] * len(emitted)
        if self.feature is not None:  # every emitted position from the target's own features
            draft_lp = [self._feature_step(seq, seq.tokens + proposal[:i])[0] for i in range(n + 1)]
        if self.num_drafts:
            if n == k and self.feature is None:
                draft_lp.append(self._draft_step(seq, seq.tokens + proposal))
            t0 = time.perf_counter()  # EU's own cost (the bonus step is one the next round needs)
            u = decompose(torch.stack(draft_lp[: n + 1]), p_raw[: n + 1])  # [n+1, M, V], [n+1, V]
            unc = list(zip(u.bias.tolist(), u.variance.tolist(), u.eu.tolist(), strict=True))
            seq.stats.eu_seconds += time.perf_counter() - t0
        # 5) crop caches to the tokens that stand (the new token is fed next round)
        keep = len(seq.tokens) + n
        for m in [seq.target, *seq.drafts]:
            m.crop(keep)
        ids = torch.tensor(emitted)
        lps = p_raw[torch.arange(len(emitted)), ids].tolist()
        tops = [self._top(p_raw[i], params.logprobs) for i in range(len(emitted))]
        return list(zip(emitted, lps, unc, tops, strict=True))

    def _draft_step(self, seq: _Sequence, tokens: list[int]) -> torch.Tensor:
        """All M drafts' raw log-probs at the next position of `tokens`. [M, V]"""
        seq.stats.draft_forward_passes += 1
        last = [m.feed(tokens, self.device)[-1] for m in seq.drafts]  # M x [V]
        return torch.log_softmax(torch.stack(last), -1)

    def _feature_step(
        self, seq: _Sequence, tokens: list[int], own: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature drafts' raw log-probs at the next position of `tokens` ([M, V]) and their
        predicted features there, appended to `own` ([M, i+1, E]). Input features are the
        target's where it has computed them, then `own` (later steps of a round); the whole
        sequence is recomputed (exact and simple: this engine is the reference)."""
        seq.stats.draft_forward_passes += 1
        f = self.feature
        n_true = min(len(tokens) - 1, len(seq.target.features))
        true = torch.stack(seq.target.features[:n_true]) if n_true else f.embed.new_zeros(0, f.spec.hidden)
        feats = torch.cat([f.embed.new_zeros(1, f.spec.hidden), true])[None].expand(
            f.m, 1, -1, -1
        )  # [M, 1, 1+n_true, E]
        if own is not None:
            feats = torch.cat([feats, own[:, None, : len(tokens) - 1 - n_true]], 2)
        T = len(tokens)
        x = torch.tensor([tokens], device=self.device)  # [1, T]
        pos = torch.arange(T, device=self.device)[None]  # [1, T]
        lq, g = f(x, feats[:, :, :T], pos, causal_attend(f.scale), (torch.tensor([0]), torch.tensor([T - 1])))
        lq = lq[0] if f.vocab is None else f.vocab.expand(lq[0])  # [M, V]
        own = g if own is None else torch.cat([own, g], 1)  # [M, i+1, E]
        return lq, own

    def _top(self, logprobs: torch.Tensor, n: int) -> tuple[TopLogprob, ...]:
        if n <= 0:
            return ()
        vals, ids = logprobs.topk(min(n, logprobs.shape[-1]))
        return tuple(
            TopLogprob(int(i), self._tokenizer.decode([int(i)]), float(v))
            for v, i in zip(vals.tolist(), ids.tolist(), strict=True)
        )

    # --- the async Engine interface

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        params.validate()
        if not prompt_token_ids:
            raise InvalidRequest("prompt_token_ids must not be empty", "prompt")
        if params.json_output is not None:  # no grammar here: refuse rather than return prose
            raise InvalidRequest(
                "the reference engine cannot constrain output to JSON; serve with the vllm "
                "engine for response_format json_object or json_schema",
                "response_format",
            )

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationItem]:
        self.validate(prompt_token_ids, params)
        if request_id in self._running:
            raise ValueError(f"request id '{request_id}' is already running")
        self._check_alive()
        self._running.add(request_id)
        it = self.stream(prompt_token_ids, params)

        def step():
            with self._step_lock:
                self._check_alive()  # a stream that waited on the lock while the engine died
                try:
                    return next(it, None)
                except Exception as exc:
                    raise self._failed_step(exc) from exc

        try:
            while True:
                if request_id in self._aborted:
                    yield Finished("abort", len(prompt_token_ids), 0, EngineStats())
                    return
                item = await asyncio.to_thread(step)
                if item is None:
                    return
                yield item
        finally:
            it.close()
            self._running.discard(request_id)
            self._aborted.discard(request_id)

    async def abort(self, request_id: str) -> None:
        if request_id in self._running:
            self._aborted.add(request_id)

    def num_running(self) -> int:
        return len(self._running)

    def is_healthy(self) -> bool:
        return self._failure is None

    def _failed_step(self, exc: Exception) -> Exception:
        """What the failed step's request raises: StepFailed, or EngineDeadError where the models
        fail a one-token forward pass too (the device or the weights are broken, not the request)."""
        if self._still_works():
            log.error(
                "the reference engine failed a step of one request (%s); serving on", type(exc).__name__
            )
            return StepFailed(f"a step of this request failed: {type(exc).__name__}: {exc}")
        self._failure = f"{type(exc).__name__}: {exc}"
        log.error(
            "the reference engine failed a step (%s) and a check after it; it runs no more",
            type(exc).__name__,
        )
        return EngineDeadError(f"the engine failed a step: {self._failure}")

    def _still_works(self) -> bool:
        """One forward pass of one token through every model, without a cache."""
        try:
            with torch.inference_mode():
                ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)  # [1, 1]
                for lm in [self.target, *self.drafts]:
                    lm(input_ids=ids)
        except Exception:  # noqa: BLE001 (any failure means the models cannot serve)
            return False
        return True

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise EngineDeadError(f"the engine is dead: a step failed before ({self._failure})")

    async def shutdown(self) -> None:
        self._running.clear()
