"""docs/evaluation.md's tables are generated from the committed results.json, not typed: its block
must equal what `epispec eval --report` writes, and the splice touches nothing outside the markers."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from measure.evaluation import cli, report

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = "docs/eval-quick/results.json"  # docs/evaluation.md's block is generated from this file


def test_readme_block_equals_the_report_of_the_committed_results():
    results = json.loads((ROOT / COMMITTED).read_text())
    expected = report.readme_block(results, COMMITTED)
    assert report.current_block((ROOT / report.DOC).read_text()) == expected, (
        f"{report.DOC}'s eval-table block is stale: run `epispec eval --report {Path(COMMITTED).parent} --readme {report.DOC}`"
    )


def test_splice_replaces_only_the_block():
    text = f"intro\n{report.START}\nold\n{report.END}\noutro\n"
    block = f"{report.START}\nnew\n{report.END}\n"
    assert report.splice(text, block) == f"intro\n{report.START}\nnew\n{report.END}\noutro\n"
    assert report.splice(report.splice(text, block), block) == report.splice(text, block)
    quoted = f"see `{report.START}` and `{report.END}`\n" + text  # markers quoted in prose are not the block
    assert report.splice(quoted, block) == f"see `{report.START}` and `{report.END}`\n" + report.splice(
        text, block
    )


def test_splice_needs_exactly_one_block():
    with pytest.raises(ValueError, match="expected one"):
        report.splice("no markers here\n", f"{report.START}\n{report.END}\n")
    with pytest.raises(ValueError, match="expected one"):
        report.splice(f"{report.START}\n{report.END}\n{report.START}\n{report.END}\n", "x")


def test_report_command_regenerates_tables_and_readme(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ROOT / COMMITTED, run / "results.json")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.START}\nstale\n{report.END}\n\ntail\n")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args(["--report", str(run), "--readme", str(readme)])) == 0
    block = report.readme_block(json.loads((run / "results.json").read_text()), str(run / "results.json"))
    assert capsys.readouterr().out == block
    assert readme.read_text() == f"# x\n\n{block}\ntail\n"
    md = (run / "report.md").read_text()
    assert md.startswith("# epispec evaluation") and "| ours_fit |" in md and "| constant_val_mean |" in md


def test_report_command_without_results_is_an_error(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args(["--report", str(tmp_path)])) == 2
    assert "results.json" in capsys.readouterr().err
