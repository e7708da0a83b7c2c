"""The draft ensemble as vLLM's speculative proposer (`speculative_config.method="custom_class"`).

vLLM builds `EnsembleProposer(vllm_config)` inside the process that runs its model runner
(the engine core, or the last pipeline rank's worker), calls `load_model(target)` once and
`propose(...)` after every step's bookkeeping. Settings come as one typed record
(`proposer_config.ProposerConfig`) in vLLM's `additional_config`.

vLLM hands `propose` token histories by batch row, not request ids. Everything else of the
step — the runner (whose `input_batch.req_ids` name the rows), the raw logits, the speculative
metadata and the target's hidden states — comes from `vllm_internals.current_step()`, captured
explicitly around the runner's `sample_tokens` (vLLM 0.32's V1 runner; the version line is
pinned). With real ids the proposer keeps one KV-cache slot per request and publishes each
emitted position's record under its request id (see eu_channel.py). Feature drafts also get,
per row, the target's hidden states of the positions computed this step.

How many tokens each row proposes is the speculation policy's choice (`cfg.speculation`,
`speculation_policy.py`), made per step from the drafts' confidence, the measured acceptance and
a cost model of vLLM's decode steps timed here: the time from the end of one `propose` call to
the start of the next is one step of vLLM's (scheduling, the target's forward, sampling), and
the step's computed positions are known from its metadata. A row proposing none is verified at
its emitted position only and still gets its record.

Bias source "worker" (`cfg.bias`): the target's raw logits of every position verified
this step are still in vLLM's runner when `propose` runs, so the proposer computes the exact
bias = KL(q̄ ‖ softmax(logits)) over the whole vocabulary here and publishes just (position,
variance, bias). It reads vLLM 0.32 internals (pinned):
  - the step's `logits` and `spec_decode_metadata` (`vllm_internals.Step`): the rows of
    request i are [cu_num_sampled_tokens[i] − num_draft_tokens[i] − 1, cu_num_sampled_tokens[i])
    and the j-th emitted token was sampled from the j-th of them (`_calc_spec_decode_metadata`).
  - with a speculative config the runner builds that metadata on every step (0 drafts for
    prefills) and samples through the rejection sampler, which indexes copies of the rows and
    never writes to `logits`. Without metadata, vLLM's plain `Sampler` would scale and mask
    `logits` in place (temperature, top-p/k, penalties): the proposer refuses that case.
  - a structured-output grammar bitmask (response_format) is applied to the runner's `logits`
    in place before sampling; the step capture keeps a copy taken before it, so the bias of
    such rows is exact against the raw target too.
Bias source "logprobs": records ship q̄'s top-N and the API side computes `bias_topk`.

The drafts' KV pool holds `kv_tokens` tokens (default: max_num_seqs × max_model_len, where no
request can ever find it full; on a CPU `VllmEngine` caps that at the tokens vLLM's KV cache holds). With a smaller budget `VllmEngine` caps vLLM's own KV cache so
that every request vLLM runs fits in the pool too (`draft_kv.target_kv_blocks`): when the pool
would be full, vLLM's scheduler keeps requests waiting. Should a row still find it full (vLLM's
prefix cache holds a shared prompt once, the drafts once per request), the row is parked: it
is decoded without a proposal and its tokens get records with null variance and bias (null
uncertainty, never an error), until blocks free up and its history is recomputed.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from server.engine import heap, memory_report, speculation_policy, vllm_internals
from server.engine.draft_ensemble import DraftEnsemble, LogMix, RowInput, TopN
from server.engine.eu_channel import Publisher
from server.engine.eu_wire import Record, RequestRecords
from server.engine.proposer_config import ProposerConfig
from server.engine.uncertainty import bias_on_support

log = logging.getLogger(__name__)
FAULT_LOG_EVERY = 100  # a failing proposer logs its 1st fault, then one in every 100
POLICY_LOG_EVERY = 200  # the speculation policy's state is logged every 200 decoding steps


class EnsembleProposer:
    def __init__(self, vllm_config) -> None:
        vllm_internals.apply()  # the plugin's fix, also where VLLM_PLUGINS left the plugin out
        cfg = ProposerConfig.from_vllm_config(vllm_config)
        spec = vllm_config.speculative_config
        self.k = spec.num_speculative_tokens
        self.max_len = vllm_config.model_config.max_model_len
        self.slots = vllm_config.scheduler_config.max_num_seqs
        self.device = vllm_config.device_config.device
        self.cfg = cfg
        self.target_dir = vllm_config.model_config.model  # feature drafts read its embedding
        self.worker_bias = cfg.bias == "worker"
        self.ensemble: DraftEnsemble | None = None
        self.missing_features = 0  # feature drafts: positions fed a zero feature, in all
        self.publisher = Publisher(cfg.channel, cfg.channel_keys) if _is_publishing_rank() else None
        self.memory_report: memory_report.MemoryReport | None = None
        self.faults = 0  # steps whose proposal failed (see propose)
        self.policy = speculation_policy.make(cfg.speculation)
        self._last_end: float | None = None  # when the last propose call with decoding rows ended
        self._steps = 0  # steps with decoding rows

    def load_model(self, *args, **kwargs) -> None:
        vllm_internals.self_test()  # an incompatible vLLM fails here, at start-up
        self.ensemble = DraftEnsemble(
            list(self.cfg.drafts),
            k=self.k,
            slots=self.slots,
            max_len=self.max_len,
            summary=LogMix() if self.worker_bias else TopN(None if self.cfg.top_n < 0 else self.cfg.top_n),
            device=self.device,
            kv_tokens=self.cfg.kv_tokens,
            dtype=getattr(torch, self.cfg.dtype),
            target=self.target_dir,
        )
        vllm_internals.on_requests_finished(self._finished)
        self.heap = heap.start_from_env()  # free heap pages go back to the OS (heap.py)
        self.memory_report = memory_report.start_from_env()  # a diagnostic, off by default
        ens = self.ensemble
        log.info(
            "epispec drafts in %s; their KV cache: %d bytes per token, a pool of %d tokens (%.2f GiB, "
            "blocks of %d tokens); %d max_model_len requests fit at once",
            self.cfg.dtype,
            ens.kv_bytes_per_token,
            ens.pool.capacity_tokens,
            ens.kv_bytes() / (1 << 30),
            ens.pool.block_size,
            ens.pool.capacity_tokens // self.max_len,
        )

    def _finished(self, ids: set[str]) -> None:
        """vLLM's finished set (finished or aborted requests, the step after they end): free their
        draft state now, and tell the API, as no proposal step may follow."""
        if self.ensemble is None or not self.ensemble.forget(ids) or self.publisher is None:
            return
        ens = self.ensemble
        self.publisher.send(ens.num_states(), [], ens.kv_bytes_held(), ens.kv_tokens_held())

    def propose(
        self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None, **kwargs
    ) -> list[list[int]]:
        """The step's proposals; a failure stays inside the step instead of ending vLLM's engine
        core: its rows decode on without proposals, their tokens get null-uncertainty records
        (published, so the API does not wait for them), every draft slot is dropped (the next
        step recomputes from the histories), and the fault is counted on the side channel and
        logged (the 1st, then one in every FAULT_LOG_EVERY)."""
        if self.memory_report is not None:
            self.memory_report.maybe_write()
        try:
            return self._propose(
                sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings, **kwargs
            )
        except Exception:
            self._last_end = None
            self.faults += 1
            if self.faults % FAULT_LOG_EVERY == 1:
                log.exception(
                    "epispec proposer: a step failed (%d so far); decoding on without drafts", self.faults
                )
            if self.ensemble is not None:
                self.ensemble.release(set())
            if self.publisher is not None:
                req_ids = list(vllm_internals.current_step().runner.input_batch.req_ids)[
                    : len(sampled_token_ids)
                ]
                reqs = []
                for i, rid in enumerate(req_ids):
                    n, e = int(num_tokens_no_spec[i]), len(sampled_token_ids[i])
                    if e:
                        nulls = [Record.exact(j, math.nan, None) for j in range(n - e, n)]
                        reqs.append(RequestRecords(rid, 0, 0, 0, 0.0, nulls))
                self.publisher.faults = self.faults
                self.publisher.send(0, reqs)
            return [[] for _ in sampled_token_ids]

    def _propose(
        self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None, **kwargs
    ) -> list[list[int]]:
        start = time.perf_counter()
        step = vllm_internals.current_step()
        self._time_step(step, start)
        runner = step.runner
        req_ids = list(runner.input_batch.req_ids)[: len(sampled_token_ids)]
        seeded = {req_ids[i] for i in runner.input_batch.generators if i < len(req_ids)}
        rows = []
        for i, rid in enumerate(req_ids):
            n = int(num_tokens_no_spec[i])
            emitted = sampled_token_ids[i]
            feats = step.features(i) if self.ensemble.features else None
            rows.append(
                RowInput(
                    rid,
                    torch.from_numpy(token_ids_cpu[i, :n].astype("int64")),
                    len(emitted),
                    features=None if feats is None else feats[1],
                    feature_start=0 if feats is None else feats[0],
                )
            )
        self.ensemble.release(set(req_ids))
        outs = self.ensemble.propose(
            rows, lambda live, confs: self.policy.choose(confs, [r.req_id in seeded for r in live])
        )
        for o in outs:
            if o.verified:
                self.policy.observe_verified(o.verified, o.accepted)
        missing = sum(o.missing_features for o in outs)
        if missing:  # prefix-cache hits or a parked row's recompute: the drafts read zeros there
            first = not self.missing_features
            self.missing_features += missing
            (log.warning if first else log.debug)(
                "epispec feature drafts: %d positions without the target's hidden state this step "
                "(%d so far; vLLM's prefix cache computes none for the tokens it serves): the drafts "
                "read zeros there, so their context is weaker (no request fails; every token keeps "
                "its EU); --no-prefix-caching avoids it",
                missing,
                self.missing_features,
            )
        biases = self._biases(step, rows, outs) if self.worker_bias else None
        if self.publisher is not None:
            if self.worker_bias:
                recs = [
                    [
                        Record.exact(rec.position, rec.variance, b)
                        for rec, b in zip(o.records, bs, strict=True)
                    ]
                    for o, bs in zip(outs, biases, strict=True)
                ]
            else:
                recs = [
                    [
                        Record.of_top_n(rec.position, rec.variance, rec.ids.numpy(), rec.probs.numpy())
                        for rec in o.records
                    ]
                    for o in outs
                ]
            for i, (r, o) in enumerate(zip(rows, outs, strict=True)):
                if o.parked:  # no room in the drafts' KV pool: null uncertainty, not a stall
                    n = len(r.history)
                    recs[i] = [Record.exact(j, math.nan, None) for j in range(n - r.num_emitted, n)]
            reqs = [
                RequestRecords(r.req_id, o.draft_passes, o.proposed, o.accepted, o.eu_seconds, rs)
                for r, o, rs in zip(rows, outs, recs, strict=True)
                if r.num_emitted
            ]
            ens = self.ensemble
            self.publisher.send(ens.num_states(), reqs, ens.kv_bytes_held(), ens.kv_tokens_held())
        end = time.perf_counter()
        decoding = any(r.num_emitted for r in rows)
        if decoding:
            self.policy.observe_proposer(end - start)
            self._steps += 1
            if self._steps % POLICY_LOG_EVERY == 0:
                log.info("epispec speculation: %s", self.policy.describe())
        self._last_end = end if decoding else None
        return [o.proposal for o in outs]

    def _time_step(self, step, start: float) -> None:
        """Hands the policy the seconds and computed positions of the step that just ran, when it
        followed a step with decoding rows (no idle wait between) and decoded only (no prompt
        chunk): T = its sampled positions = its computed tokens."""
        last, self._last_end = self._last_end, None
        if last is None or step.logits is None or step.query_start is None:
            return
        positions = int(step.logits.shape[0])
        if positions and int(step.query_start[-1]) == positions:
            self.policy.observe_step(positions, start - last)

    def _biases(self, step, rows: list[RowInput], outs) -> list[list[float | None]]:
        """Exact KL(q̄ ‖ p) of every record, p from the target's raw logits of this step (one
        batched log-softmax over the rows needed). Adds the time to each row's eu_seconds."""
        start = time.perf_counter()
        meta, logits = step.spec_decode_metadata, step.logits
        if meta is None:  # the plain sampler ran, and it modifies `logits` in place
            raise RuntimeError(
                f"epispec's proposer got a step without speculative metadata: {vllm_internals.VERSION_HINT}."
            )
        ends, drafted = meta.cu_num_sampled_tokens.tolist(), meta.num_draft_tokens
        if logits.shape[0] != ends[-1] or len(ends) < len(rows):
            raise RuntimeError(
                f"epispec's proposer found {logits.shape[0]} logits rows for "
                f"{ends[-1]} sampled positions: {vllm_internals.VERSION_HINT}."
            )
        first = [ends[i] - drafted[i] - 1 for i in range(len(rows))]  # request i's first row
        index, log_mix, where = [], [], []  # logits row, log q̄ [S], (row, record) of each record
        for i, (r, o) in enumerate(zip(rows, outs, strict=True)):
            n0 = len(r.history) - r.num_emitted  # position of the first emitted token
            if r.num_emitted > drafted[i] + 1:
                raise RuntimeError(
                    f"epispec's proposer: {r.num_emitted} tokens emitted from "
                    f"{drafted[i] + 1} logits rows: {vllm_internals.VERSION_HINT}."
                )
            for j, rec in enumerate(o.records):
                index.append(first[i] + rec.position - n0)
                log_mix.append(rec.log_mix)
                where.append((i, j))
        out = [[None] * len(o.records) for o in outs]
        if index:
            idx = torch.tensor(index, device=logits.device)
            raw = logits[idx]  # [R, V]
            bias = bias_on_support(torch.stack(log_mix).to(raw.device), raw, self.ensemble.support).tolist()
            for (i, j), b in zip(where, bias, strict=True):
                out[i][j] = b
        live = [o for r, o in zip(rows, outs, strict=True) if r.num_emitted]
        for o in live:
            o.eu_seconds += (time.perf_counter() - start) / len(live)
        return out


def _is_publishing_rank() -> bool:
    """Only the first tensor-parallel rank publishes (every rank of the last stage proposes)."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except Exception:  # not initialised: a single process
        return True
