"""Generated blocks in the documentation: text between `<!-- NAME:start -->` and `<!-- NAME:end -->`
(markers on lines of their own), written by a command from a results file and checked by a test
to be current. Used by `epispec bench --report` (bench-table, docs/benchmark.md), `epispec eval
--report` (eval-table and eval-bundle-goals, docs/evaluation.md) and `python -m measure.status`
(status, README.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ReadmeBlock:
    name: str  # e.g. "eval-table"

    @property
    def start(self) -> str:
        return f"<!-- {self.name}:start -->"

    @property
    def end(self) -> str:
        return f"<!-- {self.name}:end -->"

    def find(self, text: str) -> re.Match:
        """The one block whose markers stand on lines of their own (quoted markers in prose don't
        count). ValueError when there is none or more than one."""
        pattern = f"^{re.escape(self.start)}$.*?^{re.escape(self.end)}$"
        found = list(re.finditer(pattern, text, re.MULTILINE | re.DOTALL))
        if len(found) != 1:
            raise ValueError(
                f"expected one {self.start} … {self.end} block (markers on lines of their own), "
                f"found {len(found)}"
            )
        return found[0]

    def splice(self, text: str, block: str) -> str:
        """`text` with its block (markers included) replaced by `block`."""
        m = self.find(text)
        return text[: m.start()] + block.rstrip("\n") + text[m.end() :]

    def write_into(self, path: str | Path, block: str) -> None:
        """Replace the block in the file at `path`. OSError when it cannot be read or written,
        ValueError when it has no block or more than one."""
        Path(path).write_text(self.splice(Path(path).read_text(), block))

    def current(self, text: str) -> str:
        """The block in `text`, markers included, with a final newline."""
        return self.find(text).group(0) + "\n"
