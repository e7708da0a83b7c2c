"""The README's status box is generated from the committed results files, never typed: its block
must equal what `python -m measure.status` writes, and its words follow the figures."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from measure import status

ROOT = Path(__file__).resolve().parents[2]


def _committed() -> tuple[dict, dict]:
    return json.loads((ROOT / status.BENCH).read_text()), json.loads((ROOT / status.EVAL).read_text())


def _served() -> dict:
    return json.loads((ROOT / status.SERVED).read_text())


def test_readme_status_block_equals_the_block_of_the_committed_results():
    doc, r = _committed()
    expected = status.block(doc, status.BENCH, r, status.EVAL, _served(), status.SERVED)
    assert status.BLOCK.current((ROOT / status.README).read_text()) == expected, (
        "README.md's status block is stale: run `python -m measure.status --readme README.md`"
    )


def test_the_rows_carry_the_results_figures():
    doc, r = _committed()
    text = status.block(doc, status.BENCH, r, status.EVAL)
    plain = {x["concurrency"]: x for x in doc["runs"] if x["config"] == "vllm-target-alone"}
    ours = {x["concurrency"]: x for x in doc["runs"] if x["config"] == "epispec"}
    for c in plain:
        ratio = ours[c]["output_tokens_per_s"] / plain[c]["output_tokens_per_s"]
        assert f"{ratio:.2f}× at C = {c}" in text
    assert f"eu **{r['auroc']['eu']:.3f}**" in text and "*below* right ones" in text
    test = r["calibration"]["test"]
    assert f"precision **{test['precision']:.3f}**, recall **{test['recall']:.3f}**" in text
    better = copy.deepcopy(r)
    better["auroc"]["eu"] = 0.8
    assert "*below*" not in status.block(doc, status.BENCH, better, status.EVAL)
    sv = _served()
    text = status.block(doc, status.BENCH, r, status.EVAL, sv, status.SERVED)
    row = next(line for line in text.splitlines() if line.startswith("| served, black box"))
    assert f"AUROC **{sv['auroc']['mean_eu']:.3f}**" in row and f"{sv['auroc']['mean_nll']:.3f}" in row
    assert f"{sv['responses']} arithmetic and capital questions" in row and f"{sv['wrong']} wrong" in row
    assert ("*below*" in row) == (sv["auroc"]["mean_eu"] < 0.5)


def test_the_command_splices_the_block_and_names_a_bad_file(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{status.BLOCK.start}\nstale\n{status.BLOCK.end}\n\ntail\n")
    bench, ev, sv = str(ROOT / status.BENCH), str(ROOT / Path(status.EVAL).parent), str(ROOT / status.SERVED)
    assert status.main(["--bench", bench, "--eval", ev, "--served", sv, "--readme", str(readme)]) == 0
    doc, r = _committed()
    block = status.block(doc, bench, r, str(Path(ev) / "results.json"), _served(), sv)
    assert readme.read_text() == f"# x\n\n{block}\ntail\n" and capsys.readouterr().out == block
    assert status.main(["--bench", str(tmp_path / "missing.json"), "--eval", ev, "--served", sv]) == 2
    assert "missing.json" in capsys.readouterr().err
    readme.write_text("no markers\n")
    assert status.main(["--bench", bench, "--eval", ev, "--served", sv, "--readme", str(readme)]) == 2
    assert "status" in capsys.readouterr().err
