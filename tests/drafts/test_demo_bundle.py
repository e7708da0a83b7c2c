"""The demo bundle shipped in the repository (demo/bundle): what the issue promises of it.
Skipped where the bundle has not been built yet."""

from __future__ import annotations

import json

import pytest

from server.bundle import DEMO_BUNDLE, load_bundle
from server.engine.models import check_compatible, count_parameters, load_causal_lm, load_tokenizer

pytestmark = pytest.mark.skipif(not (DEMO_BUNDLE / "bundle.json").is_file(), reason="demo bundle not built")


@pytest.fixture(scope="module")
def demo():
    return load_bundle(DEMO_BUNDLE)


def test_shape_of_the_demo(demo):
    m = demo.manifest
    assert len(demo.drafts) == 4
    target_params = count_parameters(demo.target)
    assert m["target"]["parameters"] == target_params
    for d, entry in zip(demo.drafts, m["drafts"], strict=True):
        assert entry["parameters"] == count_parameters(d)
        assert target_params >= 10 * entry["parameters"]
    assert m["training"]["osd"]["mode"] in ("lowrank", "dropout", "ensemble")
    assert m["training"]["ddd"]["enabled"] is True
    size = sum(f.stat().st_size for f in demo.root.rglob("*") if f.is_file())
    assert size <= 40 * 2**20


def test_demo_partitions_are_disjoint(demo):
    parts = [set(json.loads((demo.root / e["partition"]).read_text())["hashes"]) for e in demo.manifest["drafts"]]
    for a in range(len(parts)):
        for b in range(a + 1, len(parts)):
            assert parts[a].isdisjoint(parts[b])
    assert sum(map(len, parts)) == sum(p["documents"] for p in demo.manifest["training"]["ddd"]["partitions"])


def test_demo_loads_and_writes_gsm8k(demo):
    check_compatible(demo.target, demo.drafts)
    tok = load_tokenizer(demo.target)
    model = load_causal_lm(demo.target)
    prompt = [tok.bos_token_id, *tok("Question: Tom has 12 apples and gives away half. How many are left?\nAnswer:",
                                     add_special_tokens=False)["input_ids"]]
    import torch

    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=120, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    text = tok.decode(out[0, len(prompt):], skip_special_tokens=True)
    assert "<<" in text and ">>" in text, text
