"""The reference engine on tiny trained models: exactness, losslessness, EU per token, bookkeeping."""

from __future__ import annotations

import asyncio
import collections
import shutil

import pytest
import torch

from server.engine import models
from server.engine.reference import ReferenceEngine
from server.engine.teacher_forced import teacher_forced
from server.engine.types import Finished, FlagThresholds, SamplingParams, TokenEvent
from tests.sampling_check import assert_pairs_follow_target

PROMPTS = [
    "Question: Ann has 3 apples and buys 4 more. How many apples does Ann have?\nAnswer:",
    "Question: Bob has 5 bags with 6 pens each. How many pens does Bob have?\nAnswer: Bob",
    "Question: Eli",
]


@pytest.fixture(scope="module")
def engine(tiny_models):
    return ReferenceEngine(tiny_models["target"], tiny_models["drafts"], num_speculative_tokens=3)


@pytest.fixture(scope="module")
def plain(tiny_models):
    return ReferenceEngine(tiny_models["target"], [])


def _ids(engine, text):
    return [
        engine.tokenizer.bos_token_id,
        *engine.tokenizer(text, add_special_tokens=False)["input_ids"],
    ]


def _run(engine, ids, **kw):
    items = list(engine.stream(ids, SamplingParams(**kw)))
    assert isinstance(items[-1], Finished) and all(isinstance(e, TokenEvent) for e in items[:-1])
    return items[:-1], items[-1]


@torch.inference_mode()
def _full_logprobs(lm, ids):
    """Teacher-forced raw log-probs at every position, recomputing the whole prefix. [L, V]"""
    return torch.log_softmax(lm(input_ids=torch.tensor([ids])).logits[0].float(), -1)


@torch.inference_mode()
def _greedy(lm, ids, n, eos):
    ids = list(ids)
    out = []
    for _ in range(n):
        tok = int(_full_logprobs(lm, ids)[-1].argmax())
        if tok == eos:
            break
        out.append(tok)
        ids.append(tok)
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_temperature_zero_equals_target_greedy(engine, prompt):
    ids = _ids(engine, prompt)
    events, fin = _run(engine, ids, max_tokens=40, temperature=0)
    expected = _greedy(engine.target, ids, 40, engine.tokenizer.eos_token_id)
    assert [e.token_id for e in events] == expected
    assert fin.stats.proposed > 0 and fin.stats.target_forward_passes < len(expected) + 1


def test_each_token_eu_equals_teacher_forced_recomputation(engine):
    ids = _ids(engine, PROMPTS[0])
    events, _ = _run(engine, ids, max_tokens=30, temperature=1.0, seed=3)
    tokens = [e.token_id for e in events]
    tf = teacher_forced(engine.target, engine.drafts, ids, tokens)
    u = tf.uncertainty
    got = torch.tensor([[e.bias, e.variance, e.eu] for e in events])
    torch.testing.assert_close(got, torch.stack([u.bias, u.variance, u.eu], 1), atol=1e-4, rtol=1e-4)
    lp = tf.token_logprobs(tokens)
    torch.testing.assert_close(torch.tensor([e.logprob for e in events]), lp, atol=1e-4, rtol=1e-4)


def test_sampled_output_follows_the_target_distribution(engine):
    """Pairs of the first two tokens over 1500 seeds against the exact target probabilities
    p̃(t1)·p̃(t2|t1) (temperature 0.9, top-p 0.95); see `assert_pairs_follow_target`."""
    ids = _ids(engine, "Question: Fay has")
    T, top_p, n = 0.9, 0.95, 1500
    counts = collections.Counter()
    for seed in range(n):
        events, _ = _run(engine, ids, max_tokens=3, temperature=T, top_p=top_p, seed=seed, ignore_eos=True)
        counts[(events[0].token_id, events[1].token_id)] += 1
    assert_pairs_follow_target(counts, engine.target, ids, T, top_p)


def test_seed_reproducibility_and_independence(engine):
    ids = _ids(engine, PROMPTS[2])
    a, _ = _run(engine, ids, max_tokens=20, temperature=1.0, seed=11)
    b, _ = _run(engine, ids, max_tokens=20, temperature=1.0, seed=11)
    assert [e.token_id for e in a] == [e.token_id for e in b]
    outs = {
        tuple(e.token_id for e in _run(engine, ids, max_tokens=20, temperature=1.0, seed=s)[0])
        for s in range(8)
    }
    assert len(outs) > 1


def test_pass_counts_make_reuse_measurable(engine):
    ids = _ids(engine, PROMPTS[0])
    events, fin = _run(engine, ids, max_tokens=25, temperature=0, ignore_eos=True)
    s = fin.stats
    assert fin.completion_tokens == len(events) == 25 and fin.finish_reason == "length"
    # every emitted token comes from one target pass: n accepted + 1 per round
    assert len(events) == s.accepted + s.target_forward_passes
    # k draft steps per round, +1 bonus step per fully accepted round; never a scoring pass
    assert s.proposed <= 3 * s.target_forward_passes
    assert s.proposed <= s.draft_forward_passes <= s.proposed + s.target_forward_passes


