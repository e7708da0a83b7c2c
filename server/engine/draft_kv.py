"""The drafts' paged KV cache: fixed-size blocks from one pool, a block table per request.

A request holds ⌈tokens / block_size⌉ blocks, taken when its history grows and all returned
when it ends, is aborted or is released; nothing is ever copied to grow. Block ids are shared by
every stacked draft group (`PagedKV`, one per group, indexes its own storage with them), so one
`BlockPool` accounts for all drafts.

Memory: the pool's storage is created at its full budget (`num_blocks`) with `torch.empty`.
On CPU, Linux backs untouched pages lazily and the pool hands out the lowest free block ids
first, so resident memory follows the most blocks ever held at once, not the budget; on a GPU
the whole budget is reserved at start (as vLLM does for the target's cache).

Block 0 is never handed out: it stays zero and pads the block tables of shorter rows, so the
attention's masked keys are finite (0 · NaN would poison the output).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable

import torch

DEFAULT_BLOCK_SIZE = 16  # tokens per block


def kv_bytes_per_token(configs: Iterable, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of keys and values one token takes in all the drafts' caches.

    configs: the drafts' HF configs (objects or dicts: num_hidden_layers, num_key_value_heads,
    head_dim or hidden_size / num_attention_heads)."""

    def get(c, name, default=None):
        return c.get(name, default) if isinstance(c, dict) else getattr(c, name, default)

    total = 0
    for c in configs:
        heads = get(c, "num_attention_heads")
        head_dim = get(c, "head_dim") or get(c, "hidden_size") // heads
        kv_heads = get(c, "num_key_value_heads") or heads
        total += 2 * get(c, "num_hidden_layers") * kv_heads * head_dim
    return total * torch.empty((), dtype=dtype).element_size()


def target_kv_blocks(
    draft_tokens: int, max_num_seqs: int, k: int, draft_block: int, target_block: int
) -> int:
    """The most blocks of `target_block` tokens the target's (vLLM's) KV cache may have so that
    every set of requests it runs also fits in a draft pool of `draft_tokens` tokens.

    A request vLLM holds n tokens for holds at most n + k + draft_block − 1 draft tokens: its
    newest token (not yet in the target's cache), the k − 1 drafted tokens fed in step 2), and
    its last block's empty part. Requests sharing a prompt through vLLM's prefix cache break the
    bound (the target holds the prompt once, the drafts once per request)."""
    return max(0, (draft_tokens - max_num_seqs * (k + draft_block)) // target_block)


class PoolFull(RuntimeError):
    """The pool has fewer free blocks than a request needs."""


class BlockPool:
    """Block ids for `num_blocks − 1` usable blocks of `block_size` tokens (block 0 is the
    padding block), and each holder's block table (its blocks in position order)."""

    def __init__(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"a block pool needs ≥ 2 blocks of ≥ 1 token, got {num_blocks} × {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(1, num_blocks))  # a min-heap: lowest ids first (see module doc)
        self._tables: dict[str, list[int]] = {}

    @classmethod
    def for_tokens(cls, tokens: int, block_size: int = DEFAULT_BLOCK_SIZE) -> BlockPool:
        """A pool holding at least `tokens` tokens (plus the padding block)."""
        return cls(math.ceil(tokens / block_size) + 1, block_size)

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    def blocks_in_use(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    def blocks_of(self, holder: str) -> list[int]:
        return self._tables.get(holder, [])

    def ensure(self, holder: str, tokens: int) -> list[int]:
        """Grow `holder`'s table to cover positions [0, tokens); returns the newly taken block ids
        (their storage must be zeroed). Raises PoolFull, taking nothing, if too few are free."""
        table = self._tables.setdefault(holder, [])
        need = math.ceil(tokens / self.block_size) - len(table)
        if need <= 0:
            return []
        if need > len(self._free):
            if not table:
                del self._tables[holder]
            raise PoolFull(f"{need} blocks needed, {len(self._free)} free of {self.num_blocks - 1}")
        new = [heapq.heappop(self._free) for _ in range(need)]
        table.extend(new)
        return new

    def free(self, holder: str) -> None:
        """Return all of `holder`'s blocks (a no-op for a holder with none)."""
        for b in self._tables.pop(holder, []):
            heapq.heappush(self._free, b)

    def table(self, holders: list[str], num_blocks: int, device) -> torch.Tensor:
        """[B, num_blocks] long: each holder's first blocks, padded with block 0."""
        out = torch.zeros(len(holders), num_blocks, dtype=torch.long)
        for b, h in enumerate(holders):
            t = self._tables.get(h, [])[:num_blocks]
            out[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        return out.to(device)


class PagedKV:
    """One draft group's keys and values in the pool's blocks.

    Storage [layers, M, num_blocks · block_size, Hkv, D] (a token's slot is block · block_size +
    offset), so a row's keys are one gather of its slots."""

    def __init__(
        self, layers: int, m: int, kv_heads: int, head_dim: int, pool: BlockPool, dtype, device
    ) -> None:
        self.block_size = pool.block_size
        shape = (layers, m, pool.num_blocks * pool.block_size, kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)  # [L, M, N·bs, Hkv, D]
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.zero([0])

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def zero(self, blocks: list[int]) -> None:
        """Zero fresh blocks (never-written memory may hold NaNs that masked keys would leak)."""
        if blocks:
            idx = self.slots_of(torch.tensor(blocks, device=self.k.device)[None]).view(-1)  # [n·bs]
            self.k[:, :, idx] = 0
            self.v[:, :, idx] = 0

    def slots_of(self, table: torch.Tensor) -> torch.Tensor:
        """[B, nb] block ids -> [B, nb · bs] the slots of those blocks' tokens, in order."""
        off = torch.arange(self.block_size, device=table.device)
        return (table[:, :, None] * self.block_size + off).view(table.shape[0], -1)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots [N], k/v [M, N, Hkv, D]: store the new tokens' keys and values."""
        self.k[layer][:, slots] = k.to(self.k.dtype)
        self.v[layer][:, slots] = v.to(self.v.dtype)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots [B, K] -> keys, values [M, B, K, Hkv, D] (a gather: a copy of B · K tokens)."""
        return self.k[layer][:, slots], self.v[layer][:, slots]
