"""The drafts' batched kernels over the paged KV cache: stacked Llama drafts and stacked feature
drafts, behind one call that `draft_ensemble`'s round makes.

    forward(tokens, feats, pos, table, valid, out) -> (log q [P, M, V_d], g [M, P, E] | None)

tokens (target ids), pos, valid [B, T]; table [B, nb] (each row's blocks, covering positions up
to pos.max()); feats [B, T, E] or [M, B, T, E] (feature drafts: f_{t−1} for the token at t; Llama
drafts ignore it); out = (rows [P], cols [P]) the positions whose outputs are wanted. g is the
feature drafts' predicted feature at those positions (the next step's input within a round).
"""

from __future__ import annotations

import torch

from server.engine.draft_kv import BlockPool, PagedKV
from server.engine.draft_vocab import DraftVocab
from server.engine.feature_draft import FeatureDrafts
from server.engine.stacked_layers import LAYER_WEIGHTS, Attend, decoder_layer, rms


class PagedAttention:
    """Where a batch's keys go and which it reads: built once per forward, shared by its layers."""

    def __init__(
        self, kv: PagedKV, table: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, m: int
    ) -> None:
        B, T = pos.shape
        self.kv, self.valid = kv, valid
        n_keys = int(pos.max()) + 1
        self.slots = kv.slots_of(table)[:, :n_keys]  # [B, K] cache slots of each row's keys
        self.w_slots = self.slots.gather(1, pos)[valid]  # [Nv] where the fed tokens go
        # no mask where none is needed: one row decoding one token, or one row's whole prompt
        self.mask, self.causal = None, False
        if B == 1 and T == n_keys:
            self.causal = T > 1
        elif B > 1 or T > 1:
            mask = torch.arange(n_keys, device=pos.device)[None, None, :] <= pos[:, :, None]  # [B, T, K]
            self.mask = mask[None, :, None].expand(m, B, 1, T, n_keys).reshape(m * B, 1, T, n_keys)

    def layer(self, i: int, scale: float) -> Attend:
        """Attention of layer i: write the fed tokens' keys/values, attend over the row's keys."""

        def attend(q, k, v):  # [M, B, T, H|Hkv, D] -> [M, B, T, H·D]
            M, B, T, H, D = q.shape
            Hkv, K = k.shape[3], self.slots.shape[1]
            self.kv.write(i, self.w_slots, k[:, self.valid], v[:, self.valid])  # [M, Nv, Hkv, D]
            keys, vals = self.kv.read(i, self.slots)  # [M, B, K, Hkv, D]
            o = torch.nn.functional.scaled_dot_product_attention(
                q.permute(0, 1, 3, 2, 4).reshape(M * B, H, T, D),
                keys.view(M * B, K, Hkv, D).transpose(1, 2),  # [M*B, Hkv, K, D]
                vals.view(M * B, K, Hkv, D).transpose(1, 2),
                attn_mask=self.mask,
                is_causal=self.causal,
                scale=scale,
                enable_gqa=H != Hkv,
            )  # [M*B, H, T, D]
            return o.view(M, B, H, T, D).permute(0, 1, 3, 2, 4).reshape(M, B, T, H * D)

        return attend


class LlamaGroup:
    """Same-shape Llama-family drafts evaluated together: their weights are stacked on a leading
    M axis, so one batched step of the group is one set of batched matmuls.

    Weights and KV cache are in `dtype`; RMSNorm statistics, log-softmax and everything after
    them are float32 (as transformers does for bf16/fp16 Llamas)."""

    reads_features = False

    def __init__(
        self,
        lms: list,
        pool: BlockPool,
        device: torch.device,
        vocab: DraftVocab | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        cfg = lms[0].config
        # [V] long: the draft id each target id is read as (reduced vocabulary), else None
        self.to_draft_ids = None if vocab is None else vocab.to_draft_ids.to(device)
        attn0 = lms[0].model.layers[0].self_attn
        self.m, self.eps = len(lms), cfg.rms_norm_eps
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim, self.scaling = attn0.head_dim, attn0.scaling
        self.rotary = lms[0].model.rotary_emb

        def stack(get, t=False):  # [M, ...]; t: Linear weight [O, I] -> [I, O] for bmm
            ws = [get(lm) for lm in lms]
            if ws[0] is None:
                return None
            return torch.stack([w.detach().t() if t else w.detach() for w in ws]).to(device, dtype)

        def getter(i: int, path: str):
            def f(lm):
                obj = lm.model.layers[i]
                for name in path.split("."):
                    obj = getattr(obj, name, None)
                return obj

            return f

        self.embed = stack(lambda lm: lm.model.embed_tokens.weight)  # [M, V_d, E]
        self.head = stack(lambda lm: lm.lm_head.weight, t=True)  # [M, E, V_d]
        self.norm = stack(lambda lm: lm.model.norm.weight)  # [M, E]
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            layer = {n: stack(getter(i, n), t=n.endswith("_proj.weight")) for n in LAYER_WEIGHTS}
            for n in ("q", "k", "v", "o"):  # Qwen2-style projection biases, where present
                layer[f"{n}_bias"] = stack(getter(i, f"self_attn.{n}_proj.bias"))
            self.layers.append(layer)
        self.kv = PagedKV(len(self.layers), self.m, self.kv_heads, self.head_dim, pool, dtype, device)

    def forward(self, tokens, feats, pos, table, valid, out) -> tuple[torch.Tensor, None]:
        if self.to_draft_ids is not None:
            tokens = self.to_draft_ids[tokens]  # [B, T] draft ids
        h = self.embed[:, tokens]  # [M, B, T, E]
        cos, sin = self.rotary(h[0], pos)  # [B, T, D]
        cos, sin = cos[None, :, :, None], sin[None, :, :, None]  # [1, B, T, 1, D]
        att = PagedAttention(self.kv, table, pos, valid, self.m)
        for i, ly in enumerate(self.layers):
            h = decoder_layer(
                ly,
                h,
                cos,
                sin,
                att.layer(i, self.scaling),
                eps=self.eps,
                heads=self.heads,
                kv_heads=self.kv_heads,
                head_dim=self.head_dim,
            )
        h = rms(h[:, out[0], out[1]], self.norm, self.eps)  # [M, P, E]
        return torch.log_softmax(torch.bmm(h, self.head).float(), -1).transpose(0, 1), None  # [P, M, V_d]


class FeatureGroup:
    """Feature drafts (`feature_draft.FeatureDrafts`) over the paged KV cache (one layer)."""

    reads_features = True

    def __init__(
        self, drafts: FeatureDrafts, pool: BlockPool, device: torch.device, dtype: torch.dtype
    ) -> None:
        s = drafts.spec
        self.drafts, self.m = drafts, drafts.m
        self.kv = PagedKV(1, self.m, s.kv_heads, s.head_dim, pool, dtype, device)

    def forward(self, tokens, feats, pos, table, valid, out) -> tuple[torch.Tensor, torch.Tensor]:
        att = PagedAttention(self.kv, table, pos, valid, self.m)
        return self.drafts(tokens, feats, pos, att.layer(0, self.drafts.scale), out)


def signature(lm) -> tuple:
    """Llama drafts with equal signatures can share a stacked group."""
    c = lm.config
    return (
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.vocab_size,
        getattr(c, "rope_theta", None),
        str(getattr(c, "rope_scaling", None)),
        c.rms_norm_eps,
        lm.model.layers[0].self_attn.q_proj.bias is not None,
    )
