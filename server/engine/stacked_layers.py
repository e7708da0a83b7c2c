"""Llama-family layer math over a leading M axis of stacked drafts (gpt-fast style, no framework).

Weights of M same-shape drafts are stacked: a linear weight is [M, I, O] (already transposed for
`bmm`), a norm weight [M, E]. Activations are [M, B, T, ·]. Attention is a callable, so the same
layer runs over a paged KV cache (serving, `draft_ensemble`) or a whole causal window (training,
`drafts.feature_distill`). RMSNorm statistics are float32 (as transformers does for bf16 Llamas).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# the per-layer weights, by transformers' names (under model.layers.i.)
LAYER_WEIGHTS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)

# attend(q [M, B, T, H, D], k [M, B, T, Hkv, D], v [M, B, T, Hkv, D]) -> o [M, B, T, H·D]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [M, ..., E] with per-draft weights w [M, E]; statistics in float32."""
    dtype, x = x.dtype, x.float()
    x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return x * w.view(w.shape[0], *[1] * (x.dim() - 2), w.shape[-1])


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """[M, B, T, I] @ [M, I, O] (+ [M, O]) -> [M, B, T, O]"""
    m, bsz, t, _ = x.shape
    y = torch.bmm(x.reshape(m, bsz * t, -1), w)
    if b is not None:
        y = y + b[:, None, :]
    return y.view(m, bsz, t, -1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def decoder_layer(
    ly: dict,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attend: Attend,
    *,
    eps: float,
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """One pre-norm Llama decoder layer (RoPE attention + SiLU-gated MLP) on the residual stream
    h [M, B, T, E]; cos/sin broadcast to [1, B, T, 1, D]. Optional Qwen2-style projection biases
    are `ly["q_bias"]` etc. -> [M, B, T, E]"""
    M, B, T, _ = h.shape
    x = rms(h, ly["input_layernorm.weight"], eps)
    q = linear(x, ly["self_attn.q_proj.weight"], ly.get("q_bias")).view(M, B, T, heads, head_dim)
    k = linear(x, ly["self_attn.k_proj.weight"], ly.get("k_bias")).view(M, B, T, kv_heads, head_dim)
    v = linear(x, ly["self_attn.v_proj.weight"], ly.get("v_bias")).view(M, B, T, kv_heads, head_dim)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    h = h + linear(attend(q, k, v), ly["self_attn.o_proj.weight"], ly.get("o_bias"))
    x = rms(h, ly["post_attention_layernorm.weight"], eps)
    g = torch.nn.functional.silu(linear(x, ly["mlp.gate_proj.weight"]))
    return h + linear(g * linear(x, ly["mlp.up_proj.weight"]), ly["mlp.down_proj.weight"])


def causal_attend(scale: float) -> Attend:
    """Attention of every position to the ones before it in the same window (training)."""

    def attend(q, k, v):
        M, B, T, H, D = q.shape
        o = torch.nn.functional.scaled_dot_product_attention(
            q.permute(0, 1, 3, 2, 4).reshape(M * B, H, T, D),
            k.permute(0, 1, 3, 2, 4).reshape(M * B, k.shape[3], T, D),
            v.permute(0, 1, 3, 2, 4).reshape(M * B, v.shape[3], T, D),
            is_causal=True,
            scale=scale,
            enable_gqa=H != k.shape[3],
        )  # [M*B, H, T, D]
        return o.view(M, B, H, T, D).permute(0, 1, 3, 2, 4).reshape(M, B, T, H * D)

    return attend