def test_without_drafts_uncertainty_is_null(plain, engine):
    ids = _ids(plain, PROMPTS[1])
    events, fin = _run(plain, ids, max_tokens=15, temperature=0)
    assert all(e.eu is None and e.bias is None and e.variance is None and not e.flagged for e in events)
    assert fin.stats.draft_forward_passes == 0 and fin.stats.proposed == 0
    spec, _ = _run(engine, ids, max_tokens=15, temperature=0)
    assert [e.token_id for e in events] == [e.token_id for e in spec]


def test_max_tokens_stop_strings_and_flags(engine):
    ids = _ids(engine, PROMPTS[0])
    full, _ = _run(engine, ids, max_tokens=30, temperature=0, ignore_eos=True)
    text = "".join(e.text for e in full)
    stop = text[8:11]
    events, fin = _run(engine, ids, max_tokens=30, temperature=0, ignore_eos=True, stop=(stop,))
    assert fin.finish_reason == "stop"
    assert "".join(e.text for e in events) == text[: text.index(stop)]
    flagged, fin = _run(
        engine,
        ids,
        max_tokens=30,
        temperature=0,
        thresholds=FlagThresholds(eu=0.0),
        stop_on_uncertainty=True,
    )
    assert fin.finish_reason == "uncertainty" and len(flagged) == 1 and flagged[0].flagged
    none, _ = _run(engine, ids, max_tokens=10, temperature=0, thresholds=FlagThresholds(eu=1e9))
    assert not any(e.flagged for e in none)


def test_abort_frees_the_request(engine):
    async def main():
        gen = engine.generate("r1", _ids(engine, PROMPTS[0]), SamplingParams(max_tokens=50, temperature=0))
        first = await gen.__anext__()
        assert isinstance(first, TokenEvent) and engine.num_running() == 1
        await gen.aclose()  # the client went away
        assert engine.num_running() == 0
        gen2 = engine.generate("r2", _ids(engine, PROMPTS[1]), SamplingParams(max_tokens=50, temperature=0))
        await gen2.__anext__()
        await engine.abort("r2")
        items = [i async for i in gen2]
        assert isinstance(items[-1], Finished) and items[-1].finish_reason == "abort"
        assert engine.num_running() == 0

    asyncio.run(main())


def test_draft_with_other_vocabulary_is_refused(tiny_models, tmp_path):
    bad = tmp_path / "bad_draft"
    shutil.copytree(tiny_models["drafts"][0], bad)
    from drafts.tokenizer import train_tokenizer

    train_tokenizer(["completely different text " * 20], vocab_size=300, out_dir=bad)
    with pytest.raises(models.ModelFolderError, match="different tokenizer"):
        ReferenceEngine(tiny_models["target"], [str(bad)])
    with pytest.raises(models.ModelFolderError, match="does not exist"):
        ReferenceEngine(tiny_models["target"], [str(tmp_path / "missing")])


def _failing_target(engine, fail) -> None:
    """The target's forward pass raises while `fail()` is true (a device fault, simulated)."""
    real = engine.target.forward

    def forward(*args, **kwargs):
        if fail():
            raise RuntimeError("simulated device fault")
        return real(*args, **kwargs)

    engine.target.forward = forward  # nn.Module.__call__ finds the instance's first


def _poisoned_target(engine, marker: int, after: int = 3) -> None:
    """The target's forward pass raises for a sequence whose prompt holds token `marker`, from
    its `after`-th forward on (a fault confined to one request, simulated: a bad input, an
    out-of-memory on one long sequence); other sequences and a fresh forward pass run as ever.
    A sequence is known by its KV cache, which the model updates in place."""
    real = engine.target.forward
    poisoned: dict[int, int] = {}  # id of a poisoned sequence's cache -> its forwards so far

    def forward(*args, input_ids=None, past_key_values=None, **kwargs):
        key = id(past_key_values)
        if key in poisoned:
            poisoned[key] += 1
            if poisoned[key] >= after:
                raise RuntimeError("simulated fault in one request")
        out = real(*args, input_ids=input_ids, past_key_values=past_key_values, **kwargs)
        if past_key_values is None and bool((input_ids == marker).any()):
            poisoned[id(out.past_key_values)] = 1
        return out

    engine.target.forward = forward


def poison_marker(tokenizer, poisoned: str, clean: list[str]) -> int:
    """A token of `poisoned` that none of `clean` holds."""
    seen = {t for text in clean for t in tokenizer(text, add_special_tokens=False)["input_ids"]}
    only = [t for t in tokenizer(poisoned, add_special_tokens=False)["input_ids"] if t not in seen]
    assert only, "the poisoned prompt needs a token of its own"
    return only[0]


async def _until_error(gen) -> tuple[list, BaseException | None]:
    items = []
    try:
        async for item in gen:
            items.append(item)
    except Exception as exc:  # noqa: BLE001 (what the stream raised is the subject)
        return items, exc
    return items, None


POISONED = "Question: Zoe has 9 kiwis and gives 2 away. How many kiwis does Zoe have?\nAnswer:"


