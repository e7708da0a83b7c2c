"""The commands' default data ships with the project (data/gsm8k/): from a copy of the repository
in an empty folder, with no `../shared` beside it, `epispec bench`'s default prompts and `epispec
eval`'s default data resolve inside the copy and load."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from drafts.corpus import GSM8K, load_records, open_text
from measure.bench.workload import format_prompt, load_questions

ROOT = Path(__file__).resolve().parents[1]

# what the commands resolve, run from the copy: their parsers' defaults, then the data they read
RESOLVE = """
import json, sys
import drafts, measure
from drafts.corpus import load_records
from measure.bench.workload import load_questions
from measure.evaluation.cli import _data
from server.cli import build_parser

def parse(*argv):
    sys.argv = ["epispec", *argv]  # the dispatcher adds the chosen command's flags only
    return build_parser().parse_args(list(argv))

bench, ev = parse("bench"), parse("eval", "--out", "unused")
data, bundle_data = _data(ev.data, ev.quick), _data(None, quick=False)
print(json.dumps({
    "packages": [drafts.__file__, measure.__file__],
    "prompts": bench.prompts,
    "questions": len(load_questions(bench.prompts)),
    "data": data,
    "bundle_data": bundle_data,
    "train": len(load_records(data, "train")),
    "test": len(load_records(data, "test")),
}))
"""


def test_default_data_resolves_inside_a_clone_in_an_empty_folder(tmp_path):
    clone = tmp_path / "epispec"
    for name in ("server", "drafts", "measure", "data"):
        shutil.copytree(ROOT / name, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", clone)
    assert not (tmp_path / "shared").exists()
    env = {**os.environ, "PYTHONPATH": str(clone)}
    run = subprocess.run(
        [sys.executable, "-c", RESOLVE], cwd=clone, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert all(p.startswith(str(clone)) for p in got["packages"]), got["packages"]
    assert got["prompts"] == str(clone / "data" / "gsm8k" / "test.jsonl.gz")
    assert got["data"] == got["bundle_data"] == str(clone / "data" / "gsm8k")
    # GSM8K's full splits (train 7,473, test 1,319): the full `epispec eval` recipe trains on 7,373
    assert (got["questions"], got["train"], got["test"]) == (1319, 7473, 1319)


def test_the_shipped_files_and_their_licence():
    assert sorted(p.name for p in GSM8K.iterdir()) == [
        "LICENSE",
        "README.md",
        "test.jsonl.gz",
        "train.jsonl.gz",
    ]
    assert (GSM8K / "LICENSE").read_text().startswith("MIT License\n\nCopyright (c) 2021 OpenAI")
    first = load_records(GSM8K, "test")[0]
    assert set(first) == {"question", "answer"} and "<<" in first["answer"] and "####" in first["answer"]


def test_gzipped_and_plain_jsonl_read_the_same(tmp_path):
    lines = [{"question": f"q{i}", "answer": f"a <<1+{i}={1 + i}>>{1 + i}\n#### {1 + i}"} for i in range(3)]
    text = "".join(json.dumps(r) + "\n" for r in lines)
    (tmp_path / "plain").mkdir()
    (tmp_path / "gz").mkdir()
    (tmp_path / "plain" / "test.jsonl").write_text(text)
    (tmp_path / "gz" / "test.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    assert load_records(tmp_path / "plain", "test") == load_records(tmp_path / "gz", "test") == lines
    assert load_records(tmp_path / "gz" / "test.jsonl.gz") == lines
    assert load_questions(tmp_path / "gz" / "test.jsonl.gz", 2) == [format_prompt("q0"), format_prompt("q1")]
    with open_text(tmp_path / "gz" / "test.jsonl.gz") as f:
        assert f.read() == text
