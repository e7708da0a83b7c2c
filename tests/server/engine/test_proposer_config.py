"""The proposer's typed settings: round trip through vLLM's additional_config, refusals."""

from types import SimpleNamespace

import pytest

from server.engine.proposer_config import KEY, ProposerConfig


def test_round_trip_through_additional_config():
    cfg = ProposerConfig(
        drafts=("a", "b"), channel="ipc:///x", top_n=-1, bias="logprobs", kv_tokens=640, speculation="off"
    )
    extra = cfg.to_additional_config()
    assert list(extra) == [KEY] and extra[KEY]["drafts"] == ["a", "b"]
    assert ProposerConfig.from_vllm_config(SimpleNamespace(additional_config=extra)) == cfg


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({}, "no 'epispec' settings"),
        ({KEY: {"drafts": ["a"], "channel": "c", "colour": 1}}, "unknown epispec proposer settings: colour"),
        ({KEY: {"drafts": [], "channel": "c"}}, "at least one draft"),
        ({KEY: {"drafts": ["a"], "channel": "c", "bias": "guess"}}, "bias must be one of"),
        ({KEY: {"drafts": ["a"], "channel": "c", "dtype": "int8"}}, "draft_dtype must be"),
        ({KEY: {"drafts": ["a"], "channel": "c", "kv_tokens": 0}}, "kv_tokens must be positive"),
        ({KEY: {"drafts": ["a"], "channel": "c", "speculation": "k=2"}}, "speculation must be one of"),
    ],
)
def test_refused_with_a_sentence(extra, match):
    with pytest.raises(ValueError, match=match):
        ProposerConfig.from_vllm_config(SimpleNamespace(additional_config=extra))


def test_auto_draft_dtype_follows_the_machine(monkeypatch):
    import torch

    from server.engine.proposer_config import resolve_draft_dtype

    assert resolve_draft_dtype("float16") == "float16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert resolve_draft_dtype("auto") == "float32"  # bf16 matmuls emulated: float32 is faster
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_draft_dtype("auto") == "bfloat16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_draft_dtype("auto") == "bfloat16"
    with pytest.raises(ValueError, match="draft_dtype must be auto or"):
        resolve_draft_dtype("int8")
