"""The draft ensemble as a batched proposer: M Llama-family drafts, one slot KV cache per draft.

Pure torch + transformers (no vLLM): `vllm_proposer.py` adapts vLLM's proposer call to
`DraftEnsemble.propose`, and tests drive it directly.

Every running request owns a *slot* (a row of each draft's preallocated KV cache). A propose
round for a batch of requests, given each request's full token history h (n tokens) and the e
tokens the target emitted this step (the last e of h):

    1) feed every request's uncached suffix of h in ONE batched forward per draft (rows are
       right-padded); its logits give q at the first drafted position and, where the previous
       round's drafts were all accepted, q at the bonus position (the extra draft token is fed
       here, never in a separate pass)
    2) k−1 more single-token steps, greedy on the mixture q̄, give a k-token proposal
    3) each emitted position's record (variance, q̄ summary) comes from the previous round's
       drafted positions, or from 1) where the previous round did not cover it

"Cropping" after a rejection is implicit: a slot's valid length is the number of its tokens
that still stand; later writes overwrite the rest and the causal mask never reads past it.
A draft forward pass (EngineStats.draft_forward_passes) is one batched step of all M drafts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.engine.uncertainty import mixture_logprobs, variance


@dataclass
class Record:
    """What the EU of one emitted position needs from the drafts.

    `ids`/`probs` are q̄'s top-N token ids and probabilities (N = V: all of q̄, exact bias)."""

    position: int  # index of the token in the request's history
    variance: float
    ids: torch.Tensor  # [N] int32
    probs: torch.Tensor  # [N] float32


@dataclass
class RowInput:
    req_id: str
    history: torch.Tensor  # [n] long: prompt + output tokens so far, the emitted ones included
    num_emitted: int  # tokens the target emitted this step (accepted + 1); 0 = not decoding
    final: bool = False  # the request ends with this step: free its slot after recording


@dataclass
class RowOutput:
    proposal: list[int]
    records: list[Record]
    draft_passes: int  # batched ensemble steps this request took part in this round
    proposed: int  # tokens proposed the previous round (what this step verified)
    accepted: int


@dataclass
class _Slot:
    index: int
    valid: int = 0  # tokens of the history whose keys/values stand in the cache
    drafted_from: int = 0  # history length when the last proposal was made
    proposal: list[int] = field(default_factory=list)
    pending: dict[int, Record] = field(default_factory=dict)  # position -> record


class _SlotDraft:
    """One Llama-family causal LM evaluated over cache slots with per-row positions."""

    def __init__(self, lm, slots: int, max_len: int, device: torch.device) -> None:
        cfg = lm.config
        self.lm = lm
        self.layers = lm.model.layers
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = self.layers[0].self_attn.head_dim
        shape = (len(self.layers), slots, self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, device=device)  # [layers, slots, Hkv, L, D]
        self.v_cache = torch.zeros(shape, device=device)

    def forward(self, tokens, pos, slots, valid, out_index) -> torch.Tensor:
        """tokens/pos/valid [B, T], slots [B], out_index (rows [P], cols [P]) -> log-probs [P, V]."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        B, T = tokens.shape
        h = self.lm.model.embed_tokens(tokens)  # [B, T, E]
        cos, sin = self.lm.model.rotary_emb(h, pos)  # [B, T, D]
        n_keys = int(pos.max()) + 1
        mask = torch.arange(n_keys, device=h.device)[None, None, :] <= pos[:, :, None]  # [B, T, K]
        w_slot = slots[:, None].expand(B, T)[valid]  # [Nv]
        w_pos = pos[valid]  # [Nv]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
            k = attn.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.k_cache[i][w_slot, :, w_pos] = k.transpose(1, 2)[valid]  # [Nv, Hkv, D]
            self.v_cache[i][w_slot, :, w_pos] = v.transpose(1, 2)[valid]
            keys = self.k_cache[i][slots, :, :n_keys]  # [B, Hkv, K, D]
            vals = self.v_cache[i][slots, :, :n_keys]
            o = torch.nn.functional.scaled_dot_product_attention(
                q, keys, vals, attn_mask=mask[:, None], scale=attn.scaling,
                enable_gqa=self.heads != self.kv_heads,
            )  # [B, H, T, D]
            h = h + attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.lm.model.norm(h[out_index])  # [P, E]
        return torch.log_softmax(self.lm.lm_head(h).float(), -1)  # [P, V]


def summarize(draft_lp: torch.Tensor, top_n: int):
    """Per position: exact variance and q̄'s top-N. [P, M, V] -> [P], [P, N] int32, [P, N]"""
    log_mix = mixture_logprobs(draft_lp)  # [P, V]
    var = variance(draft_lp, log_mix)  # [P]
    n = min(top_n, log_mix.shape[-1]) if top_n > 0 else log_mix.shape[-1]
    probs, ids = log_mix.exp().topk(n, dim=-1)  # [P, N]
    return var, ids.to(torch.int32), probs, log_mix


