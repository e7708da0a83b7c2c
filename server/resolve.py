"""From settings to what runs: the models (given, or a bundle's), the engine's arguments and the
flag thresholds. One path for `epispec serve` (its `Settings`) and `epispec generate` (its
parsed flags): both name the same things the same way (target, drafts, bundle, engine,
num_speculative_tokens, bias_source, target_logprobs, device, max_model_len, draft_kv_gib,
draft_dtype, and
eu/bias/variance_threshold), so either can be passed where a function takes `given`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.bundle import Bundle, load_bundle
from server.engine.factory import EngineArgs
from server.engine.types import DEFAULT_EU_THRESHOLD, FlagThresholds

# EngineArgs fields that settings and flags carry under the same names
ENGINE_SETTINGS = (
    "engine",
    "num_speculative_tokens",
    "bias_source",
    "target_logprobs",
    "device",
    "max_model_len",
    "draft_kv_gib",
    "draft_dtype",
)
# vLLM engine arguments passed through unchanged, in vLLM's own names (`--kv-cache-space` is
# vLLM-CPU's VLLM_CPU_KVCACHE_SPACE)
VLLM_PASSTHROUGH = (
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "distributed_executor_backend",
    "gpu_memory_utilization",
    "dtype",
    "max_num_seqs",
    "enforce_eager",
    "kv_cache_space",
)


def resolve_models(
    target: str | None, drafts: list[str], bundle: str | None
) -> tuple[str, list[str], Bundle | None]:
    """(target, drafts, bundle or None): the given folders, else the bundle's (default: the demo
    bundle). ValueError for a contradiction; BundleError when no bundle is found."""
    if target:
        if bundle:
            raise ValueError("pass either --target/--draft or --bundle, not both.")
        return target, list(drafts), None
    if drafts:
        raise ValueError("--draft needs --target.")
    found = load_bundle(bundle)
    return str(found.target), [str(d) for d in found.drafts], found


def vllm_args(flags: Mapping[str, Any]) -> dict:
    """The vLLM pass-through flags that are set (unset ones keep vLLM's defaults)."""
    return {k: flags[k] for k in VLLM_PASSTHROUGH if flags.get(k) is not None}


def engine_args(given, vllm_flags: Mapping[str, Any]) -> tuple[EngineArgs, Bundle | None]:
    """EngineArgs (and the bundle they come from, if any) for `given`'s models and engine
    settings, with the vLLM pass-through flags among `vllm_flags`."""
    target, drafts, bundle = resolve_models(given.target, given.drafts, given.bundle)
    return EngineArgs(
        target,
        drafts,
        model_name=getattr(given, "model_name", None),
        vllm_args=vllm_args(vllm_flags),
        **{k: getattr(given, k) for k in ENGINE_SETTINGS},
    ), bundle


def resolve_thresholds(given, calibrated: Mapping[str, float] | None = None) -> FlagThresholds:
    """The flag thresholds, each on its own: `given`'s eu/bias/variance_threshold where set, else
    the bundle's calibrated value (`calibrated`), else the default (eu: DEFAULT_EU_THRESHOLD;
    bias and variance: none)."""
    cal = calibrated or {}

    def pick(name: str, default: float | None) -> float | None:
        own = getattr(given, f"{name}_threshold", None)
        if own is not None:
            return own
        return float(cal[name]) if cal.get(name) is not None else default

    return FlagThresholds(
        eu=pick("eu", DEFAULT_EU_THRESHOLD), bias=pick("bias", None), variance=pick("variance", None)
    )
