"""bundle.json's schema (server/bundle.py): the first format still loads, unknown keys survive a
rewrite, a newer schema and malformed manifests are refused with one sentence."""

from __future__ import annotations

import json

import pytest

from server.bundle import SCHEMA_VERSION, BundleError, load_bundle, read_manifest, write_manifest


def _write(folder, manifest: dict):
    folder.mkdir(exist_ok=True)
    (folder / "bundle.json").write_text(json.dumps(manifest))
    return folder


def test_format_1_manifests_load_as_schema_version_1(tmp_path):
    b = load_bundle(
        _write(
            tmp_path / "b",
            {"format": 1, "target": {"path": "t"}, "drafts": [{"path": "d0"}], "thresholds": {"eu": 0.5}},
        )
    )
    assert b.spec.schema_version == 1 == SCHEMA_VERSION
    assert b.target == (tmp_path / "b" / "t").resolve() and b.drafts == [(tmp_path / "b" / "d0").resolve()]
    assert b.thresholds == {"eu": 0.5}


def test_unknown_keys_are_kept_through_a_rewrite(tmp_path):
    folder = _write(tmp_path / "b", {"target": {"path": "t", "vocab_map": [1, 2]}, "correction": {"a": 1}})
    manifest = read_manifest(folder)
    manifest.calibrated = True
    write_manifest(folder, manifest)
    assert json.loads((folder / "bundle.json").read_text()) == {
        "schema_version": 1,
        "target": {"path": "t", "vocab_map": [1, 2]},
        "correction": {"a": 1},
        "calibrated": True,
    }


@pytest.mark.parametrize(
    ("manifest", "says"),
    [
        ({"schema_version": SCHEMA_VERSION + 1, "target": {"path": "t"}}, "upgrade epispec"),
        ({"drafts": []}, "target: Field required"),
        ({"target": {"path": "t", "source": {"package": "p"}}, "drafts": []}, "not both"),
        ({"target": {"path": "t"}, "thresholds": {"entropy": 1.0}}, "Unknown threshold"),
        ({"target": {"path": "t"}, "thresholds": {"eu": "high"}}, "thresholds.eu"),
    ],
)
def test_bad_manifests_are_refused_with_a_sentence(tmp_path, manifest, says):
    with pytest.raises(BundleError, match=says):
        load_bundle(_write(tmp_path / "b", manifest))
