"""The draft ensemble as vLLM's speculative proposer (`speculative_config.method="custom_class"`).

vLLM builds `EnsembleProposer(vllm_config)` inside the process that runs its model runner
(the engine core, or the last pipeline rank's worker), calls `load_model(target)` once and
`propose(...)` after every step's bookkeeping. Settings come from
`vllm_config.additional_config["epispec"]` (drafts, channel address, top-N, slots).

vLLM hands `propose` token histories by batch row, not request ids. The rows' request ids
are the runner's `input_batch.req_ids`; the runner is the caller of `propose`, so it is read
from the calling frame (vLLM 0.32's V1 runner; the version line is pinned). With real ids the
proposer keeps one KV-cache slot per request and publishes each emitted position's record
under its request id (see eu_channel.py).
"""

from __future__ import annotations

import sys

import torch

from server.engine.draft_ensemble import DraftEnsemble, RowInput
from server.engine.eu_channel import Publisher


class EnsembleProposer:
    def __init__(self, vllm_config) -> None:
        cfg = vllm_config.additional_config["epispec"]
        spec = vllm_config.speculative_config
        self.k = spec.num_speculative_tokens
        self.max_len = vllm_config.model_config.max_model_len
        self.slots = vllm_config.scheduler_config.max_num_seqs
        self.device = vllm_config.device_config.device
        self.cfg = cfg
        self.ensemble: DraftEnsemble | None = None
        self.publisher = Publisher(cfg["channel"]) if _is_publishing_rank() else None

    def load_model(self, *args, **kwargs) -> None:
        self.ensemble = DraftEnsemble(
            self.cfg["drafts"], k=self.k, slots=self.slots, max_len=self.max_len,
            top_n=self.cfg["top_n"], device=self.device,
        )

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None,
                **kwargs) -> list[list[int]]:
        runner = sys._getframe(1).f_locals.get("self")
        batch = getattr(runner, "input_batch", None)
        if batch is None:
            raise RuntimeError("epispec's proposer could not find vLLM's input batch: the custom "
                               "proposer interface changed; use vLLM 0.32.")
        req_ids = list(batch.req_ids)[: len(sampled_token_ids)]
        rows = []
        for i, rid in enumerate(req_ids):
            n = int(num_tokens_no_spec[i])
            emitted = sampled_token_ids[i]
            rows.append(RowInput(rid, torch.from_numpy(token_ids_cpu[i, :n].astype("int64")),
                                 len(emitted), _is_final(runner.requests.get(rid), emitted, n)))
        self.ensemble.release(set(req_ids))
        outs = self.ensemble.propose(rows)
        if self.publisher is not None:
            reqs = [
                (r.req_id, o.draft_passes, o.proposed, o.accepted, o.eu_seconds,
                 [(rec.position, rec.variance, rec.ids.numpy(), rec.probs.numpy()) for rec in o.records])
                for r, o in zip(rows, outs, strict=True) if r.num_emitted
            ]
            self.publisher.send({"live": self.ensemble.num_states(), "reqs": reqs})
        return [o.proposal for o in outs]


def _is_final(state, emitted: list[int], n: int) -> bool:
    """Whether this step ends the request (so its slot is freed now, not at the next step)."""
    if state is None or state.sampling_params is None or not emitted:
        return False
    sp = state.sampling_params
    out_len = n - len(state.prompt_token_ids or ())
    if sp.max_tokens is not None and out_len >= sp.max_tokens:
        return True
    if not sp.ignore_eos and out_len >= (sp.min_tokens or 0):
        return any(t in sp.all_stop_token_ids for t in emitted)
    return False


def _is_publishing_rank() -> bool:
    """Only the first tensor-parallel rank publishes (every rank of the last stage proposes)."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except Exception:  # not initialised: a single process
        return True
