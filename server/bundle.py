"""Bundles: a folder with a target, its drafts, a tokenizer and a `bundle.json` manifest.

The manifest (written by `epispec drafts bundle`) holds at least
`{"target": {"path", "parameters"}, "drafts": [{"path", "parameters", ...}],
"training": {...}, "thresholds": {"eu": ..., ...}}` with paths relative to the bundle folder.
The server only reads it; it never imports the `drafts` package.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "bundle.json"
# The demo bundle shipped in the repository, served when no model is given.
DEMO_BUNDLE = Path(__file__).resolve().parents[1] / "demo" / "bundle"


class BundleError(ValueError):
    """A bundle folder is missing or its manifest is unreadable."""


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict
    target: Path
    drafts: list[Path] = field(default_factory=list)
    thresholds: dict = field(default_factory=dict)


def default_bundle_dir() -> Path:
    return Path(os.environ.get("EPISPEC_BUNDLE") or DEMO_BUNDLE)


def load_bundle(folder: str | Path | None = None) -> Bundle:
    root = Path(folder) if folder else default_bundle_dir()
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(
            f"No bundle at '{root}' (no {MANIFEST}). Pass --target DIR [--draft DIR ...] or "
            "--bundle DIR; build a bundle with `epispec drafts bundle`."
        )
    try:
        manifest = json.loads(path.read_text())
        target = (root / manifest["target"]["path"]).resolve()
        drafts = [(root / d["path"]).resolve() for d in manifest.get("drafts", [])]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BundleError(f"Bundle manifest '{path}' is malformed: {exc!r}") from exc
    return Bundle(root.resolve(), manifest, target, drafts, dict(manifest.get("thresholds") or {}))
