"""Starting vLLM (server/engine/vllm_launch.py): what the launch plan returns, that it writes
nothing, that the engine builds vLLM's configuration once and converts each request once.

No vLLM engine starts here: `vllm_launch.start` is replaced by a stub engine, so these run in
seconds (vLLM's configuration is still built, from the tiny target's folder).
"""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from server.engine import vllm_internals, vllm_launch  # noqa: E402
from server.engine.proposer_config import ProposerConfig  # noqa: E402
from server.engine.types import Finished, SamplingParams  # noqa: E402

pytestmark = pytest.mark.vllm
GIB = 1 << 30


def test_the_plan_returns_the_environment_it_needs_and_writes_none():
    before = dict(os.environ)
    launch = vllm_launch.plan("t", 256, 20, {"dtype": "float32"}, environ={}, on_cpu=True)
    assert os.environ == before
    assert launch.env == {"VLLM_LOGGING_STREAM": "ext://sys.stderr"}
    kw = launch.engine_kw
    assert (kw["model"], kw["max_model_len"], kw["max_logprobs"], kw["dtype"]) == ("t", 256, 20, "float32")
    # the CPU KV cache by engine argument, 4 GiB unless told
    assert kw["kv_cache_memory_bytes"] == vllm_launch.DEFAULT_CPU_KV_CACHE_GIB * GIB
    assert "kv_cache_space" not in kw


@pytest.mark.parametrize(
    ("environ", "flag", "want_bytes", "want_env"),
    [
        ({}, 2, 2 * GIB, None),
        ({"VLLM_CPU_KVCACHE_SPACE": "3"}, None, None, None),  # vLLM reads the environment's size
        ({"VLLM_CPU_KVCACHE_SPACE": "3"}, 2, 2 * GIB, "2"),  # the flag wins over it
        ({"VLLM_CPU_KVCACHE_SPACE": "2"}, 2, 2 * GIB, None),
    ],
)
def test_the_cpu_kv_cache_size_is_the_flag_else_the_environment_else_4_gib(
    environ, flag, want_bytes, want_env
):
    args = {"kv_cache_space": flag} if flag is not None else {}
    launch = vllm_launch.plan("t", 256, 20, args, environ=environ, on_cpu=True)
    assert launch.engine_kw.get("kv_cache_memory_bytes") == want_bytes
    assert launch.env.get("VLLM_CPU_KVCACHE_SPACE") == want_env


def test_a_gpu_gets_no_cpu_settings_and_the_environment_keeps_its_own():
    gpu = vllm_launch.plan(
        "t", 256, 20, {"kv_cache_space": 2, "tensor_parallel_size": 2}, environ={}, on_cpu=False
    )
    assert "kv_cache_memory_bytes" not in gpu.engine_kw and set(gpu.env) == {"VLLM_LOGGING_STREAM"}
    own = {"VLLM_LOGGING_STREAM": "ext://sys.stdout", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    cpu = vllm_launch.plan("t", 256, 20, {"tensor_parallel_size": 2}, environ=own, on_cpu=True)
    assert "VLLM_LOGGING_STREAM" not in cpu.env and "VLLM_CPU_OMP_THREADS_BIND" not in cpu.env


def test_tensor_parallel_threads_are_bound_where_vllm_cannot():
    binding = vllm_internals.cpu_thread_binding(2)
    if binding is None:
        pytest.skip("needs at least 2 cores on fewer NUMA nodes than ranks")
    launch = vllm_launch.plan("t", 256, 20, {"tensor_parallel_size": 2}, environ={}, on_cpu=True)
    assert launch.env["VLLM_CPU_OMP_THREADS_BIND"] == binding


class StubLLM:
    """Stands in for vLLM's AsyncLLM: each request gets one token, then stops at its length."""

    errored = False

    def __init__(self, config) -> None:
        self.config = config
        self.params: list = []

    async def generate(self, prompt, params, request_id):
        self.params.append(params)
        yield SimpleNamespace(
            outputs=[
                SimpleNamespace(
                    token_ids=[5], logprobs=[{5: SimpleNamespace(logprob=-0.5)}], finish_reason="length"
                )
            ]
        )

    async def abort(self, request_id) -> None:
        pass

    def shutdown(self) -> None:
        pass


@pytest.fixture
def stub_engine(tiny_models, monkeypatch):
    """Makes VllmEngines on the tiny target (with the tiny drafts, or none) whose vLLM is
    `StubLLM`; counts the vLLM configurations built."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from server.engine.vllm_engine import VllmEngine

    builds, engines = [], []
    build = AsyncEngineArgs.create_engine_config

    def counted(self, *args, **kwargs):
        builds.append(1)
        return build(self, *args, **kwargs)

    monkeypatch.setattr(AsyncEngineArgs, "create_engine_config", counted)
    monkeypatch.setattr(vllm_launch, "start", StubLLM)
    monkeypatch.setenv("VLLM_LOGGING_STREAM", "ext://sys.stderr")

    def make(drafts: bool) -> VllmEngine:
        engines.append(
            VllmEngine(
                tiny_models["target"],
                tiny_models["drafts"] if drafts else [],
                num_speculative_tokens=3,
                vllm_args={"dtype": "float32", "max_num_seqs": 8, "kv_cache_space": 1},
            )
        )
        return engines[-1]

    yield make, builds
    for engine in engines:
        asyncio.run(engine.shutdown())


def test_the_engine_builds_vllms_config_once_and_sizes_the_drafts_pool_from_it(stub_engine, tiny_models):
    make, builds = stub_engine
    config = make(drafts=True).llm.config
    assert len(builds) == 1
    proposer = ProposerConfig.from_vllm_config(config)
    assert proposer.dtype == "float32" and len(proposer.drafts) == len(tiny_models["drafts"])
    # 1 GiB of target KV (tokens by the resolved dtype) plus each slot's k and block of slack
    cap = vllm_launch.cpu_target_kv_tokens(config)
    assert config.cache_config.kv_cache_memory_bytes == GIB and cap > 0
    assert proposer.kv_tokens == min(8 * config.model_config.max_model_len, cap + 8 * (3 + 16))


def test_a_request_is_converted_to_vllm_params_once(stub_engine, monkeypatch):
    """The API validates a request, then streams it: one conversion (vLLM checks the params
    when they are made); a request streamed without validation is converted then."""
    from server.engine import vllm_engine

    make, _ = stub_engine
    engine = make(drafts=False)
    made = []
    real = vllm_engine.VllmSamplingParams

    def counted(**kw):
        made.append(real(**kw))
        return made[-1]

    monkeypatch.setattr(vllm_engine, "VllmSamplingParams", counted)

    async def stream(ids, params, validate: bool):
        if validate:
            engine.validate(ids, params)
        return [item async for item in engine.generate(f"r{len(made)}", ids, params)]

    ids, params = [1, 2, 3], SamplingParams(max_tokens=4)
    items = asyncio.run(stream(ids, params, validate=True))
    assert isinstance(items[-1], Finished) and len(made) == 1 and engine.llm.params == made
    asyncio.run(stream(list(ids), params, validate=False))
    assert len(made) == 2 and engine.llm.params[-1] is made[-1]
