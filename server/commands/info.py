"""`epispec info`: the active bundle's manifest (--bundle DIR, else $EPISPEC_BUNDLE, else the default bundle).

Plain output is a short summary; `--json` prints the manifest with absolute paths and the bundle's
size on disk: at least {"target": {"path", "parameters"}, "drafts": [{"path", "parameters", ...}],
"bytes", "training": {"osd", "ddd"}}. A target named by source (see `server.hub`) is not prepared
here: its path is where the cache keeps it, with "prepared": true or false.
"""

from __future__ import annotations

import argparse
import json
import sys

from server.bundle import Bundle, BundleError, load_bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bundle", help="bundle folder (default: $EPISPEC_BUNDLE or the default bundle, bundles/smollm2)"
    )
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")


def describe(bundle: Bundle) -> dict:
    """The manifest with absolute paths and the bytes the folder takes on disk."""
    m = bundle.manifest  # a fresh copy
    m["root"] = str(bundle.root)
    m["target"]["path"] = str(bundle.target)
    if bundle.source is not None:
        from server.hub.prepare import is_prepared
        from server.hub.source import Source

        m["target"]["prepared"] = is_prepared(Source.from_dict(bundle.source), dtype=None)
    for entry, path in zip(m.get("drafts", []), bundle.drafts, strict=True):
        entry["path"] = str(path)
        if entry.get("partition"):
            entry["partition"] = str((bundle.root / entry["partition"]).resolve())
    if isinstance(m.get("tokenizer"), dict) and m["tokenizer"].get("path"):
        m["tokenizer"]["path"] = str((bundle.root / m["tokenizer"]["path"]).resolve())
    m["bytes"] = sum(f.stat().st_size for f in bundle.root.rglob("*") if f.is_file())
    m.setdefault("training", {})
    return m


def run(args: argparse.Namespace) -> int:
    try:
        info = describe(load_bundle(args.bundle, prepare=False))
    except BundleError as exc:
        print(f"epispec info: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    t, drafts = info["target"], info.get("drafts", [])
    train = info.get("training", {})
    lines = [
        f"bundle     {info['root']}  ({info['bytes'] / 1e6:.1f} MB on disk)",
        f"target     {t['path']}  ({_count(t.get('parameters'))} parameters)",
    ]
    if t.get("source"):
        src = t["source"]
        lines.append(
            f"           from {src['package']}=={src['version']} {src['file']} "
            f"({'prepared' if t.get('prepared') else 'not prepared: epispec models prepare'})"
        )
    lines += [
        f"draft {i:<4} {d['path']}  ({_count(d.get('parameters'))} parameters)" for i, d in enumerate(drafts)
    ]
    osd, ddd = train.get("osd", {}), train.get("ddd", {})
    if osd.get("mode") or ddd.get("enabled") is not None:
        lines.append(
            f"OSD        {osd.get('mode') or 'not recorded'}   DDD {'on' if ddd.get('enabled') else 'off'}"
        )
    lines.append(f"thresholds {info.get('thresholds') or 'none (server default)'}")
    print("\n".join(lines))
    return 0


def _count(n) -> str:
    return f"{n:,}" if isinstance(n, int) else "?"
