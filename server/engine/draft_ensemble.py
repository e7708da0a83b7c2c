"""The draft ensemble as a batched proposer: M Llama-family drafts over one paged KV cache.

Pure torch + transformers (no vLLM): `vllm_proposer.py` adapts vLLM's proposer call to
`DraftEnsemble.propose`, and tests drive it directly.

Every running request owns a *slot*: its blocks of every draft's paged KV cache
(`draft_kv.py`), taken as its history grows and returned when it ends. A propose
round for a batch of requests, given each request's full token history h (n tokens) and the e
tokens the target emitted this step (the last e of h):

    1) feed every request's uncached suffix of h in a batched forward per draft (rows are
       right-padded); its logits give q at the first drafted position and, where the previous
       round's drafts were all accepted, q at the bonus position (the extra draft token is fed
       here, never in a separate pass). Decoding rows (feeds of at most k+1 tokens) share one
       forward; long feeds (new prompts, recomputes) run in forwards of their own, grouped by
       similar length (`_feed_groups`), so decoding rows are never padded to a prompt
    2) k−1 more single-token steps, greedy on the mixture q̄, give a k-token proposal
    3) each emitted position's record (variance, q̄ summary) comes from the previous round's
       drafted positions, or from 1) where the previous round did not cover it; a `choose`
       callback (the speculation policy, `speculation_policy.py`) may cut each row's proposal,
       down to none: the record of the next position, from 1), is kept all the same, so a row
       that proposes nothing feeds one token per round and every emitted token keeps its record

"Cropping" after a rejection is implicit: a slot's valid length is the number of its tokens
that still stand; later writes overwrite the rest and the causal mask never reads past it.
A row's blocks cover its history plus the k − 1 drafted tokens fed in 2); when the pool cannot
supply them the row is *parked* for the round (`RowOutput.parked`: no proposal, no records, its
blocks returned) and starts afresh, recomputing its history, in a later round.
A draft forward pass (EngineStats.draft_forward_passes) is one batched step of all M drafts,
counted per request: each request takes part in exactly one forward of 1) and in the k−1
steps of 2), however many forwards 1) split the batch into (`RowOutput.draft_passes`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.engine.draft_kernels import FeatureGroup, LlamaGroup, signature
from server.engine.draft_kv import DEFAULT_BLOCK_SIZE, BlockPool, PoolFull, kv_bytes_per_token
from server.engine.draft_vocab import DraftVocab, read_draft_vocab
from server.engine.feature_draft import is_feature_draft, load_feature_drafts
from server.engine.uncertainty import mixture_logprobs, variance


@dataclass(frozen=True)
class TopN:
    """Records ship q̄'s `n` most probable tokens as ids and probabilities (None: all of q̄, for
    an exact `bias_topk` on the API side)."""

    n: int | None = 64


@dataclass(frozen=True)
class LogMix:
    """Records keep log q̄ itself ([S], on the drafts' device: over the drafts' vocabulary, the
    target ids `DraftEnsemble.support`, or the target's whole vocabulary where that is None),
    for a bias computed in the same process (bias source "worker")."""


QSummary = TopN | LogMix  # what a record keeps of q̄
# (the decoding rows, q̄ of each token drafted for each) -> tokens each row proposes
Choose = Callable[[list["RowInput"], list[list[float]]], list[int]]


@dataclass
class Record:
    """What the EU of one emitted position needs from the drafts, as tensors in the proposer's
    process (the proposer turns it into the side channel's `eu_wire.Record`): `ids`/`probs`
    under `TopN`, `log_mix` under `LogMix`, the other None."""

    position: int  # index of the token in the request's history
    variance: float
    ids: torch.Tensor | None  # [N] int32
    probs: torch.Tensor | None  # [N] float32
    log_mix: torch.Tensor | None = None  # [S] float32 log q̄ over `DraftEnsemble.support`


@dataclass
class QFields:
    """q̄'s summary at a batch of positions (any leading shape [...]): ids, probs [..., N] under
    `TopN`, or log_mix [..., S] under `LogMix`."""

    ids: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    log_mix: torch.Tensor | None = None

    def map(self, fn) -> QFields:
        """`fn` applied to each present tensor (indexing, stacking's inputs, moving)."""
        return QFields(*(None if t is None else fn(t) for t in (self.ids, self.probs, self.log_mix)))

    @staticmethod
    def stack(parts: list[QFields], dim: int) -> QFields:
        first = parts[0]
        return QFields(
            *(
                None if getattr(first, n) is None else torch.stack([getattr(p, n) for p in parts], dim)
                for n in ("ids", "probs", "log_mix")
            )
        )

    def record(self, position: int, var: float) -> Record:
        """One position's record (its fields indexed down to that position)."""
        return Record(position, var, self.ids, self.probs, self.log_mix)


@dataclass
class RowInput:
    req_id: str
    history: torch.Tensor  # [n] long: prompt + output tokens so far, the emitted ones included
    num_emitted: int  # tokens the target emitted this step (accepted + 1); 0 = not decoding
    # feature drafts: the target's final hidden states of the positions it computed this step,
    # features[i] of position feature_start + i (a prefill chunk too, where num_emitted is 0)
    features: torch.Tensor | None = None  # [F, E]
    feature_start: int = 0


@dataclass
class RowOutput:
    proposal: list[int]
    records: list[Record]
    draft_passes: int  # batched ensemble steps this request took part in this round (1 + k−1;
    # a step 1) split into several forwards by feed length still counts once per request)
    proposed: int  # tokens proposed the previous round (what this step verified)
    accepted: int
    eu_seconds: float = 0.0  # this row's share of the step's variance/q̄-summary time
    parked: bool = False  # the KV pool had no room for this row: no proposal, no records
    confidence: list[float] = field(default_factory=list)  # q̄ of each proposed token
    verified: list[float] = field(default_factory=list)  # q̄ of each token the step verified
    missing_features: int = 0  # positions fed with a zero feature (no hidden state from the target)


@dataclass
class _Slot:
    """A request's place in the drafts' KV cache (its blocks are the pool's table under its
    request id), and what the last round left in it.

    `valid` counts the history tokens whose keys/values stand in the cache; anything past it is
    stale and is overwritten by the next feed (the causal mask never reads past it). The methods
    are the rollback rules, applied in this order each round: `roll_back`, `rewind_for`, `drafted`."""

    valid: int = 0  # tokens of the history whose keys/values stand in the cache
    drafted_from: int = 0  # history length when the last proposal was made
    proposal: list[int] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)  # q̄ of each proposed token
    pending: dict[int, Record] = field(default_factory=dict)  # position -> record
    # feature drafts: a drafted token's keys were computed from a predicted feature, not the
    # target's, so only the history stands after a round, and only the first drafted
    # position's record (read from the target's own feature) is kept
    features: bool = False

    def roll_back(self, n: int, emitted: int) -> None:
        """After the target verified the last proposal (history now n tokens, the last `emitted`
        of them new): of the drafted tokens only the accepted ones that were fed stand (the last
        drafted token is never fed); and at least the newest token must be fed."""
        if self.proposal and not self.features:
            fed_drafts = len(self.proposal) - 1
            self.valid = min(self.valid, self.drafted_from + min(emitted - 1, fed_drafts))
        self.valid = min(self.valid, n - 1)

    def rewind_for(self, n: int, emitted: int) -> list[int]:
        """The positions j − 1 whose logits give an emitted token j with no pending record (the
        bonus token, a recovered one, a new request's first). Where one of them lies before
        `valid` its logits are gone: the cache rewinds there and the suffix is recomputed."""
        missing = [j - 1 for j in range(n - emitted, n) if j not in self.pending and j >= 1]
        if any(j < self.valid for j in missing):
            self.valid = min(missing)
        return missing

    def drafted(
        self, n: int, proposal: list[int], pending: dict[int, Record], confidence: list[float]
    ) -> None:
        """A new proposal drafted from a history of n tokens: every drafted token but the last
        was fed, so n + k − 1 tokens stand; `pending` holds the records of its k positions (of
        position n alone when it proposes none)."""
        self.drafted_from = n
        self.confidence = confidence
        if self.features:
            self.proposal, self.pending = proposal, {j: r for j, r in pending.items() if j == n}
            self.valid = n
            return
        self.proposal, self.pending = proposal, pending
        self.valid = n + max(0, len(proposal) - 1)


@dataclass
class _Live:
    """A decoding row of this round: its request, output and slot, and what step 1) feeds
    (the uncached suffix of its history) and reads (positions that lack a record)."""

    row: RowInput
    out: RowOutput
    slot: _Slot
    feed: torch.Tensor  # [T_b] long
    missing: list[int]  # positions j − 1 (see `_Slot.rewind_for`)
    feats: torch.Tensor | None = None  # [T_b, E] feature drafts: f_{t−1} of each fed token t


@dataclass
class _Scored:
    """Step 1)'s summaries (see `summarize`) of every position it read."""

    var: torch.Tensor  # [P]
    fields: QFields  # [P, ...]
    greedy: torch.Tensor  # [P] long, target ids
    confidence: torch.Tensor  # [P] q̄ of the greedy token
    index: dict[tuple[int, int], int]  # (live row b, position of the token) -> p
    seconds: float  # time spent summarizing
    g: torch.Tensor | None = None  # [M, P, E] feature drafts' predicted features


@dataclass
class _Drafted:
    """Step 2)'s proposal and the summaries of its positions, per live row b and step s."""

    proposal: list[list[int]]  # [B][S]
    var: list[list[float]]  # [B][S]
    confidence: list[list[float]]  # [B][S] q̄ of each drafted token
    fields: QFields  # [B, S, ...]
    ks: list[int]  # tokens each row proposes (the policy's choice, within the room in the caches)
    steps: int  # batched ensemble steps taken (1 + S − 1)
    seconds: float


def _feed_groups(lengths: list[int], short: int) -> list[list[int]]:
    """Rows (indices into `lengths`, the uncached feed lengths) grouped for step 1's forwards.

    Rows feeding at most `short` tokens (decoding: the emitted tokens, the bonus draft) run
    together; longer feeds (new prompts, recomputes) run apart from them, longest first, a row
    joining the previous long group while its feed is at least 3/4 of that group's longest, so
    no decode row is padded to a prompt and a long group wastes at most a quarter on padding."""
    groups = [[b for b, n in enumerate(lengths) if n <= short]]
    for b in sorted((b for b, n in enumerate(lengths) if n > short), key=lambda b: -lengths[b]):
        if len(groups) > 1 and 4 * lengths[b] >= 3 * lengths[groups[-1][0]]:
            groups[-1].append(b)
        else:
            groups.append([b])
    return [g for g in groups if g]


def _confidence(f: QFields) -> torch.Tensor:
    """q̄ of the greedy token at each position: the top-1 probability. [P, ...] -> [P] float"""
    if f.log_mix is not None:
        return f.log_mix.max(-1).values.exp().float().cpu()
    return f.probs[..., 0].float().cpu()


def summarize(draft_lp: torch.Tensor, summary: QSummary, vocab: DraftVocab | None = None):
    """Per position: exact variance, the record's fields of q̄, q̄'s greedy token.
    [P, M, V_d] -> [P], QFields [P, ...], [P] long (target ids)

    fields: ids [P, N] int32 target ids and probs [P, N] of q̄'s top-N (`TopN`; n None: N = V_d),
    or log q̄ [P, V_d] over the drafts' vocabulary (`LogMix`: never expanded to the target's V,
    `DraftEnsemble.support` maps it). With a reduced vocabulary (V_d < V) everything is computed
    over S: q̄ is 0 outside S."""
    log_mix = mixture_logprobs(draft_lp)  # [P, V_d]
    var = variance(draft_lp, log_mix)  # [P]
    greedy = log_mix.argmax(-1)  # [P] draft ids
    if vocab is not None:
        greedy = vocab.to_target(greedy)
    if isinstance(summary, LogMix):
        return var, QFields(log_mix=log_mix), greedy
    n = log_mix.shape[-1] if summary.n is None else min(summary.n, log_mix.shape[-1])
    probs, ids = log_mix.exp().topk(n, dim=-1)  # [P, N]
    if vocab is not None:
        ids = vocab.to_target(ids)
    return var, QFields(ids=ids.to(torch.int32), probs=probs), greedy


class DraftEnsemble:
    """M drafts proposing k tokens per round for concurrent requests of up to `max_len` tokens.

    Records keep what `summary` says of q̄: its top-N (`TopN`) or log q̄ itself (`LogMix`).

    KV memory: `kv_bytes_per_token` bytes (2 × layers × Hkv × head_dim × the dtype's size, summed
    over the drafts) for each token a request holds, in blocks of `block_size` tokens from a pool
    of `kv_tokens` tokens (default `slots` × `max_len`: every one of `slots` requests at full
    length). A request holds ⌈(history + k − 1) / block_size⌉ blocks. Weights and caches are in
    `dtype` (float32 by default: on CPUs without bf16 matmul units bf16 is the slower one)."""

    def __init__(
        self,
        paths: list[str | Path],
        *,
        k: int,
        slots: int,
        max_len: int,
        summary: QSummary = TopN(),
        device: str | torch.device = "cpu",
        kv_tokens: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        dtype: torch.dtype = torch.float32,
        target: str | Path | None = None,
    ) -> None:
        self.device = torch.device(device)
        if (
            not isinstance(summary, TopN | LogMix)
            or isinstance(summary, TopN)
            and summary.n is not None
            and summary.n < 1
        ):
            raise ValueError(f"summary must be TopN(n >= 1 or None) or LogMix(), not {summary!r}.")
        self.k, self.summary, self.max_len = k, summary, max_len
        self.pool = BlockPool.for_tokens(kv_tokens or slots * max_len, block_size)
        self._slots: dict[str, _Slot] = {}
        self._feats: dict[str, tuple[int, torch.Tensor]] = {}  # req -> (first position, [F, E])
        self.features = bool(paths) and is_feature_draft(paths[0])
        if self.features:
            if target is None:
                raise ValueError(
                    "Feature drafts need the target's folder (its embedding is their input and head)."
                )
            fd = load_feature_drafts(list(paths), target, self.device, dtype)
            self.vocab: DraftVocab | None = fd.vocab
            self.drafts = [FeatureGroup(fd, self.pool, self.device, dtype)]
            s = fd.spec
            kv = {"num_hidden_layers": 1, "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads}
            self.kv_bytes_per_token = kv_bytes_per_token([{**kv, "head_dim": s.head_dim}] * fd.m, dtype)
            return
        self._load_llama(paths, dtype)

    def _load_llama(self, paths: list[str | Path], dtype: torch.dtype) -> None:
        from server.engine.models import load_causal_lm

        groups: dict[tuple, list] = {}
        vocabs = [read_draft_vocab(p) for p in paths]
        if (
            any(v is None for v in vocabs)
            and not all(v is None for v in vocabs)
            or any(not v.same_as(vocabs[0]) for v in vocabs if v is not None)
        ):
            raise ValueError(
                "The drafts must all use the target's vocabulary, or all the same "
                "reduced vocabulary (draft_vocab.json)."
            )
        self.vocab = vocabs[0] if vocabs else None
        for p in paths:
            lm = load_causal_lm(p, str(self.device), dtype)
            if (
                not hasattr(lm, "model")
                or not hasattr(lm.model, "rotary_emb")
                or (getattr(lm.config, "hidden_act", "silu") != "silu")
            ):
                raise ValueError(
                    f"Draft '{p}' is not a Llama-family model (the proposer needs "
                    "embed_tokens, rotary_emb, SiLU MLPs and Llama decoder layers)."
                )
            groups.setdefault(signature(lm), []).append(lm)
        # drafts of one shape run as one stacked group; the order of M does not matter
        self.drafts = [LlamaGroup(lms, self.pool, self.device, self.vocab, dtype) for lms in groups.values()]
        self.kv_bytes_per_token = kv_bytes_per_token(
            [lm.config for lms in groups.values() for lm in lms], dtype
        )

    @property
    def support(self) -> torch.Tensor | None:
        """[S] long: the target id of each entry of a `LogMix` record's log q̄ (None: S is the
        target's whole vocabulary, in its order)."""
        return None if self.vocab is None else self.vocab.target_ids

    def target_log_mix(self, log_mix: torch.Tensor) -> torch.Tensor:
        """A `LogMix` record's log q̄ over the target's vocabulary (−inf outside S). [..., S] -> [..., V]"""
        return log_mix if self.vocab is None else self.vocab.expand(log_mix)

    def num_states(self) -> int:
        """Requests holding a slot (0 when idle: aborts and finishes free their state)."""
        return len(self._slots)

    def kv_bytes(self) -> int:
        """Bytes of the pool's storage (reserved; on CPU only touched pages are resident)."""
        return sum(d.kv.nbytes() for d in self.drafts)

    def kv_bytes_held(self, req_id: str | None = None) -> int:
        """Bytes of the blocks held by `req_id` (by every request: None)."""
        blocks = self.pool.blocks_in_use() if req_id is None else len(self.pool.blocks_of(req_id))
        return blocks * self.pool.block_size * self.kv_bytes_per_token

    def kv_tokens_held(self) -> int:
        """Tokens whose keys and values stand in the cache, over every request."""
        return sum(st.valid for st in self._slots.values())

    def release(self, keep: set[str]) -> None:
        """Free the slots (and KV blocks) of requests not in `keep` (finished or aborted)."""
        self.forget({r for r in (*self._slots, *self._feats) if r not in keep})

    def forget(self, ids: set[str]) -> int:
        """Free the slots (and KV blocks) of these requests (vLLM says they finished or were
        aborted); returns how many held a slot or features."""
        held = [r for r in ids if r in self._slots or r in self._feats]
        for rid in held:
            if rid in self._slots:
                self._drop(rid)
            self._feats.pop(rid, None)
        return len(held)

    def _drop(self, rid: str) -> None:
        del self._slots[rid]
        self.pool.free(rid)

    @torch.inference_mode()
    def propose(self, rows: list[RowInput], choose: Choose | None = None) -> list[RowOutput]:
        """Records and proposals of a round. `choose(rows, confidences)` (the decoding rows; per
        row, q̄ of its first drafted token, repeated for each token it has room to propose) returns
        how many tokens each row proposes (None: all it has room for); step 2) drafts as many as the
        longest choice."""
        outs = [RowOutput([], [], 0, 0, 0) for _ in rows]
        if self.features:
            self._keep_features(rows)
        live = self._bookkeeping(rows, outs)
        if not live:
            return outs
        nb = max(len(self.pool.blocks_of(lv.row.req_id)) for lv in live)
        table = self.pool.table([lv.row.req_id for lv in live], nb, self.device)  # [B, nb]
        first = self._first_step(live, table)
        last_idx = torch.tensor([first.index[(b, len(lv.row.history))] for b, lv in enumerate(live)])
        ks = [max(0, min(self.k, self.max_len - len(lv.row.history) - 1)) for lv in live]  # room
        if choose is not None:
            conf = first.confidence[last_idx].tolist()  # [B]
            chosen = choose([lv.row for lv in live], [[c] * k for c, k in zip(conf, ks, strict=True)])
            ks = [min(k, max(0, int(c))) for k, c in zip(ks, chosen, strict=True)]
        drafted = self._greedy_steps(live, table, first, last_idx, ks)
        self._assemble(live, first, drafted)
        return outs

    def _bookkeeping(self, rows: list[RowInput], outs: list[RowOutput]) -> list[_Live]:
        """The decoding rows: a slot for each (new requests take one), the previous round's
        counts, the cache rolled back to the tokens that stand, and what step 1) must feed.
        Blocks go to requests already holding some first; a row the pool cannot hold is parked."""
        live = []
        rows_out = [(r, o) for r, o in zip(rows, outs, strict=True) if r.num_emitted > 0]
        rows_out.sort(key=lambda ro: ro[0].req_id not in self._slots)  # stable: running first
        for r, out in rows_out:
            n, e = len(r.history), r.num_emitted
            try:  # positions up to n + k − 2 are written (the drafted tokens fed in step 2)
                fresh = self.pool.ensure(r.req_id, min(n + self.k - 1, self.max_len))
            except PoolFull:
                if r.req_id in self._slots:
                    self._drop(r.req_id)
                out.parked = True
                continue
            for d in self.drafts:
                d.kv.zero(fresh)
            st = self._slots.get(r.req_id)
            if st is None:
                st = self._slots[r.req_id] = _Slot(features=self.features)
            if st.proposal:
                out.proposed, out.accepted = len(st.proposal), e - 1
                out.verified = st.confidence
            st.roll_back(n, e)
            missing = st.rewind_for(n, e)
            lv = _Live(r, out, st, r.history[st.valid :], missing)
            if self.features:
                lv.feats, out.missing_features = self._features_for(r.req_id, st.valid, n)
            live.append(lv)
        order = {id(r): i for i, r in enumerate(rows)}
        return sorted(live, key=lambda lv: order[id(lv.row)])

    def _keep_features(self, rows: list[RowInput]) -> None:
        """Append each row's new target features to its request's buffer (prefill chunks too)."""
        for r in rows:
            if r.features is None or not len(r.features):
                continue
            old = self._feats.get(r.req_id)
            new = r.features.to(self.device, torch.float32)  # [F, E]
            if old is not None and old[0] + len(old[1]) == r.feature_start:  # contiguous: extend
                self._feats[r.req_id] = (old[0], torch.cat([old[1], new]))
            else:  # a recompute (preemption) starts over
                self._feats[r.req_id] = (r.feature_start, new)

    def _features_for(self, rid: str, valid: int, n: int) -> tuple[torch.Tensor, int]:
        """f_{t−1} for the fed tokens t ∈ [valid, n), and how many were not available (zeros: a
        position vLLM served from its prefix cache, or one before a parked row's recompute). The
        buffer keeps position n − 2 on: what the next round can read. -> [n − valid, E], count"""
        start, buf = self._feats.get(rid, (0, None))
        E = self.drafts[0].drafts.spec.hidden
        out = torch.zeros(n - valid, E, device=self.device)  # [T_b, E]
        want = torch.arange(valid - 1, n - 1)  # positions of the features read
        have = (want >= start) & (want < start + (0 if buf is None else len(buf)))
        if buf is not None and bool(have.any()):
            out[have.to(self.device)] = buf[(want[have] - start).to(self.device)]
        missing = int((~have).sum()) - int(valid == 0)  # position −1 has no feature by definition
        if buf is not None:
            keep = max(0, n - 2 - start)  # n − 2 too: a rewind by one position (no proposal) reads it
            self._feats[rid] = (start + keep, buf[keep:])
        return out, max(0, missing)

    def _first_step(self, live: list[_Live], table: torch.Tensor) -> _Scored:
        """1) Batched forwards over the uncached suffixes, one per feed-length group; the
        summaries of the positions that lack a record and of each row's newest token."""
        dev = self.device
        out_rows, out_cols, out_pos = [], [], []  # per needed position: row b, column in its feed
        for b, lv in enumerate(live):
            for p in [*lv.missing, len(lv.row.history) - 1]:
                out_rows.append(b)
                out_cols.append(p - lv.slot.valid)
                out_pos.append(p + 1)  # the record is for the token at p + 1
        parts, order, g_parts = [], [], []  # per group: log-probs [P_g, M, V]; the global indices of its P_g
        for group in _feed_groups([len(lv.feed) for lv in live], self.k + 1):
            local = {b: g for g, b in enumerate(group)}
            p_g = [p_i for p_i, b in enumerate(out_rows) if b in local]
            T = max(len(live[b].feed) for b in group)
            tokens = torch.zeros(len(group), T, dtype=torch.long)
            feats = torch.zeros(len(group), T, live[0].feats.shape[-1], device=dev) if self.features else None
            valid = torch.zeros(len(group), T, dtype=torch.bool)
            pos = torch.zeros(len(group), T, dtype=torch.long)
            for g, b in enumerate(group):
                f, start = live[b].feed, live[b].slot.valid
                tokens[g, : len(f)] = f
                if feats is not None:
                    feats[g, : len(f)] = live[b].feats
                valid[g, : len(f)] = True
                pos[g, : len(f)] = torch.arange(start, start + len(f))
            idx = (
                torch.tensor([local[out_rows[p_i]] for p_i in p_g], device=dev),
                torch.tensor([out_cols[p_i] for p_i in p_g], device=dev),
            )
            tokens, pos, valid = tokens.to(dev), pos.to(dev), valid.to(dev)
            res = [d.forward(tokens, feats, pos, table[group], valid, idx) for d in self.drafts]
            parts.append(torch.cat([lp for lp, _ in res], 1))  # [P_g, M, V]
            if self.features:
                g_parts.append(res[0][1])  # [M, P_g, E]
            order.extend(p_g)
        lp = torch.cat(parts)  # [P, M, V], back in out_rows order below
        g = torch.cat(g_parts, 1) if self.features else None  # [M, P, E]
        if order != sorted(order):
            back = torch.tensor(order).argsort().to(dev)
            lp = lp[back]
            g = g[:, back] if g is not None else None
        t0 = time.perf_counter()
        var, fields, greedy = summarize(lp, self.summary, self.vocab)
        index = {(b, position): p_i for p_i, (b, position) in enumerate(zip(out_rows, out_pos, strict=True))}
        return _Scored(var, fields, greedy, _confidence(fields), index, time.perf_counter() - t0, g)

    def _greedy_steps(
        self, live: list[_Live], table: torch.Tensor, first: _Scored, last_idx: torch.Tensor, ks: list[int]
    ) -> _Drafted:
        """2) The proposal: greedy on q̄ from step 1)'s newest position (`last_idx`), then
        max(ks) − 1 batched single-token steps (row b proposes ks[b] tokens)."""
        dev, B = self.device, len(live)
        n_hist = torch.tensor([len(lv.row.history) for lv in live])
        step_var = [first.var[last_idx]]  # each [B]
        step_fields = [first.fields.map(lambda t: t[last_idx])]  # each [B, ...]
        step_conf = [first.confidence[last_idx]]  # each [B]
        cur = first.greedy[last_idx].to(dev)  # [B] target ids
        own = first.g[:, last_idx.to(dev), None] if first.g is not None else None  # [M, B, 1, E]
        proposal = [cur]
        ones = torch.ones(B, 1, dtype=torch.bool, device=dev)
        arange_b = (torch.arange(B, device=dev), torch.zeros(B, dtype=torch.long, device=dev))
        seconds = 0.0
        for s in range(1, max(ks, default=0)):
            p_s = (n_hist + s - 1).clamp(max=self.max_len - 1).to(dev)[:, None]  # [B, 1]
            res = [d.forward(cur[:, None].to(dev), own, p_s, table, ones, arange_b) for d in self.drafts]
            lp = torch.cat([lp_d for lp_d, _ in res], 1)  # [B, M, V]
            if own is not None:
                own = res[0][1][:, :, None]  # [M, B, 1, E]: each draft's own predicted feature
            t0 = time.perf_counter()
            v_s, fields_s, greedy_s = summarize(lp, self.summary, self.vocab)
            seconds += time.perf_counter() - t0
            step_conf.append(_confidence(fields_s))
            step_var.append(v_s)
            step_fields.append(fields_s)
            cur = greedy_s
            proposal.append(cur)
        return _Drafted(
            proposal=torch.stack(proposal, 1).tolist(),  # [B, S]
            var=torch.stack(step_var, 1).tolist(),  # [B, S]
            confidence=torch.stack(step_conf, 1).tolist(),  # [B, S]
            fields=self._host(QFields.stack(step_fields, 1)),  # [B, S, ...]
            ks=ks,
            steps=1 + max(0, max(ks, default=0) - 1),
            seconds=seconds,
        )

    def _assemble(self, live: list[_Live], first: _Scored, drafted: _Drafted) -> None:
        """3) Each row's output: the records of its emitted positions (pending from the last
        round, else from step 1)), its new proposal and the pending records of that (at least
        position n's, from step 1, when it proposes none), counts."""
        var_l = first.var.tolist()
        fields_c = self._host(first.fields)
        share = (first.seconds + drafted.seconds) / len(live)
        ks = drafted.ks
        for b, lv in enumerate(live):
            r, st, out = lv.row, lv.slot, lv.out
            n, e = len(r.history), r.num_emitted
            for j in range(n - e, n):
                rec = st.pending.get(j)
                if rec is None and (b, j) in first.index:
                    p_i = first.index[(b, j)]
                    rec = fields_c.map(lambda t, p_i=p_i: t[p_i]).record(j, var_l[p_i])
                if rec is not None:
                    out.records.append(rec)
            k_b = ks[b]
            proposal = drafted.proposal[b][:k_b]
            st.drafted(
                n,
                proposal,
                {
                    n + s: drafted.fields.map(lambda t, b=b, s=s: t[b, s]).record(n + s, drafted.var[b][s])
                    for s in range(max(k_b, 1))  # position n's record (step 1's) stands without a proposal
                },
                drafted.confidence[b][:k_b],
            )
            out.proposal = list(proposal)
            out.confidence = drafted.confidence[b][:k_b]
            out.draft_passes = drafted.steps
            out.eu_seconds = share

    def _host(self, f: QFields) -> QFields:
        """Top-N fields go to the host (they are shipped); log q̄ stays where it is used."""
        return f.map(lambda t: t.cpu()) if isinstance(self.summary, TopN) else f


def log_mix_from_record(rec_ids: torch.Tensor, rec_probs: torch.Tensor, vocab: int) -> torch.Tensor:
    """q̄ as full-vocabulary log-probs from a record; tokens outside its top-N get −inf. [N],[N] -> [V]"""
    log_mix = torch.full((vocab,), -math.inf)
    log_mix[rec_ids.long()] = rec_probs.float().log()
    return log_mix
