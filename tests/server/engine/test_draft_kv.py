"""The drafts' paged KV cache: the block pool's accounting, the vLLM cap, and memory per request
that follows the tokens held (a 1B-Llama-shaped draft), not the context limit."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.draft_ensemble import DraftEnsemble, RowInput, TopN
from server.engine.draft_kv import BlockPool, PagedKV, PoolFull, kv_bytes_per_token, target_kv_blocks


def test_pool_takes_lowest_blocks_first_all_or_nothing_and_frees_everything():
    pool = BlockPool(num_blocks=5, block_size=4)  # 4 usable: block 0 pads
    assert pool.capacity_tokens == 16
    assert pool.ensure("a", 5) == [1, 2] and pool.ensure("a", 8) == []  # 8 tokens: still 2 blocks
    assert pool.ensure("b", 1) == [3]
    with pytest.raises(PoolFull):
        pool.ensure("c", 9)  # 3 blocks, 1 free: nothing taken
    assert pool.blocks_of("c") == [] and pool.blocks_in_use() == 3
    pool.free("a")
    assert pool.ensure("c", 9) == [1, 2, 4]  # lowest first: resident memory follows the peak
    assert pool.table(["b", "c"], 3, "cpu").tolist() == [[3, 0, 0], [1, 2, 4]]
    pool.free("b"), pool.free("c"), pool.free("never")
    assert pool.blocks_in_use() == 0


def test_paged_kv_reads_back_what_was_written_through_scattered_blocks():
    pool = BlockPool(num_blocks=8, block_size=2)
    kv = PagedKV(layers=1, m=2, kv_heads=3, head_dim=4, pool=pool, dtype=torch.float32, device="cpu")
    pool.ensure("x", 2), pool.ensure("y", 2)
    kv.zero(pool.ensure("x", 5))  # x: blocks 1, 3, 4 (y holds 2)
    table = pool.table(["x"], 3, "cpu")
    slots = kv.slots_of(table)[:, :5]  # [1, 5]
    k = torch.randn(2, 5, 3, 4)  # [M, N, Hkv, D]
    kv.write(0, slots[0], k, -k)
    keys, vals = kv.read(0, slots)  # [M, 1, 5, Hkv, D]
    assert torch.equal(keys[:, 0], k) and torch.equal(vals[:, 0], -k)
    assert slots[0].tolist() == [2, 3, 6, 7, 8]


def test_kv_bytes_per_token_counts_keys_and_values_of_every_layer_and_draft():
    one_b = dict(num_hidden_layers=16, num_key_value_heads=8, num_attention_heads=32, hidden_size=2048)
    assert kv_bytes_per_token([one_b] * 4) == 4 * 16 * 2 * 8 * 64 * 4  # 256 KiB: 2 GiB at 8,192 tokens
    assert kv_bytes_per_token([one_b], torch.bfloat16) == 16 * 2 * 8 * 64 * 2


def test_target_kv_cap_leaves_room_for_every_request_in_the_draft_pool():
    # 4 requests, k = 3, draft blocks of 16: each needs up to n + 18 draft tokens beyond vLLM's n
    assert target_kv_blocks(1000, max_num_seqs=4, k=3, draft_block=16, target_block=16) == (1000 - 76) // 16
    # worst case: vLLM fills its capacity with 4 requests; the drafts' blocks still fit
    blocks = target_kv_blocks(1000, 4, 3, 16, 16)
    n = [blocks * 16 // 4] * 4  # tokens vLLM holds per request
    pool = BlockPool.for_tokens(1000, 16)
    for i, ni in enumerate(n):
        pool.ensure(str(i), ni + 1 + 3 - 1)  # the newest token + k − 1 drafted ones
    assert target_kv_blocks(10, 4, 3, 16, 16) == 0


@pytest.fixture(scope="module")
def llama_1b_shaped(tmp_path_factory):
    """Two random drafts shaped like a 1B Llama's layers (hidden 2048, 32 heads, 8 KV heads,
    head_dim 64), 2 layers instead of 16, MLP 2048 wide instead of 8192 and 512 tokens of
    vocabulary so the test stays small; per token 2 drafts × 2 layers × K+V × 8 × 64 × 4 bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = []
    for m in range(2):
        torch.manual_seed(m)
        cfg = LlamaConfig(
            vocab_size=512,
            hidden_size=2048,
            intermediate_size=2048,
            num_hidden_layers=2,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            max_position_embeddings=131072,
        )
        path = tmp_path_factory.mktemp(f"llama1b{m}")
        LlamaForCausalLM(cfg).save_pretrained(str(path))
        paths.append(str(path))
    return paths


def test_memory_per_request_follows_tokens_held_not_max_model_len(llama_1b_shaped, few_threads):
    """The same request under context limits of 2,048 and 131,072 tokens holds the same blocks,
    ⌈(n + k − 1) / 16⌉ of them, within 1.2× of its tokens × bytes per token once n ≥ 96 (the
    contiguous cache held max_model_len tokens per request: 64× or 4,096× more here)."""
    k, held = 3, {}
    for max_len in (2048, 131072):
        ens = DraftEnsemble(llama_1b_shaped, k=k, slots=4, max_len=max_len, kv_tokens=4096, summary=TopN(8))
        per_token = ens.kv_bytes_per_token
        assert per_token == 2 * 2 * 2 * 8 * 64 * 4
        assert ens.kv_bytes() == (4096 + 16) * per_token  # the pool: the budget, whatever max_len
        h = [1] + [(7 * i) % 500 + 3 for i in range(99)]
        sizes = []
        for n in (100, 101, 260):
            h = (h + [5] * n)[:n]
            ens.propose([RowInput("r", torch.tensor(h), 1)])
            tokens = n + k - 1  # history + drafted tokens fed
            assert ens.kv_bytes_held("r") == math.ceil(tokens / 16) * 16 * per_token
            assert ens.kv_bytes_held("r") <= 1.2 * tokens * per_token
            sizes.append(ens.kv_bytes_held("r"))
        assert sizes[0] < sizes[2] and ens.kv_bytes_held("r") < max_len * per_token / 7
        ens.release(set())
        assert ens.kv_bytes_held() == 0
        held[max_len] = sizes
    assert held[2048] == held[131072]
