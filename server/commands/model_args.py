"""Command-line arguments that choose the models and the engine (shared by generate and serve)."""

from __future__ import annotations

import argparse

from server.bundle import Bundle, load_bundle
from server.engine.factory import ENGINES, EngineArgs


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("models and engine")
    g.add_argument("--target", help="target model folder (Hugging Face format)")
    g.add_argument("--draft", action="append", default=[], metavar="DIR",
                   help="draft model folder; repeat for an ensemble (M drafts)")
    g.add_argument("--bundle", help="bundle folder with bundle.json (default: the demo bundle)")
    g.add_argument("--engine", default="auto", choices=["auto", *ENGINES],
                   help="vllm (default where vLLM is installed) or reference (exact PyTorch)")
    g.add_argument("--num-speculative-tokens", type=int, default=3, metavar="K",
                   help="tokens the drafts propose per round (default 3)")
    g.add_argument("--bias-source", default="worker", choices=["worker", "logprobs"],
                   help="vllm engine: where the bias KL(q̄ ‖ p) comes from: worker (default; exact, "
                        "from the target's full logits inside vLLM's worker) or logprobs (the "
                        "target's top-K log-probs, --target-logprobs)")
    g.add_argument("--target-logprobs", type=int, default=20, metavar="K",
                   help="vllm engine, --bias-source logprobs: target top-k log-probs for the bias; "
                        "-1 = whole vocabulary (exact)")
    g.add_argument("--device", default="auto", help="reference engine: cpu, cuda or auto")
    g.add_argument("--max-model-len", type=int, default=None, help="prompt + output token limit")
    v = parser.add_argument_group("vLLM engine arguments (passed through to vLLM)")
    v.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N")
    v.add_argument("--pipeline-parallel-size", type=int, default=None, metavar="N")
    v.add_argument("--distributed-executor-backend", default=None, metavar="BACKEND",
                   help="mp, ray, uni or external_launcher: how vLLM runs its workers")
    v.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="FRACTION",
                   help="fraction of GPU memory vLLM may use")
    v.add_argument("--dtype", default=None, help="target weights' dtype (auto, float32, bfloat16, ...)")
    v.add_argument("--max-num-seqs", type=int, default=None, metavar="N",
                   help="most concurrent sequences per step")
    v.add_argument("--enforce-eager", action="store_true", default=None,
                   help="no CUDA graphs / compilation")
    v.add_argument("--kv-cache-space", type=int, default=None, metavar="GIB",
                   help="CPU KV cache size in GiB (vLLM-CPU's VLLM_CPU_KVCACHE_SPACE; default 4)")


# EngineArgs.vllm_args keys, in vLLM's own names, for the pass-through flags above
VLLM_PASSTHROUGH = (
    "tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend",
    "gpu_memory_utilization", "dtype", "max_num_seqs", "enforce_eager", "kv_cache_space",
)


def vllm_args(args: argparse.Namespace) -> dict:
    """The pass-through flags the user set (unset ones keep vLLM's defaults)."""
    return {k: getattr(args, k) for k in VLLM_PASSTHROUGH if getattr(args, k, None) is not None}


def resolve_models(args: argparse.Namespace) -> tuple[str, list[str], Bundle | None]:
    """(target, drafts, bundle or None) from --target/--draft or --bundle (default: demo bundle)."""
    if args.target:
        if args.bundle:
            raise SystemExit("epispec: pass either --target/--draft or --bundle, not both.")
        return args.target, list(args.draft), None
    if args.draft:
        raise SystemExit("epispec: --draft needs --target.")
    bundle = load_bundle(args.bundle)
    return str(bundle.target), [str(d) for d in bundle.drafts], bundle


def engine_args(args: argparse.Namespace) -> tuple[EngineArgs, Bundle | None]:
    target, drafts, bundle = resolve_models(args)
    return (
        EngineArgs(
            target=target,
            drafts=drafts,
            engine=args.engine,
            num_speculative_tokens=args.num_speculative_tokens,
            bias_source=args.bias_source,
            target_logprobs=args.target_logprobs,
            device=args.device,
            max_model_len=args.max_model_len,
            vllm_args=vllm_args(args),
        ),
        bundle,
    )
