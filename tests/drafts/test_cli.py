"""`epispec drafts …` end to end on a tiny JSONL corpus: tokenizer → target → ensemble → distill
→ bundle → calc-accuracy → info, and the clear one-line errors for bad inputs."""

from __future__ import annotations

import json

import pytest

from server.bundle import load_bundle
from server.cli import main

SMALL = [
    "--hidden",
    "64",
    "--heads",
    "1",
    "--layers",
    "1",
    "--intermediate",
    "96",
    "--max-positions",
    "128",
    "--batch-size",
    "4",
    "--seq-len",
    "32",
    "--no-progress",
    "--threads",
    "1",
]


def _run(capsys, *argv) -> dict:
    assert main(["drafts", *argv]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def tok_dir(corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tok"
    assert (
        main(["drafts", "tokenizer", "--data", str(corpus_file), "--vocab-size", "300", "--out", str(out)])
        == 0
    )
    return out


def test_pipeline(corpus_file, tok_dir, tmp_path, capsys):
    data = ["--data", str(corpus_file)]
    t = _run(
        capsys,
        "target",
        *data,
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(tmp_path / "t"),
        "--steps",
        "12",
        "--seed",
        "7",
        *SMALL,
    )
    assert t["loss"]["last"] < t["loss"]["first"]
    rec = json.loads((tmp_path / "t" / "training.json").read_text())
    assert rec["seed"] == 7 and rec["corpus"]["documents"] == 120

    more = _run(
        capsys,
        "target",
        *data,
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(tmp_path / "t2"),
        "--init",
        str(tmp_path / "t"),
        "--steps",
        "4",
        *SMALL,
    )  # continue training
    assert more["loss"]["first"] < t["loss"]["first"] and more["parameters"] == t["parameters"]

    ens = _run(
        capsys,
        "ensemble",
        *data,
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(tmp_path / "e"),
        "-n",
        "2",
        "--steps",
        "3",
        *SMALL,
    )
    seeds = [
        json.loads((tmp_path / "e" / f"member{i}" / "training.json").read_text())["seed"] for i in range(2)
    ]
    assert len(ens["members"]) == 2 and seeds == [0, 1]
    mtime = (tmp_path / "e" / "member0" / "model.safetensors").stat().st_mtime_ns
    _run(
        capsys,
        "ensemble",
        *data,
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(tmp_path / "e"),
        "-n",
        "3",
        "--steps",
        "3",
        *SMALL,
    )  # grows the ensemble, keeps finished members
    assert (tmp_path / "e" / "member0" / "model.safetensors").stat().st_mtime_ns == mtime
    assert (tmp_path / "e" / "member2" / "training.json").exists()

    d = _run(
        capsys,
        "distill",
        *data,
        "--target",
        str(tmp_path / "t"),
        "--out",
        str(tmp_path / "d"),
        "-m",
        "2",
        "--osd",
        "ensemble",
        "--ensemble",
        *[str(tmp_path / "e" / f"member{i}") for i in range(3)],
        "--steps",
        "4",
        *SMALL,
    )
    assert len(d["drafts"]) == 2

    b = _run(
        capsys,
        "bundle",
        "--target",
        str(tmp_path / "t"),
        "--draft",  # one flag, several folders (a shell's draft{0,1})
        *d["drafts"],
        "--out",
        str(tmp_path / "b"),
    )
    bundle = load_bundle(tmp_path / "b")
    assert b["bytes"] > 0 and len(bundle.drafts) == 2
    assert bundle.manifest["training"]["osd"]["mode"] == "ensemble"
    assert bundle.manifest["training"]["ddd"]["enabled"] is True

    calc = _run(
        capsys,
        "calc-accuracy",
        "--data",
        str(corpus_file),
        "--split",
        "train",
        "--limit",
        "4",
        "--bundle",
        str(tmp_path / "b"),
    )
    assert calc["documents"] == 4 and calc["annotations"] == 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tokenizer", "--data", "/nonexistent/train.jsonl", "--out", "x"], "does not exist"),
        (["target", "--data", "{empty}", "--tokenizer", "{tok}", "--out", "{tmp}/t"], "is empty"),
        (
            ["distill", "--data", "{corpus}", "--target", "{tmp}/none", "--out", "{tmp}/d", "-m", "0"],
            "at least 1",
        ),
        (["distill", "--data", "{corpus}", "--target", "{tmp}/none", "--out", "{tmp}/d"], "does not exist"),
        (["bundle", "--target", "{tmp}/none", "--draft", "{tmp}/none", "--out", "{tmp}/b"], "does not exist"),
    ],
)
def test_bad_inputs_exit_2_with_a_sentence(argv, message, corpus_file, tok_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    subs = {
        "{empty}": str(empty),
        "{tok}": str(tok_dir),
        "{tmp}": str(tmp_path),
        "{corpus}": str(corpus_file),
    }
    for k, v in subs.items():
        argv = [a.replace(k, v) for a in argv]
    assert main(["drafts", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"epispec drafts {argv[0]}: ") and message in err
