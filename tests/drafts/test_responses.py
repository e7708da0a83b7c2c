"""Responses files: plain JSONL and gzip-compressed JSONL read the same; a missing file is one
clear error."""

from __future__ import annotations

import gzip
import json

import pytest

from drafts.responses import read_responses, response_docs

LINES = [
    {"question": "q1", "prompt_ids": [1, 2], "output_ids": [3, 4, 2]},
    {"question": "q2", "prompt_ids": [1, 5], "output_ids": [6]},
]


def test_plain_and_gzip_files_read_the_same(tmp_path):
    text = "".join(json.dumps(r) + "\n" for r in LINES) + "\n"
    (tmp_path / "r.jsonl").write_text(text)
    (tmp_path / "r.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    assert read_responses(tmp_path / "r.jsonl") == read_responses(tmp_path / "r.jsonl.gz") == LINES
    assert response_docs(LINES) == [[1, 2, 3, 4, 2], [1, 5, 6]]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_responses(tmp_path / "missing.jsonl.gz")
