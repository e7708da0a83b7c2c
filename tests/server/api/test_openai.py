"""The OpenAI-compatible endpoints through the unmodified `openai` client, streamed and not:
the uncertainty extras survive the client, chunks add up to the full response."""

from __future__ import annotations

import math

import openai
import pytest

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Tom has 3 apples and buys 2. How many?"},
]


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def extra(obj, name):
    """An extra field as the openai client keeps it (attribute and model_extra)."""
    value = getattr(obj, name)
    assert obj.model_extra[name] == value
    return value


def test_models_lists_the_served_model(oai):
    assert [m.id for m in oai.models.list().data] == ["tiny"]


def test_chat_completion_carries_uncertainty(oai):
    r = oai.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    choice = r.choices[0]
    unc = extra(choice, "uncertainty")
    assert "".join(t["token"] for t in unc["tokens"]) == choice.message.content
    assert len(unc["tokens"]) == r.usage.completion_tokens or choice.finish_reason == "stop"
    eus = [t["eu"] for t in unc["tokens"]]
    assert unc["summary"]["max_eu"] == max(eus)
    assert math.isclose(unc["summary"]["mean_eu"], sum(eus) / len(eus))
    for t in unc["tokens"]:
        assert math.isclose(t["eu"], t["bias"] + t["variance"], rel_tol=1e-4, abs_tol=1e-6)
    content = choice.logprobs.content
    assert [c.token for c in content] == [t["token"] for t in unc["tokens"]]
    for c, t in zip(content, unc["tokens"], strict=True):
        assert extra(c, "uncertainty") == {k: t[k] for k in ("eu", "bias", "variance", "flagged")}
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6


def test_chat_stream_adds_up_to_the_full_response(oai):
    kw = {"model": "tiny", "messages": MESSAGES, "max_completion_tokens": 6, "temperature": 0}
    whole = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    *body, last_choice_chunk, usage_chunk = chunks
    assert body[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in body) == whole.choices[0].message.content
    streamed = [t for c in body for t in extra(c.choices[0], "uncertainty")["tokens"]]
    assert streamed == extra(whole.choices[0], "uncertainty")["tokens"]
    assert all(len(extra(c.choices[0], "uncertainty")["tokens"]) == 1 for c in body)
    final = last_choice_chunk.choices[0]
    assert final.finish_reason == whole.choices[0].finish_reason
    assert extra(final, "uncertainty")["summary"] == extra(whole.choices[0], "uncertainty")["summary"]
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage


def test_completion_and_its_stream(oai):
    kw = {
        "model": "tiny",
        "prompt": "Question: Tom has 3 apples",
        "max_tokens": 5,
        "temperature": 0,
        "logprobs": 1,
    }
    whole = oai.completions.create(**kw)
    choice = whole.choices[0]
    unc = extra(choice, "uncertainty")
    assert "".join(t["token"] for t in unc["tokens"]) == choice.text
    assert choice.logprobs.tokens == [t["token"] for t in unc["tokens"]]
    assert len(choice.logprobs.top_logprobs[0]) == 1
    chunks = list(oai.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert extra(chunks[-1].choices[0], "uncertainty")["summary"] == unc["summary"]


def test_stop_on_uncertainty_through_extra_body(oai):
    r = oai.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        extra_body={"thresholds": {"eu": 0.0}, "stop_on_uncertainty": True},
    )
    assert (r.choices[0].finish_reason, extra(r.choices[0], "stop_reason")) == ("stop", "uncertainty")
    assert extra(r.choices[0], "uncertainty")["summary"]["flagged"]


def test_unknown_model_is_404(oai):
    with pytest.raises(openai.NotFoundError) as info:
        oai.chat.completions.create(model="gpt-9", messages=MESSAGES, max_tokens=2)
    assert info.value.body["param"] == "model"


def test_default_chat_template_where_the_tokenizer_has_none(engine):
    from server.api.prompts import DEFAULT_CHAT_TEMPLATE, chat_prompt_ids
    from server.api.schemas import ChatMessage

    class NoTemplate:
        chat_template = None
        bos_token_id = None

        def __init__(self, tok):
            self.tok = tok

        def __call__(self, text):
            return self.tok(text)

        def apply_chat_template(self, turns, chat_template, **kw):
            assert chat_template == DEFAULT_CHAT_TEMPLATE
            return self.tok.apply_chat_template(turns, chat_template=chat_template, **kw)

    msgs = [ChatMessage(role="user", content="hi")]
    ids = chat_prompt_ids(NoTemplate(engine.tokenizer), msgs)
    assert engine.tokenizer.decode(ids, skip_special_tokens=True).endswith("User: hi\nAssistant:")


def test_completions_default_to_16_tokens(oai):
    """As the OpenAI API and vLLM: /v1/completions without max_tokens generates 16 tokens
    (this server's default_max_tokens, 8 here, applies to chat and /generate)."""
    r = oai.completions.create(
        model="tiny", prompt="Question: Tom has", temperature=1.0, seed=1, extra_body={"ignore_eos": True}
    )
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 16)
    c = oai.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=1.0, seed=1, extra_body={"ignore_eos": True}
    )
    assert (c.choices[0].finish_reason, c.usage.completion_tokens) == ("length", 8)


def test_completions_accept_one_list_of_token_ids(oai, engine):
    ids = engine.tokenizer("Question: Tom has", add_special_tokens=False)["input_ids"]
    nested = oai.completions.create(model="tiny", prompt=[ids], max_tokens=5, temperature=0)
    flat = oai.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert nested.choices[0].text == flat.choices[0].text
    assert nested.usage.prompt_tokens == len(ids)


def test_completions_logprobs_zero_has_null_top_logprobs(oai):
    r = oai.completions.create(
        model="tiny", prompt="Question: Tom has", max_tokens=4, temperature=0, logprobs=0
    )
    lp = r.choices[0].logprobs
    assert lp.top_logprobs is None
    assert len(lp.token_logprobs) == len(lp.tokens) >= 1
    r2 = oai.completions.create(
        model="tiny", prompt="Question: Tom has", max_tokens=4, temperature=0, logprobs=2
    )
    assert [len(t) for t in r2.choices[0].logprobs.top_logprobs] == [2] * len(lp.tokens)


def test_same_seed_same_text_streamed_or_not(oai):
    kw = dict(model="tiny", prompt="Question: Ann has", max_tokens=8, temperature=1.0, seed=42)
    whole = oai.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in oai.completions.create(stream=True, **kw) if c.choices)
    assert whole == streamed == oai.completions.create(**kw).choices[0].text
