"""The documentation stays true to the tree: docs/layout.md names every module and no path that is
gone, and every relative link of README.md and docs/*.md reaches a file and, with `#anchor`, one of
its headings (GitHub's anchors)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "drafts", "measure")
# docs written in other branches of the same issue; a link to one counts once the file exists
PENDING: set[str] = set()


def layout_paths() -> list[str]:
    """The first word of each line of docs/layout.md's code block."""
    text = (ROOT / "docs" / "layout.md").read_text()
    block = text.split("```\n")[1]
    return [line.split()[0] for line in block.splitlines() if line.strip() and not line.startswith(" ")]


def test_the_layout_names_every_module_and_only_paths_that_exist():
    named = layout_paths()
    gone = [p for p in named if not (ROOT / p).exists()]
    assert not gone, f"docs/layout.md names paths that do not exist: {gone}"
    folders = tuple(p for p in named if p.endswith("/"))
    missing = [
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.name != "__init__.py"
        and str(path.relative_to(ROOT)) not in named
        and not str(path.relative_to(ROOT)).startswith(folders)
    ]
    assert not missing, f"docs/layout.md lacks a line for: {missing}"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (outside fenced code)."""
    found, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            found.add(slug(m.group(1)))
    return found


def links(path: Path) -> list[str]:
    """Relative link targets of a Markdown file (outside fenced code)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z]+:", t)]


def test_slugs_follow_github():
    assert slug("The default bundle (`bundles/smollm2`)") == "the-default-bundle-bundlessmollm2"
    assert slug("§5 Bundles and flag thresholds") == "5-bundles-and-flag-thresholds"
    assert slug("A bundle with a pretrained target (`epispec eval --bundle B`)") == (
        "a-bundle-with-a-pretrained-target-epispec-eval---bundle-b"
    )


def test_every_relative_link_reaches_its_file_and_heading():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "data" / "gsm8k" / "README.md"]
    broken = []
    for doc in docs:
        for target in links(doc):
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
            if not dest.exists():
                if rel not in PENDING:
                    broken.append(f"{doc.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, f"broken links: {broken}"
