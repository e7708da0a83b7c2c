"""A bundle of feature drafts: written with their kind, parameters and dtype, loadable, served."""

from __future__ import annotations

import json

from drafts.bundle import write_bundle
from server.bundle import load_bundle
from server.engine.feature_draft import FeatureSpec, read_spec
from server.engine.reference import ReferenceEngine
from server.engine.types import SamplingParams


def test_bundle_records_the_draft_kind_and_serves(tiny_models, feature_drafts, tmp_path):
    out = tmp_path / "b"
    write_bundle(tiny_models["target"], feature_drafts, out, dtype="bfloat16", num_speculative_tokens=2)
    manifest = json.loads((out / "bundle.json").read_text())
    spec = read_spec(feature_drafts[0])
    for e in manifest["drafts"]:
        assert e["kind"] == "feature" and e["parameters"] == spec.parameters() and e["dtype"] == "bfloat16"
    assert isinstance(spec, FeatureSpec)
    b = load_bundle(out)
    assert [d.kind for d in b.spec.drafts] == ["feature"] * 3
    eng = ReferenceEngine(b.target, b.drafts, num_speculative_tokens=2)
    items = list(eng.stream([1, 5, 7, 9], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)))
    assert all(e.eu is not None and e.eu >= 0 for e in items[:-1]) and len(items) == 7
