"""Feature drafts (EAGLE-style, reading the target's hidden states): the stacked kernel against
transformers' own Llama layer, and the reference engine with them (greedy = target, EU =
teacher-forced, sampling follows the target)."""

from __future__ import annotations

import collections

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from server.engine.feature_draft import (
    FeatureDraftError,
    FeatureSpec,
    load_feature_drafts,
    read_spec,
    shifted_features,
)
from server.engine.models import load_causal_lm
from server.engine.reference import ReferenceEngine
from server.engine.stacked_layers import causal_attend
from server.engine.teacher_forced import forced_feature_logprobs, forced_logprobs
from server.engine.types import Finished, SamplingParams
from server.engine.uncertainty import decompose
from tests.sampling_check import assert_pairs_follow_target

PROMPT = "Question: Ann has 3 apples and buys 4 more. How many apples does Ann have?\nAnswer:"


def _by_hand(folder: str, embed: torch.Tensor, x: torch.Tensor, f_prev: torch.Tensor) -> torch.Tensor:
    """One draft's log-probs [T, V] through transformers' LlamaDecoderLayer and rotary embedding,
    loaded with the draft's weights (linear weights stored [in, out])."""
    from safetensors.torch import load_file

    s = read_spec(folder)
    w = load_file(f"{folder}/model.safetensors")
    cfg = LlamaConfig(
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim,
        rms_norm_eps=s.rms_eps,
        rope_theta=s.rope_theta,
        max_position_embeddings=s.max_positions,
        vocab_size=embed.shape[0],
    )
    cfg._attn_implementation = "eager"
    layer = LlamaDecoderLayer(cfg, layer_idx=0).eval()
    layer.load_state_dict(
        {k[6:]: (v.t() if v.dim() == 2 else v) for k, v in w.items() if k.startswith("layer.")}
    )
    h = torch.cat([f_prev, embed[x]], -1) @ w["fc.weight"] + w["fc.bias"]  # [1, T, E]
    T = x.shape[1]
    pos = torch.arange(T)[None]
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]  # causal
    out = layer(
        h, attention_mask=mask, position_ids=pos, position_embeddings=LlamaRotaryEmbedding(cfg)(h, pos)
    )
    out = out[0] if isinstance(out, tuple) else out
    return torch.log_softmax(out[0] @ embed.T, -1)  # [T, V]


@torch.inference_mode()
def test_stacked_kernel_equals_transformers_layers(tiny_models, feature_drafts):
    target = load_causal_lm(tiny_models["target"])
    drafts = load_feature_drafts(feature_drafts, tiny_models["target"])
    x = torch.randint(0, target.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    f = target.model(input_ids=x).last_hidden_state  # [1, T, E]
    lq, g = drafts(x, shifted_features(f), torch.arange(12)[None], causal_attend(drafts.scale))  # [T, M, V]
    assert lq.shape == (12, 3, target.config.vocab_size) and g.shape == (3, 12, f.shape[-1])
    for m, folder in enumerate(feature_drafts):
        torch.testing.assert_close(
            lq[:, m], _by_hand(folder, drafts.embed, x, shifted_features(f)), atol=1e-4, rtol=1e-4
        )
    assert not torch.allclose(lq[:, 0], lq[:, 1])  # the drafts differ


def test_mismatched_drafts_are_refused(tiny_models, feature_drafts, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(feature_drafts[0], bad)
    (bad / "feature_draft.json").write_text('{"kind": "feature", "format": 99, "spec": {}}')
    with pytest.raises(FeatureDraftError, match="format 99"):
        load_feature_drafts([feature_drafts[1], str(bad)], tiny_models["target"])


@pytest.fixture(scope="module")
def engine(tiny_models, feature_drafts):
    return ReferenceEngine(tiny_models["target"], feature_drafts, num_speculative_tokens=3)


def _ids(engine, text):
    return [engine.tokenizer.bos_token_id, *engine.tokenizer(text, add_special_tokens=False)["input_ids"]]


def _run(engine, ids, **kw):
    items = list(engine.stream(ids, SamplingParams(**kw)))
    assert isinstance(items[-1], Finished)
    return items[:-1], items[-1]


@torch.inference_mode()
def test_greedy_equals_the_target_and_eu_is_teacher_forced(engine):
    ids = _ids(engine, PROMPT)
    events, fin = _run(engine, ids, max_tokens=30, temperature=0, ignore_eos=True)
    tokens = [e.token_id for e in events]
    expected, cur = [], list(ids)
    for _ in range(30):
        t = int(engine.target(input_ids=torch.tensor([cur])).logits[0, -1].argmax())
        expected.append(t)
        cur.append(t)
    assert tokens == expected
    assert fin.stats.proposed > 0 and fin.stats.accepted >= 0
    full = ids + tokens
    p = forced_logprobs(engine.target, full, len(ids))  # [T, V]
    q = forced_feature_logprobs(engine.target, engine.feature, full, len(ids))  # [T, M, V]
    u = decompose(q, p)
    got = torch.tensor([[e.bias, e.variance, e.eu] for e in events])
    torch.testing.assert_close(got, torch.stack([u.bias, u.variance, u.eu], 1), atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_sampled_output_follows_the_target_distribution(engine):
    ids = _ids(engine, "Question: Fay has")
    counts = collections.Counter()
    for seed in range(800):
        events, _ = _run(engine, ids, max_tokens=3, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True)
        counts[(events[0].token_id, events[1].token_id)] += 1
    assert_pairs_follow_target(counts, engine.target, ids, 0.9, 0.95)


def test_spec_reads_the_rotary_settings_of_either_config_format():
    base = {"hidden_size": 64, "num_attention_heads": 1, "intermediate_size": 96}
    new = FeatureSpec.of_target({**base, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}})
    old = FeatureSpec.of_target({**base, "rope_theta": 100000.0})
    assert new.rope_theta == old.rope_theta == 100000.0 and new.head_dim == 64
    with pytest.raises(FeatureDraftError, match="default rotary"):
        FeatureSpec.of_target({**base, "rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn"}})
