"""`server/engine/vllm_internals.py` without a vLLM engine: the rewindable CPU generator that
takes vLLM's Philox-style rewind (the engine-level tests are in test_vllm_chunked_prefill.py)."""

from __future__ import annotations

import pytest
import torch

from server.engine.vllm_internals import RewindableGenerator


def _draw(gen: torch.Generator) -> list[int]:
    """What vLLM-CPU's sampler draws per row and step (`forward_cpu`), and more."""
    return [
        *torch.randint(0, 2**31, (1,), generator=gen).tolist(),
        *torch.rand(3, generator=gen, dtype=torch.float64).mul(2**52).long().tolist(),
    ]


def test_rewindable_generator_continues_the_same_stream():
    plain = torch.Generator().manual_seed(7)
    _draw(plain)
    plain_copy = torch.Generator().manual_seed(7)
    _draw(plain_copy)
    rewindable = RewindableGenerator.like(plain_copy)
    assert [_draw(rewindable) for _ in range(3)] == [_draw(plain) for _ in range(3)]


def test_rewind_after_a_marked_step_undoes_its_draws():
    """vLLM's rewind of a thrown-away sample, `set_offset(get_offset() - 4)`: the next step
    draws what the thrown-away one drew; steps neither marked nor rewound go on as usual."""
    gen = RewindableGenerator.like(torch.Generator().manual_seed(3))
    kept = _draw(gen)
    gen.mark()
    assert gen.get_offset() == 4
    thrown_away = _draw(gen)
    gen.set_offset(gen.get_offset() - 4)
    assert gen.get_offset() == 0
    assert _draw(gen) == thrown_away
    want = torch.Generator().manual_seed(3)
    assert [_draw(want) for _ in range(3)] == [kept, thrown_away, _draw(gen)]


def test_rewind_goes_back_one_marked_step_only():
    gen = RewindableGenerator.like(torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="one marked step"):
        gen.set_offset(gen.get_offset() - 4)  # nothing marked
    gen.mark()
    gen.mark()
    with pytest.raises(ValueError, match="not to offset 0"):
        gen.set_offset(0)  # two steps back
    gen.set_offset(4)
    with pytest.raises(ValueError, match="one marked step"):
        gen.set_offset(0)  # the mark is spent
