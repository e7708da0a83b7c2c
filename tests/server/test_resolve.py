"""server/resolve.py: `epispec serve` and `epispec generate` resolve models and flag thresholds
through the same code, each threshold on its own (flag, else the bundle's, else the default)."""

from __future__ import annotations

import json
import sys

import pytest

from server.cli import build_parser
from server.commands.serve import settings_from_flags
from server.engine.types import DEFAULT_EU_THRESHOLD
from server.resolve import engine_args, resolve_models, resolve_thresholds, vllm_args

CALIBRATED = {"eu": 0.3, "bias": 0.2, "variance": 0.1}


def parse(argv: list[str]):
    sys.argv = ["epispec", *argv]
    return build_parser().parse_args(argv)


def given(command: str, *flags: str):
    """What each command hands the resolver: serve its Settings, generate its parsed flags."""
    if command == "serve":
        return settings_from_flags(parse(["serve", *flags]))
    return parse(["generate", "--prompt", "hi", *flags])


@pytest.mark.parametrize("command", ["serve", "generate"])
@pytest.mark.parametrize(
    ("flags", "calibrated", "want"),
    [
        ((), None, (DEFAULT_EU_THRESHOLD, None, None)),
        ((), CALIBRATED, (0.3, 0.2, 0.1)),
        (("--eu-threshold", "0.7"), CALIBRATED, (0.7, 0.2, 0.1)),  # the bundle's bias and variance stay
        (("--variance-threshold", "0.05"), {"bias": 0.2}, (DEFAULT_EU_THRESHOLD, 0.2, 0.05)),
    ],
)
def test_each_threshold_falls_back_on_its_own(command, flags, calibrated, want):
    t = resolve_thresholds(given(command, *flags), calibrated)
    assert (t.eu, t.bias, t.variance) == want


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_both_commands_build_the_same_engine_args(command):
    eargs, bundle = engine_args(
        given(
            command,
            "--target",
            "t",
            "--draft",
            "a",
            "--draft",
            "b",
            "--bias-source",
            "logprobs",
            "--dtype",
            "float32",
            "--eu-channel",
            "tcp://0.0.0.0:5557",
            "--speculation",
            "off",
        ),
        {"dtype": "float32"},
    )
    assert bundle is None and (eargs.target, eargs.drafts) == ("t", ["a", "b"])
    assert (eargs.engine, eargs.num_speculative_tokens, eargs.target_logprobs) == ("auto", 3, 20)
    assert eargs.bias_source == "logprobs" and eargs.vllm_args == {"dtype": "float32"}
    assert eargs.eu_channel == "tcp://0.0.0.0:5557" and eargs.speculation == "off"
    assert engine_args(given(command, "--target", "t"), {})[0].speculation == "adaptive"  # the default


def test_models_are_given_or_a_bundle_not_both():
    with pytest.raises(ValueError, match="not both"):
        resolve_models("t", [], "b")
    with pytest.raises(ValueError, match="needs --target"):
        resolve_models(None, ["d"], None)


def test_cpu_dtype_is_float32_on_every_cpu():
    """float32 on a CPU whether or not it has bf16 matmul units (bf16 is not batch-invariant
    there: docs/determinism.md); on CUDA, vLLM's own default."""
    from server.resolve import cpu_dtype

    assert cpu_dtype(cuda=False) == "float32"
    assert cpu_dtype(cuda=True) is None


def test_a_given_dtype_wins_and_the_reference_engine_gets_none(monkeypatch):
    import server.resolve as resolve

    monkeypatch.setattr(resolve, "cpu_dtype", lambda: "float32")
    assert resolve.vllm_args({"dtype": "bfloat16"}) == {"dtype": "bfloat16"}
    assert resolve.vllm_args({}) == {"dtype": "float32"}
    assert resolve.vllm_args({}, "reference") == {}


def _bundle(root, speculation=None):
    manifest = {"schema_version": 1, "target": {"path": "target"}}
    if speculation is not None:
        manifest["speculation"] = speculation
    root.mkdir()
    (root / "bundle.json").write_text(json.dumps(manifest))
    return str(root)


@pytest.mark.parametrize("command", ["serve", "generate"])
@pytest.mark.parametrize(
    ("speculation", "flags", "want"),
    [
        ({"num_speculative_tokens": 1}, (), 1),  # the bundle's measured k
        ({"num_speculative_tokens": 1}, ("--num-speculative-tokens", "2"), 2),  # a flag wins
        (None, (), 3),  # no speculation entry: the default
    ],
)
def test_k_is_the_flag_else_the_bundles_else_the_default(tmp_path, command, speculation, flags, want):
    eargs, bundle = engine_args(given(command, "--bundle", _bundle(tmp_path / "b", speculation), *flags), {})
    assert bundle is not None and eargs.num_speculative_tokens == want


def test_a_bad_speculation_entry_is_a_bundle_error(tmp_path):
    from server.bundle import BundleError, load_bundle

    with pytest.raises(BundleError, match="num_speculative_tokens"):
        load_bundle(_bundle(tmp_path / "b", {"num_speculative_tokens": 0}))


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_no_prefix_caching_reaches_vllm_and_its_absence_keeps_vllms_default(command):
    extra = ["--prompt", "hi"] if command == "generate" else []
    on = vars(parse([command, *extra, "--dtype", "float32", "--no-prefix-caching"]))
    off = vars(parse([command, *extra, "--dtype", "float32"]))
    assert vllm_args(on) == {"dtype": "float32", "enable_prefix_caching": False}
    assert vllm_args(off) == {"dtype": "float32"}