class DraftEnsemble:
    """M drafts proposing k tokens per round for up to `slots` concurrent requests."""

    def __init__(self, paths: list[str | Path], *, k: int, slots: int, max_len: int,
                 top_n: int = 64, device: str | torch.device = "cpu") -> None:
        from server.engine.models import load_causal_lm

        self.device = torch.device(device)
        self.k, self.top_n, self.max_len = k, top_n, max_len
        self.drafts = []
        for p in paths:
            lm = load_causal_lm(p, str(self.device), torch.float32)
            if not hasattr(lm, "model") or not hasattr(lm.model, "rotary_emb"):
                raise ValueError(f"Draft '{p}' is not a Llama-family model (the proposer needs "
                                 "embed_tokens, rotary_emb and Llama decoder layers).")
            self.drafts.append(_SlotDraft(lm, slots, max_len, self.device))
        self._free = list(range(slots - 1, -1, -1))
        self._slots: dict[str, _Slot] = {}

    def num_states(self) -> int:
        """Requests holding a slot (0 when idle: aborts and finishes free their state)."""
        return len(self._slots)

    def release(self, keep: set[str]) -> None:
        """Free the slots of requests not in `keep` (finished or aborted)."""
        for rid in [r for r in self._slots if r not in keep]:
            self._free.append(self._slots.pop(rid).index)

    @torch.inference_mode()
    def propose(self, rows: list[RowInput]) -> list[RowOutput]:
        outs = [RowOutput([], [], 0, 0, 0) for _ in rows]
        live = [i for i, r in enumerate(rows) if r.num_emitted > 0]
        if not live:
            return outs
        # --- bookkeeping: which tokens stand, which emitted positions lack a record
        feeds, need = [], []  # per live row: tokens to feed, positions (j-1) whose logits we need
        states = []
        for i in live:
            r, out = rows[i], outs[i]
            st = self._slots.get(r.req_id)
            if st is None:
                st = self._slots[r.req_id] = _Slot(self._free.pop())
            n, e = len(r.history), r.num_emitted
            if st.proposal:
                out.proposed = len(st.proposal)
                out.accepted = e - 1
                fed_drafts = len(st.proposal) - 1  # the last drafted token is never fed
                st.valid = min(st.valid, st.drafted_from + min(e - 1, fed_drafts))
            st.valid = min(st.valid, n - 1)  # at least the newest token is fed
            wanted = range(n - e, n)
            missing = [j - 1 for j in wanted if j not in st.pending and j >= 1]
            if any(j < st.valid for j in missing):  # a record predates the cache: recompute
                st.valid = min(missing)
            feeds.append(r.history[st.valid:])
            need.append((missing, n - 1))
            states.append(st)
        # --- 1) one batched forward over every uncached suffix
        B = len(live)
        T = max(len(f) for f in feeds)
        tokens = torch.zeros(B, T, dtype=torch.long)
        valid = torch.zeros(B, T, dtype=torch.bool)
        pos = torch.zeros(B, T, dtype=torch.long)
        out_rows, out_cols, out_pos = [], [], []
        for b, (f, st, (missing, last)) in enumerate(zip(feeds, states, need, strict=True)):
            tokens[b, : len(f)] = f
            valid[b, : len(f)] = True
            pos[b, : len(f)] = torch.arange(st.valid, st.valid + len(f))
            for p in [*missing, last]:
                out_rows.append(b)
                out_cols.append(p - st.valid)
                out_pos.append(p + 1)  # the record is for the token at p + 1
        slots = torch.tensor([st.index for st in states], device=self.device)
        dev = self.device
        tokens, pos, valid = tokens.to(dev), pos.to(dev), valid.to(dev)
        idx = (torch.tensor(out_rows, device=dev), torch.tensor(out_cols, device=dev))
        lp = torch.stack([d.forward(tokens, pos, slots, valid, idx) for d in self.drafts], 1)  # [P, M, V]
        var, ids, probs, log_mix = summarize(lp, self.top_n)
        fresh = {}
        for p_i, (b, position) in enumerate(zip(out_rows, out_pos, strict=True)):
            fresh[(b, position)] = p_i
        # --- 2) k−1 single-token steps from the mixture, greedy
        last_idx = torch.tensor([fresh[(b, len(rows[i].history))] for b, i in enumerate(live)])
        n_hist = torch.tensor([len(rows[i].history) for i in live])
        ks = [min(self.k, self.max_len - int(n) - 1) for n in n_hist]  # room in the drafts' caches
        step_var = [var[last_idx]]  # each [B]
        step_ids, step_probs = [ids[last_idx]], [probs[last_idx]]
        cur = log_mix[last_idx].argmax(-1)  # [B]
        proposal = [cur]
        ones = torch.ones(B, 1, dtype=torch.bool, device=dev)
        arange_b = (torch.arange(B, device=dev), torch.zeros(B, dtype=torch.long, device=dev))
        for s in range(1, max(ks)):
            p_s = (n_hist + s - 1).clamp(max=self.max_len - 1).to(dev)[:, None]  # [B, 1]
            lp = torch.stack([d.forward(cur[:, None].to(dev), p_s, slots, ones, arange_b)
                              for d in self.drafts], 1)  # [B, M, V]
            v_s, i_s, pr_s, lm_s = summarize(lp, self.top_n)
            step_var.append(v_s)
            step_ids.append(i_s)
            step_probs.append(pr_s)
            cur = lm_s.argmax(-1)
            proposal.append(cur)
        n_steps = 1 + max(0, max(ks) - 1)
        prop = torch.stack(proposal, 1).tolist()  # [B, S]
        var_s = torch.stack(step_var, 1).tolist()  # [B, S]
        ids_s = torch.stack(step_ids, 1).cpu()  # [B, S, N]
        probs_s = torch.stack(step_probs, 1).cpu()
        # --- 3) records of the emitted positions; pending records of the new proposal
        var_l = var.tolist()
        ids_c, probs_c = ids.cpu(), probs.cpu()
        for b, i in enumerate(live):
            r, st, out = rows[i], states[b], outs[i]
            n, e = len(r.history), r.num_emitted
            for j in range(n - e, n):
                rec = st.pending.get(j)
                if rec is None and (b, j) in fresh:
                    p_i = fresh[(b, j)]
                    rec = Record(j, var_l[p_i], ids_c[p_i], probs_c[p_i])
                if rec is not None:
                    out.records.append(rec)
            k_b = max(0, ks[b])
            st.proposal = prop[b][:k_b]
            st.drafted_from = n
            st.valid = n + max(0, k_b - 1)
            st.pending = {n + s: Record(n + s, var_s[b][s], ids_s[b, s], probs_s[b, s])
                          for s in range(k_b)}
            out.proposal = list(st.proposal)
            out.draft_passes = n_steps
            if r.final:
                self._free.append(self._slots.pop(r.req_id).index)
        return outs


def log_mix_from_record(rec_ids: torch.Tensor, rec_probs: torch.Tensor, vocab: int) -> torch.Tensor:
    """q̄ as full-vocabulary log-probs from a record; tokens outside its top-N get −inf. [N],[N] -> [V]"""
    log_mix = torch.full((vocab,), -math.inf)
    log_mix[rec_ids.long()] = rec_probs.float().log()
    return log_mix
