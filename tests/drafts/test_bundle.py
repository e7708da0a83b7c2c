"""Bundles: the writer (drafts.bundle) and the server's reader (server.bundle) agree; `epispec info`
prints the manifest with absolute paths; bad inputs are refused with plain sentences."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from drafts.bundle import write_bundle
from server.bundle import load_bundle
from server.cli import main
from server.engine.models import ModelFolderError, count_parameters, load_causal_lm


@pytest.fixture(scope="module")
def bundle_dir(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "b"
    write_bundle(tiny_models["target"], tiny_models["drafts"], out, thresholds={"eu": 0.7})
    return out


def test_manifest_round_trips_through_the_reader(bundle_dir, tiny_models):
    b = load_bundle(bundle_dir)
    assert b.target == (bundle_dir / "target").resolve()
    assert b.drafts == [(bundle_dir / "drafts" / f"draft{m}").resolve() for m in range(3)]
    assert b.thresholds == {"eu": 0.7} and b.manifest["calibrated"] is True
    assert b.manifest["target"]["parameters"] == count_parameters(tiny_models["target"])
    assert [d["parameters"] for d in b.manifest["drafts"]] == [
        count_parameters(d) for d in tiny_models["drafts"]
    ]
    assert {"osd", "ddd"} <= set(b.manifest["training"])
    assert b.manifest["versions"]["torch"] == torch.__version__
    assert not list(bundle_dir.rglob("checkpoint.pt"))
    for folder in [b.target, *b.drafts]:
        load_causal_lm(folder)


def test_info_json(bundle_dir, capsys, monkeypatch):
    assert main(["info", "--bundle", str(bundle_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert Path(info["target"]["path"]).is_absolute() and Path(info["target"]["path"]).is_dir()
    assert all(Path(d["path"]).is_absolute() for d in info["drafts"]) and len(info["drafts"]) == 3
    assert info["bytes"] == sum(f.stat().st_size for f in bundle_dir.rglob("*") if f.is_file())
    assert {"osd", "ddd"} <= set(info["training"])
    monkeypatch.setenv("EPISPEC_BUNDLE", str(bundle_dir))
    assert main(["info"]) == 0
    assert str(bundle_dir.resolve()) in capsys.readouterr().out


def test_info_without_a_bundle_is_a_clear_error(tmp_path, capsys):
    assert main(["info", "--bundle", str(tmp_path)]) == 2
    assert "No bundle at" in capsys.readouterr().err


def test_bf16_bundle_loads(tiny_models, tmp_path):
    write_bundle(tiny_models["target"], tiny_models["drafts"][:1], tmp_path / "b", dtype="bfloat16")
    b = load_bundle(tmp_path / "b")
    assert b.manifest["target"]["dtype"] == "bfloat16"
    model = load_causal_lm(b.target, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    size = (b.target / "model.safetensors").stat().st_size
    assert size < 0.6 * (Path(tiny_models["target"]) / "model.safetensors").stat().st_size


def test_the_bundles_k_is_recorded_and_read(tiny_models, tmp_path, bundle_dir):
    assert load_bundle(bundle_dir).num_speculative_tokens is None  # not measured: serve's default
    write_bundle(tiny_models["target"], tiny_models["drafts"][:1], tmp_path / "b", num_speculative_tokens=2)
    b = load_bundle(tmp_path / "b")
    assert b.num_speculative_tokens == 2 and b.manifest["speculation"] == {"num_speculative_tokens": 2}


def test_bad_inputs(tiny_models, tmp_path, bundle_dir):
    t, d = tiny_models["target"], tiny_models["drafts"]
    with pytest.raises(ValueError, match="at least one draft"):
        write_bundle(t, [], tmp_path / "a")
    with pytest.raises(ModelFolderError, match="does not exist"):
        write_bundle(tmp_path / "missing", d, tmp_path / "b")
    with pytest.raises(ValueError, match="not empty"):
        write_bundle(t, d, bundle_dir)
    with pytest.raises(ValueError, match="Unknown threshold"):
        write_bundle(t, d, tmp_path / "c", thresholds={"entropy": 1.0})
    with pytest.raises(ValueError, match="num_speculative_tokens must be >= 1"):
        write_bundle(t, d, tmp_path / "e", num_speculative_tokens=0)


def test_draft_with_another_tokenizer_is_refused(tiny_models, tmp_path):
    from drafts.tokenizer import train_tokenizer

    odd = tmp_path / "odd"
    shutil.copytree(tiny_models["drafts"][0], odd)
    train_tokenizer(["completely different text " * 20, "zebra quartz"] * 10, vocab_size=400, out_dir=odd)
    with pytest.raises(ModelFolderError, match="different tokenizer"):
        write_bundle(tiny_models["target"], [odd], tmp_path / "b")
