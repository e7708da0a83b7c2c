"""`epispec bench`: the four configs on the same target, prompts and machine, one after another.

    epispec bench [--quick] [--json FILE] [--plot FILE] [--bundle DIR | --target DIR --draft DIR ...]

Each config runs in its own subprocess (`python -m measure.bench.runners`) for a clean memory
figure; a config that cannot run here (e.g. the vllm engine missing) is reported as skipped
with the reason. Then the EU error of `epispec` against exact values, the table, the goals of
issue #8 as ratios, the JSON and the plot.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure.bench import report
from measure.bench.runners import CONFIGS
from measure.bench.workload import DEFAULT_PROMPTS, Workload, is_chat_target, load_questions
from server.bundle import Bundle, BundleError
from server.engine.proposer_config import DRAFT_DTYPE_CHOICES
from server.engine.speculation_policy import SPECULATION_POLICIES
from server.engine.types import (
    BIAS_SOURCES,
    DEFAULT_NUM_SPECULATIVE_TOKENS,
    DEFAULT_TARGET_LOGPROBS,
)
from server.resolve import cpu_dtype, num_speculative_tokens, resolve_models

# (prompts, max_tokens, requests per level, EU prompts)
FULL = (128, 128, 64, 32)
QUICK = (32, 32, 16, 8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("models")
    g.add_argument("--bundle", help="bundle folder (default: $EPISPEC_BUNDLE, else bundles/smollm2)")
    g.add_argument("--target", help="target model folder, instead of a bundle")
    g.add_argument("--draft", action="append", default=[], metavar="DIR", help="draft folder (repeat)")
    g.add_argument(
        "--draft-model",
        metavar="DIR",
        help="the draft vLLM's own draft_model speculation uses (default: the first draft)",
    )
    w = parser.add_argument_group("workload")
    w.add_argument(
        "--quick",
        action="store_true",
        help=f"small workload (prompts, max tokens, requests/level, EU prompts = {QUICK}; full: {FULL})",
    )
    w.add_argument(
        "--prompts",
        default=str(DEFAULT_PROMPTS),
        metavar="FILE",
        help="JSONL (or .jsonl.gz) with a 'question' field (default: GSM8K test, shipped in data/gsm8k)",
    )
    w.add_argument("--max-tokens", type=int, help="output tokens per request (ignore_eos)")
    w.add_argument("--requests", type=int, help="requests per concurrency level (at least C)")
    w.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], metavar="C")
    w.add_argument("--eu-prompts", type=int, help="prompts whose EU is checked against exact values")
    w.add_argument(
        "--num-speculative-tokens",
        type=int,
        metavar="K",
        help="tokens proposed per round, by epispec and vLLM's draft_model (default: the bundle's "
        f"speculation.num_speculative_tokens, else {DEFAULT_NUM_SPECULATIVE_TOKENS})",
    )
    w.add_argument(
        "--prompt-format",
        choices=["auto", "plain", "chat"],
        default="auto",
        help="questions as 'Question: …\\nAnswer: ' text, or one user turn through the chat "
        "template (auto: chat for a pretrained target from `epispec models prepare`)",
    )
    w.add_argument(
        "--temperatures",
        type=float,
        nargs="+",
        default=[0.0, 0.7, 1.0],
        metavar="T",
        help="sampling temperatures, each run at every concurrency (0 = greedy; the goals are "
        "judged at 0; T > 0 shows acceptance and throughput when sampling; default: 0 0.7 1)",
    )
    w.add_argument(
        "--unseeded",
        action="store_true",
        help="send requests without a seed, as most clients do: at T > 0 the speculation policy "
        "then chooses per step for them too (a seeded row proposes a fixed k, so that its "
        "tokens do not depend on the batch); T > 0 runs are then not reproducible",
    )
    w.add_argument(
        "--target-logprobs",
        type=int,
        default=DEFAULT_TARGET_LOGPROBS,
        metavar="K",
        help="epispec with --bias-source logprobs: the target's top-k log-probs for the bias; "
        "also the k of the top-k bound reported beside the EU error",
    )
    w.add_argument(
        "--bias-source",
        choices=BIAS_SOURCES,
        help="epispec's bias: exact in vLLM's worker, or from top-k log-probs (default: the engine's)",
    )
    w.add_argument(
        "--speculation",
        choices=SPECULATION_POLICIES,
        help="epispec: tokens proposed per request and step, adaptive, fixed or off (default: the "
        "engine's, adaptive)",
    )
    w.add_argument(
        "--draft-dtype",
        choices=DRAFT_DTYPE_CHOICES,
        help="epispec: the drafts' weights and KV cache (default: the engine's, float32)",
    )
    r = parser.add_argument_group("run")
    r.add_argument(
        "--configs",
        nargs="+",
        default=list(CONFIGS),
        choices=CONFIGS,
        metavar="CONFIG",
        help=f"which configs to run, in order (default: all of {', '.join(CONFIGS)})",
    )
    r.add_argument(
        "--kv-cache-space",
        type=float,
        default=1,
        metavar="GIB",
        help="vLLM-CPU KV cache (GiB), the same for every vLLM config",
    )
    r.add_argument(
        "--dtype",
        nargs="+",
        metavar="DTYPE",
        help="vLLM target dtype for every vLLM config (default: what `epispec serve` picks: float32 "
        "on a CPU, else vLLM's auto); with several (--dtype bfloat16 float32), each vLLM config runs "
        "once per dtype, one after the other, and a table gives each one's throughput against the "
        "first's; the goals are judged on the first",
    )
    r.add_argument(
        "--no-prefix-caching",
        action="store_false",
        dest="enable_prefix_caching",
        default=None,
        help="vLLM's prefix cache off, in every vLLM config",
    )
    r.add_argument("--timeout", type=float, default=900, help="seconds per config before it is killed")
    r.add_argument(
        "--profile",
        metavar="DIR",
        help="cProfile each config's process (and epispec's proposer) into DIR; slows the run",
    )
    r.add_argument("--json", metavar="FILE", help="write the results as JSON")
    r.add_argument(
        "--report",
        metavar="FILE",
        help="run nothing: print the tables of a --json FILE written earlier (and --plot it)",
    )
    r.add_argument(
        "--readme",
        metavar="FILE",
        help="with --report: replace FILE's bench-table block with them (docs/benchmark.md)",
    )
    r.add_argument("--plot", metavar="FILE", help="write a PNG plot")


def _workload(args: argparse.Namespace, target: str, bundle: Bundle | None = None) -> Workload:
    n_prompts, max_tokens, requests, eu_prompts = QUICK if args.quick else FULL
    n_prompts = max(n_prompts, args.requests or 0, max(args.concurrency))
    chat = is_chat_target(target) if args.prompt_format == "auto" else args.prompt_format == "chat"
    return Workload(
        chat=chat,
        prompts=load_questions(args.prompts, n_prompts, chat=chat),
        max_tokens=args.max_tokens or max_tokens,
        concurrencies=tuple(args.concurrency),
        requests_per_level=args.requests or requests,
        eu_prompts=eu_prompts if args.eu_prompts is None else args.eu_prompts,
        num_speculative_tokens=num_speculative_tokens(args.num_speculative_tokens, bundle),
        target_logprobs=args.target_logprobs,
        temperatures=tuple(args.temperatures),
        seeded=not args.unseeded,
    )


def skip_reason(config: str, drafts: list[str]) -> str | None:
    """Why a config cannot run here, or None."""
    vllm = importlib.util.find_spec("vllm") is not None
    if config.startswith("vllm-") and not vllm:
        return "vLLM is not installed"
    if config in ("vllm-draft-model", "epispec") and not drafts:
        return "no drafts given"
    if config == "vllm-draft-model":
        from server.engine.feature_draft import is_feature_draft

        if is_feature_draft(drafts[0]):
            return "feature drafts read the target's hidden states: vLLM's draft_model cannot run one alone"
    if config == "epispec":
        if not vllm:
            return "vLLM is not installed"
        if importlib.util.find_spec("server.engine.vllm_engine") is None:
            return "the vllm engine (server/engine/vllm_engine.py) is not in this version"
    return None


def run_config(spec: dict, folder: Path, timeout: float) -> tuple[dict | None, str | None]:
    """Run one config's subprocess; (result, None) or (None, reason)."""
    name = spec["config"]
    spec_path, out_path, log_path = (folder / f"{name}.{x}" for x in ("spec.json", "out.json", "log"))
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "measure.bench.runners", str(spec_path), str(out_path)]
    print(f"epispec bench: running {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout:.0f} s (log: {log_path})"
    print(f"epispec bench: {name} took {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if rc != 0 or not out_path.exists():
        tail = log_path.read_text().strip().splitlines()[-3:]
        return None, f"exit status {rc}: {' / '.join(tail)} (log: {log_path})"
    return json.loads(out_path.read_text()), None


def regenerate(source: str, readme: str | None, plot: str | None) -> int:
    """`--report`: the tables of a bench JSON, printed, spliced into `readme`, plotted."""
    try:
        doc = json.loads(Path(source).read_text())
    except (OSError, ValueError) as exc:
        print(f"epispec bench: --report {source}: {exc}", file=sys.stderr)
        return 2
    block = report.readme_block(doc, source)
    if readme:
        try:
            report.BLOCK.write_into(readme, block)
        except (OSError, ValueError) as exc:
            print(f"epispec bench: --readme {readme}: {exc}", file=sys.stderr)
            return 2
    if plot and doc["runs"]:
        report.plot(doc, plot)
    print(block, end="")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.report:
        return regenerate(args.report, args.readme, args.plot)
    started = time.time()
    try:
        target, drafts, bundle = resolve_models(args.target, args.draft, args.bundle)
        workload = _workload(args, target, bundle)
    except (BundleError, FileNotFoundError, ValueError) as exc:
        print(f"epispec bench: {exc}", file=sys.stderr)
        return 2
    doc = {
        "command": "epispec bench " + " ".join(sys.argv[2:]),
        "machine": report.machine(),
        "revision": _revision(),
        "models": _models(target, drafts),
        "workload": {**workload.as_dict(), "prompts": len(workload.prompts)},
        "runs": [],
        "eu_error": None,
        "goals": [],
        "skipped": [],
        "configs": {},
    }
    eu_tokens = []
    dtypes = args.dtype or [cpu_dtype()]
    with tempfile.TemporaryDirectory(prefix="epispec-bench-") as tmp:
        # the dtypes of a config back to back, so that they see the same load
        for config, dtype in [(c, d) for c in args.configs for d in dtypes]:
            if config == "reference" and dtype != dtypes[0]:
                continue  # transformers in float32: no vLLM dtype
            label = config if len(dtypes) == 1 or config == "reference" else f"{config} ({dtype})"
            reason = skip_reason(config, drafts)
            result = None
            if reason is None:
                spec = {
                    "config": config,
                    "target": target,
                    "drafts": drafts,
                    "draft_model": _draft_model(
                        args.draft_model or (drafts[0] if drafts else None), target, Path(tmp)
                    )
                    if config == "vllm-draft-model"
                    else None,
                    "workload": workload.as_dict(),
                    "kv_cache_space": args.kv_cache_space,
                    "dtype": dtype,
                    "enable_prefix_caching": args.enable_prefix_caching,
                    "bias_source": args.bias_source,
                    "speculation": args.speculation,
                    "draft_dtype": args.draft_dtype,
                    "profile": str(Path(args.profile).resolve()) if args.profile else None,
                }
                result, reason = run_config(spec, Path(tmp), args.timeout)
            if result is None:
                doc["skipped"].append({"config": label, "reason": reason})
                print(f"epispec bench: skipped {label}: {reason}", file=sys.stderr)
                continue
            for row in result["runs"]:
                row["dtype"] = None if config == "reference" else dtype
            doc["runs"] += result["runs"]
            doc["configs"][label] = {
                "startup_s": result["startup_s"],
                "startup_peak_rss_bytes": result["startup_peak_rss_bytes"],
            }
            eu_tokens += result["eu_tokens"] if dtype == dtypes[0] else []
    if eu_tokens:
        from measure.bench.eu_error import eu_error

        doc["eu_error"] = eu_error(target, drafts, eu_tokens, workload.target_logprobs)
    first = [r for r in doc["runs"] if r["dtype"] in (None, dtypes[0])]
    doc["goals"] = report.goals(first, doc["eu_error"])
    doc["wall_s"] = time.time() - started
    print(report.markdown(doc))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    if args.plot and doc["runs"]:
        report.plot(doc, args.plot)
    return 0 if doc["runs"] else 1


def _models(target: str, drafts: list[str]) -> dict:
    from server.engine.models import count_parameters

    return {
        "target": target,
        "target_name": Path(target).name,
        "drafts": drafts,
        "target_parameters": count_parameters(target),
        "draft_parameters": [count_parameters(d) for d in drafts],
    }


def _revision() -> str | None:
    """The checkout's commit, with "+dirty" when the working tree differs (what was measured)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        run = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        return run.stdout.strip()

    try:
        head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "-uno")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if head and dirty else head or None


def _draft_model(draft: str | None, target: str, tmp: Path) -> str | None:
    """The draft for vLLM's own draft_model speculation: a reduced-vocabulary draft is expanded
    to the target's vocabulary first (vLLM needs it; `drafts.reduced.full_vocabulary_copy`)."""
    if draft is None or not (Path(draft) / "draft_vocab.json").is_file():
        return draft
    out = tmp / "draft_model_full_vocabulary"
    if not out.exists():
        from drafts.reduced import full_vocabulary_copy

        full_vocabulary_copy(draft, target, out)
    return str(out)