def test_a_failed_step_fails_only_its_request(tiny_models):
    """One sequence's forward pass fails mid-stream: that stream ends with StepFailed (chained to
    the fault) after the tokens of the rounds before; the stream beside it decodes to the end,
    token for token as it does alone; the engine stays healthy and serves the next request
    exactly as before. Nothing is left running."""
    from server.engine.reference import StepFailed

    engine = ReferenceEngine(tiny_models["target"], tiny_models["drafts"], num_speculative_tokens=3)
    _poisoned_target(engine, poison_marker(engine.tokenizer, POISONED, PROMPTS[:2]))
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)

    async def tokens(rid: str, text: str) -> list[int]:
        items = [x async for x in engine.generate(rid, _ids(engine, text), params)]
        return [x.token_id for x in items if isinstance(x, TokenEvent)]

    async def main():
        alone = await tokens("before", PROMPTS[0])
        bad = engine.generate("bad", _ids(engine, POISONED), params)
        good = engine.generate("good", _ids(engine, PROMPTS[0]), params)
        assert isinstance(await bad.__anext__(), TokenEvent)
        got_bad, err = await _until_error(bad)
        got_good, err_good = await _until_error(good)
        assert 0 < len(got_bad) < 29  # the rounds before the fault (1 prefill + 2 rounds)
        assert isinstance(err, StepFailed) and "simulated fault in one request" in str(err)
        assert isinstance(err.__cause__, RuntimeError)
        assert err_good is None and isinstance(got_good[-1], Finished)
        assert [x.token_id for x in got_good if isinstance(x, TokenEvent)] == alone
        assert engine.is_healthy() and engine.num_running() == 0
        assert await tokens("after", PROMPTS[0]) == alone
        assert engine.num_running() == 0

    asyncio.run(main())


def test_a_broken_device_kills_the_engine_and_every_stream(tiny_models):
    """Every forward pass fails (the check after the failed step too): that stream and the other
    one in flight end with EngineDeadError (the failing one chained to the fault), the engine is
    unhealthy and refuses new requests, also once the fault is gone. Nothing is left running."""
    from server.engine.reference import EngineDeadError

    engine = ReferenceEngine(tiny_models["target"], tiny_models["drafts"], num_speculative_tokens=3)
    broken = False
    _failing_target(engine, lambda: broken)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)

    async def main():
        nonlocal broken
        a = engine.generate("a", _ids(engine, PROMPTS[0]), params)
        b = engine.generate("b", _ids(engine, PROMPTS[1]), params)
        assert isinstance(await a.__anext__(), TokenEvent)
        assert isinstance(await b.__anext__(), TokenEvent)
        broken = True
        got_a, err_a = await _until_error(a)
        broken = False  # the fault is gone; the engine stays dead
        got_b, err_b = await _until_error(b)
        assert len(got_a) < 59 and len(got_b) < 59  # at most the tokens of rounds already run
        assert isinstance(err_a, EngineDeadError) and "simulated device fault" in str(err_a)
        assert isinstance(err_a.__cause__, RuntimeError)
        assert isinstance(err_b, EngineDeadError) and "dead" in str(err_b)
        assert not engine.is_healthy() and engine.num_running() == 0
        _, err_c = await _until_error(engine.generate("c", _ids(engine, PROMPTS[2]), params))
        assert isinstance(err_c, EngineDeadError) and engine.num_running() == 0

    asyncio.run(main())


@pytest.mark.slow
def test_requests_leave_no_objects_or_tensors_behind(engine):
    """Memory flat per request: after warm-up, 32 more requests (run out, closed early by the
    client, aborted; seeded and greedy) leave exactly as many live tensors, KV caches, torch
    generators and objects of epispec's own types (sequences, models' cache holders,
    detokenizers, events...) as before. A request whose state stayed referenced would leave
    dozens. (All live Python objects are not counted: torch and transformers grow caches of
    their own, tens of objects per batch under pytest, more when they import lazily.)"""
    import collections
    import gc

    ids = _ids(engine, PROMPTS[0])

    async def batch(tag: str, n: int = 32):
        async def one(i: int):
            params = SamplingParams(
                max_tokens=10, temperature=0.0 if i % 3 == 0 else 1.0, seed=i, ignore_eos=True
            )
            gen = engine.generate(f"{tag}{i}", ids, params)
            if i % 4 == 1:  # the client goes away
                await gen.__anext__()
                await gen.aclose()
                return
            if i % 4 == 2:
                await gen.__anext__()
                await engine.abort(f"{tag}{i}")
            async for _ in gen:
                pass

        await asyncio.gather(*[one(i) for i in range(n)])

    def census() -> collections.Counter:
        gc.collect()
        return collections.Counter(
            "tensor" if isinstance(o, torch.Tensor) else f"{type(o).__module__}.{type(o).__qualname__}"
            for o in gc.get_objects()
            if isinstance(o, torch.Tensor | torch.Generator)
            or str(type(o).__module__).startswith(("server.", "transformers.cache_utils"))
        )

    for r in range(2):  # warm-up
        asyncio.run(batch(f"warm{r}-"))
    before = census()
    asyncio.run(batch("flat"))
    after = census()
    assert engine.num_running() == 0
    assert after == before, (after - before, before - after)
