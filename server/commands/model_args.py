"""Command-line arguments shared by generate and serve: the models, the engine, the flag
thresholds. Their dests are the names of `server.config.Settings` and `server.resolve`."""

from __future__ import annotations

import argparse

from server.engine.factory import ENGINES
from server.engine.proposer_config import DEFAULT_DRAFT_DTYPE, DRAFT_DTYPE_CHOICES
from server.engine.speculation_policy import DEFAULT_SPECULATION, SPECULATION_POLICIES
from server.engine.types import (
    BIAS_SOURCES,
    DEFAULT_BIAS_SOURCE,
    DEFAULT_EU_THRESHOLD,
    DEFAULT_NUM_SPECULATIVE_TOKENS,
    DEFAULT_TARGET_LOGPROBS,
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("models and engine")
    g.add_argument("--target", help="target model folder (Hugging Face format)")
    g.add_argument(
        "--draft",
        action="append",
        default=[],
        metavar="DIR",
        dest="drafts",
        help="draft model folder; repeat for an ensemble (M drafts)",
    )
    g.add_argument(
        "--bundle", help="bundle folder with bundle.json (default: $EPISPEC_BUNDLE, else bundles/smollm2)"
    )
    g.add_argument(
        "--engine",
        default="auto",
        choices=["auto", *ENGINES],
        help="vllm (default where vLLM is installed) or reference (exact PyTorch)",
    )
    g.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=None,
        metavar="K",
        help="tokens the drafts propose per round (default: the bundle's "
        f"speculation.num_speculative_tokens, else {DEFAULT_NUM_SPECULATIVE_TOKENS})",
    )
    g.add_argument(
        "--bias-source",
        default=DEFAULT_BIAS_SOURCE,
        choices=BIAS_SOURCES,
        help="vllm engine: where the bias KL(q̄ ‖ p) comes from: worker (default; exact, "
        "from the target's full logits inside vLLM's worker) or logprobs (the "
        "target's top-K log-probs, --target-logprobs)",
    )
    g.add_argument(
        "--target-logprobs",
        type=int,
        default=DEFAULT_TARGET_LOGPROBS,
        metavar="K",
        help="vllm engine, --bias-source logprobs: target top-k log-probs for the bias; "
        f"-1 = whole vocabulary (exact; default {DEFAULT_TARGET_LOGPROBS})",
    )
    g.add_argument("--device", default="auto", help="reference engine: cpu, cuda or auto")
    g.add_argument("--max-model-len", type=int, default=None, help="prompt + output token limit")
    g.add_argument(
        "--draft-kv-gib",
        type=float,
        default=None,
        metavar="GIB",
        help="vllm engine: memory for the drafts' KV cache; vLLM's own KV cache is capped so that "
        "requests beyond it wait in vLLM's queue (default: max-num-seqs × max-model-len tokens, "
        "never full; on CPU only pages in use are resident, on a GPU all of it is reserved)",
    )
    g.add_argument(
        "--draft-dtype",
        default=DEFAULT_DRAFT_DTYPE,
        choices=DRAFT_DTYPE_CHOICES,
        help="vllm engine: the drafts' weights and KV cache (default float32, the exact EU's "
        "arithmetic; auto: bfloat16 on GPUs and on CPUs with avx512_bf16, float32 on other CPUs, "
        "where bf16 matmuls are emulated and several times slower)",
    )
    g.add_argument(
        "--speculation",
        default=DEFAULT_SPECULATION,
        choices=SPECULATION_POLICIES,
        help="vllm engine: how many tokens each request proposes per step: adaptive (default; "
        "per step, what pays for the batch, from a cost model of the target's steps timed while "
        "serving and the drafts' measured acceptance), fixed (always --num-speculative-tokens) "
        "or off (none). Every emitted token keeps its uncertainty either way",
    )
    g.add_argument(
        "--eu-channel",
        default="ipc",
        metavar="ADDRESS",
        help="vllm engine: the side channel that brings the proposer's records to this process: "
        "ipc (default; a private socket on this machine) or tcp://HOST:PORT, bound here and "
        "authenticated with CURVE keys made at start-up, for workers on other machines "
        "(docs/reliability.md)",
    )
    v = parser.add_argument_group("vLLM engine arguments (passed through to vLLM)")
    v.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N")
    v.add_argument("--pipeline-parallel-size", type=int, default=None, metavar="N")
    v.add_argument(
        "--distributed-executor-backend",
        default=None,
        metavar="BACKEND",
        help="mp, ray, uni or external_launcher: how vLLM runs its workers",
    )
    v.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        metavar="FRACTION",
        help="fraction of GPU memory vLLM may use",
    )
    v.add_argument(
        "--dtype",
        default=None,
        help="the target's dtype (float32, bfloat16, auto = the checkpoint's, ...; default on a CPU: "
        "float32, as bf16 answers change with the drafts and the prefix cache: docs/determinism.md)",
    )
    v.add_argument(
        "--max-num-seqs", type=int, default=None, metavar="N", help="most concurrent sequences per step"
    )
    v.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs / compilation")
    v.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        default=None,
        help="turn vLLM's prefix cache off: every prompt is computed afresh, so an answer does not "
        "depend on which prompts came before it (docs/determinism.md); slower for shared prompts; "
        "feature drafts then get the target's hidden state at every position",
    )
    v.add_argument(
        "--kv-cache-space",
        type=int,
        default=None,
        metavar="GIB",
        help="CPU KV cache size in GiB (vLLM's kv_cache_memory_bytes; default: VLLM_CPU_KVCACHE_SPACE, else 4)",
    )


def add_threshold_arguments(parser: argparse.ArgumentParser) -> None:
    """--eu/bias/variance-threshold; each unset one falls back on its own to the bundle's
    calibrated value, else the default (`server.resolve.resolve_thresholds`)."""
    g = parser.add_argument_group("hallucination flags (nats)")
    g.add_argument(
        "--eu-threshold",
        type=float,
        default=None,
        help=f"flag tokens with eu above this (default: the bundle's, else {DEFAULT_EU_THRESHOLD})",
    )
    g.add_argument(
        "--bias-threshold",
        type=float,
        default=None,
        help="also flag tokens with bias above this (default: the bundle's, else none)",
    )
    g.add_argument(
        "--variance-threshold",
        type=float,
        default=None,
        help="also flag tokens with variance above this (default: the bundle's, else none)",
    )
