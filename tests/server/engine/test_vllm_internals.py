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


# --- the lean recovered-token noise: vLLM's rejection sampler, drawing only what is read


def _lean(p, q_draft, num_draft_tokens, generators):
    """`sample_recovered_tokens_lean` on rows that verify one draft token (token 0) each, or
    none; p, q_draft [V] shared by every drafted row. -> recovered ids [num_tokens]"""
    from types import SimpleNamespace

    from vllm.platforms import current_platform

    from server.engine.vllm_internals import sample_recovered_tokens_lean

    current_platform.register_triton_kernel_overrides()  # the C++ kernel, as in vLLM's worker
    n = sum(num_draft_tokens)
    return sample_recovered_tokens_lean(
        1,
        num_draft_tokens,
        torch.tensor(num_draft_tokens, dtype=torch.int32).cumsum(0).to(torch.int32),
        torch.zeros(n, dtype=torch.int32),
        q_draft.repeat(n, 1).contiguous(),
        p.repeat(n, 1).contiguous(),
        SimpleNamespace(generators=generators),
        torch.device("cpu"),
    )


P = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1, 0.0])
Q_DRAFT = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.5])  # max(p − q, 0) ∝ [.4, .3, .2, .1, 0, 0]


def test_lean_noise_gives_a_seeded_row_vllms_own_draw():
    """A seeded row draws its noise from its own generator, once, as vLLM does: the recovered
    token is argmax(max(p − q, 0) / Exp) with that generator's draw, whatever its neighbours."""
    want = []
    for seed in range(20):
        noise = torch.empty(1, 6).exponential_(generator=torch.Generator().manual_seed(seed))
        want.append(int(((P - Q_DRAFT).clamp(min=0) / noise).argmax()))
        got = _lean(P, Q_DRAFT, [1, 0, 1], {2: torch.Generator().manual_seed(seed)})
        assert int(got[1]) == want[-1]
    assert len(set(want)) > 1  # the seeds do draw different tokens


def test_lean_noise_draws_nothing_for_rows_without_drafts():
    torch.manual_seed(11)
    state = torch.get_rng_state()
    _lean(P, Q_DRAFT, [0, 1, 0, 0], {})  # one drafted row of four
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    torch.empty(1, 6).exponential_()  # one row's draw
    assert torch.equal(after, torch.get_rng_state())


def test_lean_noise_samples_the_residual_distribution():
    """Unseeded rows, with rows without drafts among them: the recovered token follows
    max(p − q, 0) normalised (chi-square, 3 dof, fixed seed)."""
    from scipy.stats import chisquare

    torch.manual_seed(0)
    rows = [1, 0] * 2000
    got = _lean(P, Q_DRAFT, rows, {})
    counts = torch.bincount(got.long(), minlength=6)
    assert counts[4:].sum() == 0  # tokens with no residual mass are never drawn
    want = torch.tensor([0.4, 0.3, 0.2, 0.1]) * 2000
    assert chisquare(counts[:4].double().numpy(), want.numpy()).pvalue > 0.01
